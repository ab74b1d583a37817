"""The request queue and its dispatch rule, shared by the HTTP server and the simulator.

One worker serves one batch at a time. Whenever it is free and requests wait, :meth:`Scheduler.next` sheds
the requests already past their deadline (``late: shed``), asks the policy which sub-network serves how many
of the oldest, and returns that batch with the policy's predicted latency; :meth:`Scheduler.done` reports the
observed latency back to the policy. The scheduler decides by no clock of its own (it times only its own
cost): callers pass ``now``, so the same code runs on the server's monotonic clock and on the simulator's.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Generic, Literal, TypeVar

from dynaflow.serving.policy import Load, Policy, Waiting, padded_length
from dynaflow.serving.profile import ServingProfile

T = TypeVar("T")
RATE_WINDOW = 0.5  # seconds of arrivals the rate is measured over: short enough to see a burst begin
LatePolicy = Literal["fastest", "shed"]


@dataclass(frozen=True)
class Queued(Generic[T]):
    arrival: float
    length: int
    payload: T


@dataclass
class Dispatch(Generic[T]):
    subnet: str | None  # None when the dispatch only shed requests
    batch: list[Queued[T]]
    shed: list[Queued[T]] = field(default_factory=list)
    predicted: float = 0.0  # the profile's latency for this batch (uncorrected)
    decide_seconds: float = 0.0  # the scheduler's own cost: shedding and the policy's decision

    @property
    def length(self) -> int:
        return max((q.length for q in self.batch), default=0)


class Scheduler(Generic[T]):
    def __init__(
        self, policy: Policy, profile: ServingProfile, slo: float, late: LatePolicy = "fastest",
        max_queue: int = 1024,
    ) -> None:  # fmt: skip
        if late not in ("fastest", "shed"):
            raise ValueError(f"late must be 'fastest' or 'shed', got {late!r}")
        self.policy, self.profile, self.slo, self.late, self.max_queue = policy, profile, slo, late, max_queue
        self.queue: deque[Queued[T]] = deque()
        self.arrivals: deque[float] = deque()  # recent arrival times, for the arrival rate

    def __len__(self) -> int:
        return len(self.queue)

    def admit(self, item: Queued[T]) -> bool:
        """Queue ``item``; False (and nothing queued) when the queue is full: the caller rejects it."""
        self.arrivals.append(item.arrival)
        if len(self.queue) >= self.max_queue:
            return False
        self.queue.append(item)
        return True

    def arrival_rate(self, now: float) -> float:
        """Arrivals per second over the last ``RATE_WINDOW`` seconds (admitted or not)."""
        while self.arrivals and self.arrivals[0] < now - RATE_WINDOW:
            self.arrivals.popleft()
        return len(self.arrivals) / RATE_WINDOW

    def next(self, now: float) -> Dispatch[T] | None:
        """The next batch to run (and the requests shed on the way), or None when nothing waits."""
        if not self.queue:
            return None
        start = time.perf_counter()
        shed: list[Queued[T]] = []
        if self.late == "shed":
            while self.queue and now - self.queue[0].arrival >= self.slo:
                shed.append(self.queue.popleft())
        if not self.queue:
            return Dispatch(None, [], shed, decide_seconds=time.perf_counter() - start)
        # Policies look at most two batches deep: a view of the whole queue would cost O(queue) per dispatch.
        view: Sequence[Waiting] = [
            Waiting(q.arrival, q.length) for q in islice(self.queue, 2 * self.policy.max_batch)
        ]
        decision = self.policy.decide(view, now, Load(len(self.queue), self.arrival_rate(now)))
        take = max(1, min(decision.take, len(self.queue)))
        batch = [self.queue.popleft() for _ in range(take)]
        predicted = self.profile.get(decision.subnet).predict(take, padded_length(view, take))
        return Dispatch(decision.subnet, batch, shed, predicted, time.perf_counter() - start)

    def done(self, dispatch: Dispatch[T], observed: float) -> None:
        if dispatch.subnet is not None and dispatch.batch:
            self.policy.observe(dispatch.subnet, dispatch.predicted, observed)
