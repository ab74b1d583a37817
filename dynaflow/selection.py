"""Pareto front and budget selection over measured sub-networks.

A row is one grid point measured on one hardware profile: a dict with at least ``width``, ``depth``,
``metric`` (the task's main dev score, higher is better), ``params``, ``memory_mb`` (None if unknown) and
``latency_<stat>_ms`` for the statistics used (``median``, ``p90``).
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


def point_name(row: Row) -> str:
    """``w0.5_d0.75``: the key the distillation stages' ``grid.json`` uses for a sub-network.

    A row of another method (``method`` other than ``dynabert``, e.g. a Theseus successor) is named by the
    method and its layer count: ``theseus_L3``.
    """
    method = row.get("method", "dynabert")
    if method != "dynabert":
        return f"{method}_L{row['layers']}"
    return f"w{float(row['width'])}_d{float(row['depth'])}"


def pareto_front(rows: Sequence[Row], stat: str = "median") -> list[bool]:
    """For each row: is it on the front (no other row at least as accurate and as fast, and better in one)?"""
    key = latency_key(stat)
    points = [(_metric(r), r[key]) for r in rows]

    def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] >= b[0] and a[1] <= b[1] and (a[0] > b[0] or a[1] < b[1])

    return [not any(dominates(other, p) for other in points) for p in points]


@dataclass(frozen=True)
class Selection:
    """The outcome for one profile. ``status``: selected, none_fit (budget too tight), or no_budget."""

    profile: str
    status: str
    budget: str
    message: str
    row: Row | None = None
    fitting: int = 0

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


def rank_key(row: Row, stat: str) -> tuple[float, float, int, float, float]:
    """Best first: higher metric, then lower latency, then fewer parameters (then wider, deeper)."""
    return (-_metric(row), row[latency_key(stat)], row["params"], -row["width"], -row["depth"])


def select(
    rows: Sequence[Row],
    latency_ms: float | None = None,
    memory_mb: float | None = None,
    stat: str = "p90",
    profile: str = "",
) -> Selection:
    """The most accurate row within the budgets (ties: lower latency, then fewer parameters)."""
    budget = describe_budget(latency_ms, memory_mb, stat)
    if latency_ms is None and memory_mb is None:
        return Selection(profile, "no_budget", budget, f"profile {profile!r} has no budget: nothing selected")
    if not rows:
        return Selection(profile, "none_fit", budget, f"profile {profile!r}: no sub-network was measured")
    candidates = [r for r in rows if fits(r, latency_ms, memory_mb, stat)]
    if not candidates:
        key = latency_key(stat)
        fastest = min(rows, key=lambda r: (r[key], r["params"]))
        hints = [f"the fastest, {point_name(fastest)}, takes {fastest[key]:.3g} ms ({stat})"]
        known = [r for r in rows if r.get("memory_mb") is not None]
        if memory_mb is not None:
            if known:
                smallest = min(known, key=lambda r: (r["memory_mb"], r["params"]))
                hints.append(f"the smallest, {point_name(smallest)}, needs {smallest['memory_mb']:.3g} MiB")
            else:
                hints.append("peak memory could not be measured here")
        return Selection(
            profile,
            "none_fit",
            budget,
            f"no sub-network fits profile {profile!r} ({budget}): {'; '.join(hints)}. "
            "Relax the budget, add narrower/shallower points to widths/depths, or use faster hardware.",
        )
    best = min(candidates, key=lambda r: rank_key(r, stat))
    key = latency_key(stat)
    memory = f", peak memory {best['memory_mb']:.3g} MiB" if best.get("memory_mb") is not None else ""
    return Selection(
        profile,
        "selected",
        budget,
        f"profile {profile!r}: {point_name(best)} (dev {best['metric']:.4f}, latency {stat} "
        f"{best[key]:.3g} ms{memory}) is the most accurate of {len(candidates)} sub-network(s) within "
        f"{budget}",
        row=best,
        fitting=len(candidates),
    )
