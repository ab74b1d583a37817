"""What the scheduler knows of each sub-network: its dev score and a latency model measured on this machine.

Latency is modelled per sub-network as ``base + per_token * batch * length`` (padded tokens in the batch),
fitted by least squares to timings at a few batch sizes and lengths. At the lengths BERT classifiers serve
(≤ 128 tokens) attention's quadratic term is small beside the linear layers, so a line in tokens is close;
the policy corrects what is left by the ratio of observed to predicted latency (:mod:`.policy`).
``fit_error`` records how far the line is from the timings it was fitted to.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dynaflow.core.artifacts import atomic_write_json

PROFILE_VERSION = 2  # 2: latency fitted on relative error


@dataclass(frozen=True)
class SubnetProfile:
    name: str  # w0.5_d0.75: the depth_kd stage's grid.json key
    width: float
    depth: float
    score: float  # dev main metric (accuracy on SST-2)
    base_s: float  # latency model: base_s + per_token_s * batch * length
    per_token_s: float
    fit_error: float = 0.0  # largest relative gap between the model and the timings it was fitted to
    p90_single_s: float = 0.0  # p90 of one request at the longest profiled length (the default SLO's base)

    def predict(self, batch: int, length: int) -> float:
        """Predicted seconds for one batch of ``batch`` requests padded to ``length`` tokens."""
        return self.base_s + self.per_token_s * batch * length


@dataclass(frozen=True)
class ServingProfile:
    subnets: tuple[SubnetProfile, ...]
    metric: str  # the task's main metric (what ``score`` is)
    runtime: str  # torch | onnxruntime
    threads: int
    machine: dict[str, Any] = field(default_factory=dict)
    source: str = ""  # digest of the model the profile was measured on

    def get(self, name: str) -> SubnetProfile:
        for s in self.subnets:
            if s.name == name:
                return s
        raise KeyError(f"no sub-network {name!r} (known: {', '.join(s.name for s in self.subnets)})")

    def front(self, length: int = 64) -> tuple[SubnetProfile, ...]:
        """The Pareto front of score against batch-1 latency, most accurate (slowest) first."""
        return pareto_front(self.subnets, length)

    @property
    def full(self) -> SubnetProfile:
        """The largest sub-network: width 1, depth 1 (or the slowest one if the grid lacks it)."""
        return max(self.subnets, key=lambda s: (s.width * s.depth, s.predict(1, 64)))

    def to_json(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["version"] = PROFILE_VERSION
        return doc

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ServingProfile:
        if doc.get("version") != PROFILE_VERSION:
            raise ValueError(f"serving profile version {doc.get('version')!r}, expected {PROFILE_VERSION}")
        subnets = tuple(SubnetProfile(**s) for s in doc["subnets"])
        return cls(subnets, doc["metric"], doc["runtime"], doc["threads"], doc.get("machine", {}),
                   doc.get("source", ""))  # fmt: skip

    def save(self, path: Path) -> None:
        atomic_write_json(path, self.to_json())

    @classmethod
    def load(cls, path: Path) -> ServingProfile:
        return cls.from_json(json.loads(Path(path).read_text()))


def pareto_front(subnets: Iterable[SubnetProfile], length: int = 64) -> tuple[SubnetProfile, ...]:
    """Sub-networks no other is both faster (batch 1) and at least as accurate as; most accurate first."""
    by_speed = sorted(subnets, key=lambda s: (s.predict(1, length), -s.score))
    front: list[SubnetProfile] = []
    for s in by_speed:
        if not front or s.score > front[-1].score:
            front.append(s)
    return tuple(reversed(front))


def fit_latency(samples: Sequence[tuple[int, int, float]]) -> tuple[float, float, float]:
    """(base_s, per_token_s, fit_error) from (batch, length, seconds) timings: least squares of the *relative*
    error, so that a batch of one (the SLO's scale) weighs as much as a batch of 32 (ten times longer)."""
    tokens = np.array([b * n for b, n, _ in samples], dtype=float)
    seconds = np.array([s for _, _, s in samples], dtype=float)
    design = np.stack([np.ones_like(tokens), tokens], axis=1) / seconds[:, None]
    (base, per_token), *_ = np.linalg.lstsq(design, np.ones_like(seconds), rcond=None)
    base, per_token = max(float(base), 0.0), max(float(per_token), 0.0)
    error = float(np.max(np.abs(base + per_token * tokens - seconds) / seconds))
    return base, per_token, error


def profile_points(max_length: int) -> tuple[tuple[int, int], ...]:
    """(batch, length) points timed per sub-network: short and long requests, alone and batched."""
    short, mid = max(max_length // 4, 2), max(max_length // 2, 2)
    return ((1, short), (1, max_length), (4, mid), (8, max_length), (16, short), (32, max_length))


P90_REPEATS = 100  # calls timed for the p90 of one request (the default SLO is twice the full model's)


def time_subnet(
    run: Callable[[int, int], object], points: Sequence[tuple[int, int]], repeats: int = 10
) -> tuple[list[tuple[int, int, float]], float]:
    """Median seconds of ``run(batch, length)`` at each point (after an untimed call), and the p90 of the
    batch-1 point at the longest length."""
    samples, p90_single = [], 0.0
    longest = max(n for b, n in points if b == 1)
    for batch, length in points:
        run(batch, length)
        single = (batch, length) == (1, longest)
        times = []
        for _ in range(P90_REPEATS if single else repeats):  # a p90 of ten calls would be nearly their max
            start = time.perf_counter()
            run(batch, length)
            times.append(time.perf_counter() - start)
        samples.append((batch, length, float(np.median(times))))
        if single:
            p90_single = float(np.percentile(times, 90))
    return samples, p90_single


class AnswerDelay:
    """How long after its batch ends the last answer of a batch leaves the server: ``fixed + per_answer * n``.

    The answers of a batch are written one after another on the event loop (which also parses new requests
    in between), so the last answer of a big batch leaves milliseconds after the first: a cost the SLO policy
    must count. Fitted online from the slowest answer of each finished batch, by least squares with
    exponential forgetting (recent batches weigh most; load changes it).
    """

    def __init__(self, forget: float = 0.97) -> None:
        self.forget = forget
        self.s = np.zeros(5)  # weighted sums of 1, n, n^2, y, n*y

    def add(self, n: int, seconds: float) -> None:
        self.s = self.forget * self.s + np.array([1.0, n, n * n, seconds, n * seconds])

    def fit(self) -> tuple[float, float]:
        """(fixed, per_answer) seconds; (mean, 0) while the batches seen all had one size."""
        w, sn, snn, sy, sny = self.s
        if w == 0:
            return 0.0, 0.0
        spread = w * snn - sn * sn
        if spread <= 1e-9 * max(w * snn, 1.0):
            return max(sy / w, 0.0), 0.0
        per_answer = max((w * sny - sn * sy) / spread, 0.0)
        return max((sy - per_answer * sn) / w, 0.0), per_answer
