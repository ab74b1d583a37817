"""Pareto front, quality floor and budget selection over measured candidates of every method.

A row is one candidate measured on one hardware profile: a dict with at least ``candidate`` (its id,
``method/name``), ``method``, ``metric`` (the task's main dev score, higher is better), ``params``,
``memory_mb`` (None if unknown) and ``latency_<stat>_ms`` for the statistics used (``median``, ``p90``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

Row = dict[str, Any]


def latency_key(stat: str) -> str:
    if stat not in ("median", "p90"):
        raise ValueError(f"latency statistic must be 'median' or 'p90', got {stat!r}")
    return f"latency_{stat}_ms"


def _metric(row: Row) -> float:
    value = row.get("metric")
    return -math.inf if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def pareto_front(rows: Sequence[Row], stat: str = "median") -> list[bool]:
    """For each row: is it on the front (no other row at least as accurate and as fast, and better in one)?"""
    key = latency_key(stat)
    points = [(_metric(r), r[key]) for r in rows]

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])

    return [not any(dominates(other, p) for other in points) for p in points]


@dataclass(frozen=True)
class QualityFloor:
    """The lowest dev score a candidate may ship with: above chance, and not too far below the teacher."""

    floor: float | None  # None: no floor known (no teacher or chance score)
    reason: str

    def accepts(self, row: Row) -> bool:
        return self.floor is None or _metric(row) >= self.floor


def quality_floor(
    teacher: float | None, chance: float | None, max_drop: float | None, min_gain: float
) -> QualityFloor:
    """``max(chance + min_gain, teacher - max_drop)``; each part only where it is known and set."""
    parts = []
    if chance is not None:
        parts.append((chance + min_gain, f"chance {chance:.4f} + {min_gain:g}"))
    if teacher is not None and max_drop is not None:
        parts.append((teacher - max_drop, f"teacher {teacher:.4f} - {max_drop:g}"))
    if not parts:
        return QualityFloor(None, "no quality floor (teacher and chance scores unknown)")
    floor, why = max(parts)
    return QualityFloor(floor, f"dev score >= {floor:.4f} ({'; '.join(w for _, w in parts)})")


@dataclass(frozen=True)
class Selection:
    """The outcome for one profile.

    ``status``: selected; none_fit (no candidate within the budget); below_quality (some fit the budget,
    none reaches the quality floor: nothing is shipped); or no_budget.
    """

    profile: str
    status: str
    budget: str
    message: str
    row: Row | None = None
    fitting: int = 0
    quality: str = ""
    rejected: Row | None = None  # below_quality: the best in-budget candidate that was turned down

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def describe_budget(latency_ms: float | None, memory_mb: float | None, stat: str) -> str:
    parts = []
    if latency_ms is not None:
        parts.append(f"latency {stat} <= {latency_ms:g} ms")
    if memory_mb is not None:
        parts.append(f"peak memory <= {memory_mb:g} MiB")
    return ", ".join(parts) or "none"


def fits(row: Row, latency_ms: float | None, memory_mb: float | None, stat: str) -> bool:
    """Within both budgets; an unknown peak memory never fits a memory budget."""
    if latency_ms is not None and not row[latency_key(stat)] <= latency_ms:
        return False
    if memory_mb is not None and (row.get("memory_mb") is None or not row["memory_mb"] <= memory_mb):
        return False
    return True


def rank_key(row: Row, stat: str) -> tuple[float, float, int, str]:
    """Best first: higher metric, then lower latency, then fewer parameters (then the id: a fixed order)."""
    return (-_metric(row), row[latency_key(stat)], row["params"], row["candidate"])


def select(
    rows: Sequence[Row],
    latency_ms: float | None = None,
    memory_mb: float | None = None,
    stat: str = "p90",
    profile: str = "",
    quality: QualityFloor | None = None,
) -> Selection:
    """The most accurate row within the budgets that meets the quality floor (ties: faster, then smaller)."""
    budget = describe_budget(latency_ms, memory_mb, stat)
    quality = quality or QualityFloor(None, "")
    if latency_ms is None and memory_mb is None:
        return Selection(profile, "no_budget", budget, f"profile {profile!r} has no budget: nothing selected",
                         quality=quality.reason)  # fmt: skip
    if not rows:
        return Selection(profile, "none_fit", budget, f"profile {profile!r}: no candidate was measured",
                         quality=quality.reason)  # fmt: skip
    in_budget = [r for r in rows if fits(r, latency_ms, memory_mb, stat)]
    if not in_budget:
        key = latency_key(stat)
        fastest = min(rows, key=lambda r: (r[key], r["params"]))
        hints = [f"the fastest, {fastest['candidate']}, takes {fastest[key]:.3g} ms ({stat})"]
        known = [r for r in rows if r.get("memory_mb") is not None]
        if memory_mb is not None:
            if known:
                smallest = min(known, key=lambda r: (r["memory_mb"], r["params"]))
                hints.append(f"the smallest, {smallest['candidate']}, needs {smallest['memory_mb']:.3g} MiB")
            else:
                hints.append("peak memory could not be measured here")
        return Selection(
            profile,
            "none_fit",
            budget,
            f"no candidate fits profile {profile!r} ({budget}): {'; '.join(hints)}. "
            "Relax the budget, train smaller candidates (narrower/shallower points, another method), or use "
            "faster hardware.",
            quality=quality.reason,
        )
    good = [r for r in in_budget if quality.accepts(r)]
    if not good:
        best = min(in_budget, key=lambda r: rank_key(r, stat))
        return Selection(
            profile,
            "below_quality",
            budget,
            f"NOTHING EXPORTED for profile {profile!r}: {len(in_budget)} candidate(s) fit {budget}, but none "
            f"meets the quality floor, {quality.reason}. The best of them, {best['candidate']}, scores "
            f"{_metric(best):.4f}. Train longer (or another method), relax the budget, or lower "
            "evaluate.max_metric_drop.",
            fitting=len(in_budget),
            quality=quality.reason,
            rejected=best,
        )
    best = min(good, key=lambda r: rank_key(r, stat))
    key = latency_key(stat)
    memory = f", peak memory {best['memory_mb']:.3g} MiB" if best.get("memory_mb") is not None else ""
    below = len(in_budget) - len(good)
    turned_down = f"; {below} below the quality floor" if below else ""
    return Selection(
        profile,
        "selected",
        budget,
        f"profile {profile!r}: {best['candidate']} (dev {best['metric']:.4f}, latency {stat} "
        f"{best[key]:.3g} ms{memory}) is the most accurate of {len(good)} candidate(s) within "
        f"{budget} that meet {quality.reason or 'no quality floor'}{turned_down}",
        row=best,
        fitting=len(in_budget),
        quality=quality.reason,
    )
