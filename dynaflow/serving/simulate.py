"""The scheduler on a simulated clock: one worker, batch durations from a latency function.

What the policies would do under a trace, in milliseconds of CPU instead of minutes of load: the tests run the
policies here against a fake actuator, and ``bench/serve.py`` uses it to find the full model's capacity.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dynaflow.serving.outcomes import Outcome
from dynaflow.serving.scheduler import Queued, Scheduler

# (sub-network, batch size, padded length) -> seconds
LatencyFn = Callable[[str, int, int], float]
# (request index, sub-network) -> whether its answer is correct (None: unknown)
CorrectFn = Callable[[int, str], bool | None]


def simulate(
    scheduler: Scheduler[int],
    arrival_times: Sequence[float],
    lengths: Sequence[int],
    latency: LatencyFn,
    correct: CorrectFn | None = None,
) -> list[Outcome]:
    """One outcome per arrival, in arrival order; the scheduler's queue must start empty."""
    outcomes: dict[int, Outcome] = {}
    n, i, now = len(arrival_times), 0, 0.0
    while i < n or len(scheduler):
        if not len(scheduler):
            now = max(now, arrival_times[i])
        while i < n and arrival_times[i] <= now:
            if not scheduler.admit(Queued(arrival_times[i], lengths[i], i)):
                outcomes[i] = Outcome(arrival_times[i], "rejected")
            i += 1
        dispatch = scheduler.next(now)
        if dispatch is None:
            continue
        for q in dispatch.shed:
            outcomes[q.payload] = Outcome(q.arrival, "shed")
        if not dispatch.batch:
            continue
        assert dispatch.subnet is not None
        took = latency(dispatch.subnet, len(dispatch.batch), dispatch.length)
        now += took
        scheduler.done(dispatch, took)
        for q in dispatch.batch:
            right = correct(q.payload, dispatch.subnet) if correct else None
            outcomes[q.payload] = Outcome(q.arrival, "ok", now - q.arrival, dispatch.subnet, right)
    return [outcomes[k] for k in range(n)]
