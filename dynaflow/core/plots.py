"""Small matplotlib figures written as PNG (no display needed)."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import numpy as np


def pyplot() -> ModuleType:
    """matplotlib's pyplot on the Agg backend, imported on first use: stage declarations import this
    module, and `dynaflow status` must not pay for matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(values: np.ndarray, xlabels: list[str], ylabels: list[str], xlabel: str, ylabel: str, title: str,
            path: Path, annotate: bool = True) -> None:  # fmt: skip
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(xlabels), 1.2 + 0.5 * len(ylabels)))
    image = ax.imshow(values, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(xlabels)), xlabels)
    ax.set_yticks(range(len(ylabels)), ylabels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if annotate:
        mid = np.nanmean(values)
        for (i, j), v in np.ndenumerate(values):
            ax.text(
                j, i, f"{v:.3g}", ha="center", va="center", fontsize=8, color="white" if v < mid else "black"
            )
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def grid_heatmap(scores: dict[str, float], widths: list[float], depths: list[float], title: str,
                 path: Path) -> None:  # fmt: skip
    """Dev score of each sub-network: rows are depth multipliers, columns width multipliers."""
    values = np.array([[scores[f"w{w}_d{d}"] for w in widths] for d in depths])
    heatmap(values, [str(w) for w in widths], [str(d) for d in depths], "width multiplier",
            "depth multiplier", title, path)  # fmt: skip


def curve_records(history: list[tuple[int, float]], y: str = "loss") -> list[dict[str, float]]:
    """A training curve as DVC plots and most plotting tools read it: one record per step."""
    return [{"step": step, y: value} for step, value in history]


LOSS_CURVE = "loss_curve.json"  # a training stage's ``curve_records``, in its output


def loss_plot(title: str) -> dict[str, dict[str, str]]:
    """The DVC plot declaration of a stage's ``LOSS_CURVE``."""
    return {LOSS_CURVE: {"x": "step", "y": "loss", "title": title, "template": "linear"}}
