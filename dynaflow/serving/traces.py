"""Open-loop arrival traces: seeded Poisson arrivals at a piecewise-constant rate.

A trace spec names a shape and its rates in requests per second:

* ``steady:R``: R for the whole run;
* ``step:R1,R2``: R1 for the first half, R2 for the second;
* ``onoff:LOW,HIGH,PERIOD``: bursts at HIGH for the first half of every PERIOD seconds, LOW in between.

Rates may be written as multiples of a capacity (``steady:1.5c``), resolved by :func:`parse_trace`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TRACE_HELP = "steady:R | step:R1,R2 | onoff:LOW,HIGH,PERIOD (rates in req/s, or 'Nc' = N x capacity)"


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    rate: float  # requests per second


def _rate(text: str, capacity: float | None, spec: str) -> float:
    text = text.strip()
    try:
        if text.endswith("c"):
            if capacity is None:
                raise ValueError(f"trace {spec!r}: '{text}' is relative to a capacity, and none is known")
            value = float(text[:-1]) * capacity
        else:
            value = float(text)
    except ValueError as exc:
        if "capacity" in str(exc):
            raise
        raise ValueError(f"trace {spec!r}: '{text}' is not a rate ({TRACE_HELP})") from None
    if value < 0:
        raise ValueError(f"trace {spec!r}: rates must be >= 0, got {value}")
    return value


def parse_trace(spec: str, duration: float, capacity: float | None = None) -> list[Segment]:
    """The segments of ``spec`` over ``duration`` seconds."""
    if duration <= 0:
        raise ValueError(f"duration must be > 0 seconds, got {duration}")
    shape, _, args = spec.partition(":")
    parts = [p for p in args.split(",") if p.strip()]
    if shape == "steady" and len(parts) == 1:
        return [Segment(0.0, duration, _rate(parts[0], capacity, spec))]
    if shape == "step" and len(parts) == 2:
        low, high = (_rate(p, capacity, spec) for p in parts)
        return [Segment(0.0, duration / 2, low), Segment(duration / 2, duration, high)]
    if shape == "onoff" and len(parts) == 3:
        low, high = (_rate(p, capacity, spec) for p in parts[:2])
        try:
            period = float(parts[2])
        except ValueError:
            raise ValueError(f"trace {spec!r}: the period '{parts[2]}' is not a number of seconds") from None
        if period <= 0:
            raise ValueError(f"trace {spec!r}: the period must be > 0 seconds")
        segments, t = [], 0.0
        while t < duration:
            mid, end = min(t + period / 2, duration), min(t + period, duration)
            segments.append(Segment(t, mid, high))
            if end > mid:
                segments.append(Segment(mid, end, low))
            t += period
        return segments
    raise ValueError(f"unknown trace {spec!r}; expected {TRACE_HELP}")


def arrivals(segments: list[Segment], seed: int) -> np.ndarray:
    """Poisson arrival times (seconds, sorted) over the segments, reproducible from ``seed``."""
    rng = np.random.default_rng(seed)
    times: list[float] = []
    for seg in segments:
        if seg.rate <= 0:
            continue
        t = seg.start + rng.exponential(1 / seg.rate)
        while t < seg.end:
            times.append(t)
            t += rng.exponential(1 / seg.rate)
    return np.array(times)
