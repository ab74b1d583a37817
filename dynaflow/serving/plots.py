"""Figures of a load test: latency and sub-network mix over time; attainment against effective accuracy."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dynaflow.core.artifacts import atomic_file
from dynaflow.core.plots import pyplot
from dynaflow.serving.outcomes import Outcome, mix_over_time

plt = pyplot()


def _save(fig: Any, path: Path) -> None:
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def timeline_plot(
    outcomes: Sequence[Outcome], slo: float, title: str, path: Path, bin_seconds: float = 1.0
) -> None:
    """Top: each request's latency at its send time, coloured by sub-network, misses marked, SLO line.
    Bottom: the share of answers each sub-network gave, per ``bin_seconds``."""
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 6), sharex=True, height_ratios=(3, 2))
    names = sorted({o.subnet for o in outcomes if o.subnet}, key=lambda n: (-len(n), n))
    colours = {n: plt.cm.viridis(i / max(len(names) - 1, 1)) for i, n in enumerate(names)}
    for name in names:
        pts = [(o.sent, o.latency * 1000) for o in outcomes if o.subnet == name and o.latency is not None]
        if pts:
            x, y = zip(*pts, strict=True)
            top.scatter(x, y, s=4, color=colours[name], label=name)
    dropped = [o.sent for o in outcomes if o.status != "ok"]
    if dropped:
        top.scatter(dropped, [slo * 1000 * 1.05] * len(dropped), marker="x", s=10, color="red",
                    label=f"shed/rejected/failed ({len(dropped)})")  # fmt: skip
    top.axhline(slo * 1000, color="black", linestyle="--", linewidth=1, label=f"SLO {slo * 1000:.1f} ms")
    top.set_yscale("log")
    top.set_ylabel("latency from scheduled send (ms)")
    top.set_title(title, fontsize=10)
    top.legend(fontsize=7, markerscale=3, loc="upper left", ncol=2)
    mix = mix_over_time(outcomes, bin_seconds)
    if mix:
        t = np.arange(len(next(iter(mix.values())))) * bin_seconds
        ordered = [n for n in names if n in mix]
        bottom.stackplot(t, [mix[n] for n in ordered], colors=[colours[n] for n in ordered], step="post")
    bottom.set_ylabel("share of answers")
    bottom.set_xlabel("scheduled send time (s)")
    bottom.set_ylim(0, 1)
    _save(fig, path)


def attainment_plot(rows: Sequence[dict[str, Any]], title: str, path: Path) -> None:
    """One point per policy: SLO attainment (x) against effective accuracy (y); fixed points as dots,
    adaptive policies as stars (SuperServe's framing)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for row in rows:
        fixed = row["policy"].startswith("fixed:")
        ax.scatter(row["attainment"], row["effective_accuracy"], marker="o" if fixed else "*",
                   s=30 if fixed else 160, color="tab:blue" if fixed else "tab:red", zorder=3)  # fmt: skip
        ax.annotate(row["policy"].removeprefix("fixed:"), (row["attainment"], row["effective_accuracy"]),
                    fontsize=7, xytext=(4, 3), textcoords="offset points")  # fmt: skip
    ax.set_xlabel("SLO attainment (answered within the SLO / sent)")
    ax.set_ylabel("effective accuracy (correct and on time / sent)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    _save(fig, path)
