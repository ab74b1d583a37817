"""Which sub-network serves the next batch: the scheduling policies.

A policy sees the queue (arrival time and token length of each waiting request, oldest first) and the clock,
and returns a :class:`Decision`: the sub-network and how many of the oldest requests to serve now. The rules
are pure functions (:func:`slo_aware_choice`, :func:`threshold_step`); the policy objects only hold the little
state they carry between dispatches (the threshold policy's level, the SLO-aware policy's correction of
predicted latency by observed latency).

* ``fixed:<name>``: always that sub-network (the baselines: every Pareto point).
* ``threshold``: steps one Pareto point faster when the oldest request has waited more than ``up`` × SLO,
  one point more accurate when it has waited less than ``down`` × SLO (hysteresis between the two).
* ``slo``: at each dispatch, the most accurate sub-network whose predicted latency for the batch it is about
  to run fits the oldest request's remaining slack (SlackFit-like; SuperServe, NSDI '25). Requests already
  past their deadline are served by the fastest sub-network (or shed by the scheduler, ``late: shed``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dynaflow.serving.profile import AnswerDelay, ServingProfile, SubnetProfile

POLICY_NAMES = ("slo", "threshold", "fixed:<sub-network>")
RATIO_RECOVERY = 0.02  # per batch on another sub-network: an unused residual halves in about 35 batches


@dataclass(frozen=True)
class Waiting:
    """What a policy sees of one queued request."""

    arrival: float  # seconds, on the scheduler's clock
    length: int  # tokens


@dataclass(frozen=True)
class Decision:
    subnet: str
    take: int  # serve the ``take`` oldest requests as one batch


@dataclass(frozen=True)
class Load:
    """What a policy knows of the load beyond its view of the queue."""

    backlog: int  # requests waiting in all (the view holds the oldest two batches at most)
    rate: float  # recent arrivals per second


def padded_length(queue: Sequence[Waiting], take: int) -> int:
    return max(w.length for w in queue[:take])


def slo_aware_choice(
    queue: Sequence[Waiting],
    now: float,
    front: Sequence[SubnetProfile],
    slo: float,
    max_batch: int,
    ratio: dict[str, float] | None = None,
    margin: float = 0.0,
    load: Load | None = None,
    per_answer: float = 0.0,
) -> Decision:
    """The most accurate front point whose corrected prediction fits the oldest request's slack, and leaves
    the next batch a chance.

    ``front`` is most accurate first. ``ratio[name]`` scales a sub-network's predicted latency (observed /
    predicted, learnt while serving); ``per_answer`` is added per request of the batch (its answers leave one
    after another) and ``margin`` kept free once. With ``load``, a point is also refused when, after it, the
    next batch (the requests left waiting plus those expected to arrive meanwhile) could not meet its oldest
    request's deadline even on the fastest point: greedy on the oldest request alone, a burst makes every
    next batch start late. When nothing fits the whole batch, the fastest point serves the largest batch
    that fits (at least one request); when the oldest request is already late, the fastest serves a full
    batch: its deadline is lost, the point is to stop the queue from growing.
    """
    if not queue:
        raise ValueError("slo_aware_choice needs a non-empty queue")
    ratio = ratio or {}
    take = min(len(queue), max_batch)
    slack = slo - (now - queue[0].arrival) - margin
    fastest = front[-1]
    if slack <= 0:
        return Decision(fastest.name, take)

    def predicted(s: SubnetProfile, n: int, length: int | None = None) -> float:
        """Corrected seconds for ``n`` requests (padded to the ``n`` oldest ones', unless ``length``)."""
        length = padded_length(queue, n) if length is None else length
        return ratio.get(s.name, 1.0) * s.predict(n, length) + per_answer * n

    def leaves_next_a_chance(took: float) -> bool:
        if load is None:
            return True
        left = load.backlog - take + load.rate * took
        if left < 1:
            return True
        behind = now - queue[take].arrival if take < len(queue) else 0.0  # else: it arrives meanwhile
        next_slack = slo - margin - behind - took
        n = min(max_batch, int(np.ceil(left)))
        waiting = queue[take : take + n]  # those not yet here: assumed as long as this batch
        length = max(max((w.length for w in waiting), default=0), padded_length(queue, take))
        return predicted(fastest, n, length) <= next_slack

    for s in front:
        took = predicted(s, take)
        if took <= slack and (s is fastest or leaves_next_a_chance(took)):
            return Decision(s.name, take)
    while take > 1 and predicted(fastest, take) > slack:
        take -= 1
    return Decision(fastest.name, take)


def threshold_step(level: int, waited: float, slo: float, up: float, down: float, levels: int) -> int:
    """The next front index (0 = most accurate): one faster above ``up`` × SLO, one slower below ``down``."""
    if waited > up * slo:
        return min(level + 1, levels - 1)
    if waited < down * slo:
        return max(level - 1, 0)
    return level


class Policy:
    """A scheduling policy: ``decide`` at each dispatch, ``observe`` each finished batch.

    ``decide`` sees at most two batches of the oldest requests, and the whole backlog and arrival rate as
    ``load``.
    """

    name = "policy"
    max_batch = 32

    def decide(self, queue: Sequence[Waiting], now: float, load: Load | None = None) -> Decision:
        raise NotImplementedError

    def observe(self, subnet: str, predicted: float, observed: float) -> None:
        """A batch on ``subnet`` took ``observed`` seconds where the profile predicted ``predicted``."""

    def observe_answers(self, batch_size: int, seconds: float) -> None:
        """The last answer of a batch of ``batch_size`` left the server ``seconds`` after the batch ended."""


class FixedPolicy(Policy):
    def __init__(self, subnet: SubnetProfile, max_batch: int) -> None:
        self.subnet, self.max_batch = subnet, max_batch
        self.name = f"fixed:{subnet.name}"

    def decide(self, queue: Sequence[Waiting], now: float, load: Load | None = None) -> Decision:
        return Decision(self.subnet.name, min(len(queue), self.max_batch))


class ThresholdPolicy(Policy):
    name = "threshold"

    def __init__(
        self, front: Sequence[SubnetProfile], slo: float, max_batch: int, up: float = 0.5, down: float = 0.1
    ) -> None:
        if not 0 <= down < up:
            raise ValueError(f"threshold policy needs 0 <= down < up, got down={down}, up={up}")
        self.front, self.slo, self.max_batch, self.up, self.down = list(front), slo, max_batch, up, down
        self.level = 0

    def decide(self, queue: Sequence[Waiting], now: float, load: Load | None = None) -> Decision:
        waited = now - queue[0].arrival
        self.level = threshold_step(self.level, waited, self.slo, self.up, self.down, len(self.front))
        return Decision(self.front[self.level].name, min(len(queue), self.max_batch))


class SloAwarePolicy(Policy):
    name = "slo"

    def __init__(
        self,
        front: Sequence[SubnetProfile],
        slo: float,
        max_batch: int,
        margin: float = 0.0,
        alpha: float = 0.2,
    ) -> None:
        self.front, self.slo, self.max_batch, self.alpha = list(front), slo, max_batch, alpha
        self.margin = margin  # the client's side of HTTP: no server can see it (serve.margin_ms)
        # Observed / predicted latency = a machine-wide factor (another process, thermal limits: it holds for
        # every sub-network) x each sub-network's own residual (its profile's error).
        self.machine = 1.0
        self.residual: dict[str, float] = {}
        self.answers = AnswerDelay()

    @property
    def ratio(self) -> dict[str, float]:
        """Each sub-network's correction of its predicted latency."""
        return {s.name: self.machine * self.residual.get(s.name, 1.0) for s in self.front}

    def decide(self, queue: Sequence[Waiting], now: float, load: Load | None = None) -> Decision:
        fixed, per_answer = self.answers.fit()
        return slo_aware_choice(queue, now, self.front, self.slo, self.max_batch, self.ratio,
                                self.margin + fixed, load, per_answer)  # fmt: skip

    def observe(self, subnet: str, predicted: float, observed: float) -> None:
        # EWMA of observed / predicted, bounded so that one stall (GC, page fault) cannot pin the policy.
        if predicted <= 0:
            return
        sample = min(max(observed / predicted, 0.5), 3.0)
        own = self.residual.get(subnet, 1.0)
        self.machine = (1 - self.alpha) * self.machine + self.alpha * sample / own
        self.residual[subnet] = (1 - self.alpha) * own + self.alpha * sample / self.machine
        # The other residuals drift back to 1: a sub-network judged slow during a stall would otherwise never
        # be chosen again, so never be observed again, and never recover.
        for other, value in self.residual.items():
            if other != subnet:
                self.residual[other] = 1 + (value - 1) * (1 - RATIO_RECOVERY)

    def observe_answers(self, batch_size: int, seconds: float) -> None:
        self.answers.add(batch_size, seconds)


def make_policy(
    spec: str, profile: ServingProfile, slo: float, max_batch: int, margin: float = 0.0
) -> Policy:
    """``slo``, ``threshold`` or ``fixed:<sub-network>`` (``fixed:full``: the largest) for this profile."""
    front = profile.front()
    if spec == "slo":
        return SloAwarePolicy(front, slo, max_batch, margin)
    if spec == "threshold":
        return ThresholdPolicy(front, slo, max_batch)
    if spec.startswith("fixed:"):
        name = spec.removeprefix("fixed:")
        return FixedPolicy(profile.full if name == "full" else profile.get(name), max_batch)
    raise ValueError(f"unknown policy {spec!r}; choose one of {', '.join(POLICY_NAMES)}")
