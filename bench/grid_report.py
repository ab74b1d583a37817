"""Markdown tables of a finished DynaBERT run: the dev grid after each stage next to the teacher and the
no-training floors, each stage's wall time and throughput, and the issue's accuracy targets.

Usage: python bench/grid_report.py [PROJECT_DIR]   (reads PROJECT_DIR/metrics/*.json; default: .)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def load(root: Path, stage: str) -> dict:
    path = root / "metrics" / f"{stage}.json"
    if not path.is_file():
        sys.exit(f"{path}: missing (has the {stage} stage run?)")
    return json.loads(path.read_text())


def cell(metrics: dict, prefix: str, width: float, depth: float, suffix: str = "") -> float | None:
    return metrics.get(f"{prefix}w{width}_d{depth}{suffix}")


def table(title: str, values: dict[tuple[float, float], float | None], widths, depths) -> str:
    """Rows: width multipliers; columns: depth multipliers (the layout of the paper's Table 1)."""
    lines = [f"**{title}**", "", "| m_w \\ m_d | " + " | ".join(str(d) for d in depths) + " |",
             "|---" * (1 + len(depths)) + "|"]  # fmt: skip
    for w in widths:
        cells = [values.get((w, d)) for d in depths]
        lines.append(f"| {w} | " + " | ".join("" if v is None else f"{100 * v:.1f}" for v in cells) + " |")
    return "\n".join(lines)


def main(root: Path) -> None:
    teacher, rewire = load(root, "teacher"), load(root, "rewire")
    width_kd, depth_kd = load(root, "width_kd"), load(root, "depth_kd")
    main_metric = "score"
    names = [k.removeprefix("floor_rewired.w") for k in rewire if k.startswith("floor_rewired.")]
    widths = sorted({float(n.split("_d")[0]) for n in names}, reverse=True)
    depths = sorted({float(n.split("_d")[1]) for n in names}, reverse=True)
    grid = [(w, d) for d in depths for w in widths]
    rows = {
        "teacher (full model)": {(1.0, 1.0): teacher[main_metric]},
        "floor: sliced teacher, no rewiring": {g: cell(rewire, "floor_plain.", *g) for g in grid},
        "floor: sliced rewired teacher": {g: cell(rewire, "floor_rewired.", *g) for g in grid},
        "after DynaBERT_W (width_kd)": {(w, 1.0): cell(width_kd, "dev.", w, 1.0, ".score") for w in widths},
        "after DynaBERT (depth_kd)": {g: cell(depth_kd, "dev.", *g, ".score") for g in grid},
    }
    print(f"teacher (full model): {100 * teacher[main_metric]:.1f}\n")
    for name, values in list(rows.items())[1:]:
        print(table(f"{name}: dev {main_metric} (%)", values, widths, depths))
        print()
    print("| stage | wall time (s) | training examples/s |")
    print("|---|---:|---:|")
    for name, m in (("teacher", teacher), ("width_kd", width_kd), ("depth_kd", depth_kd)):
        print(f"| {name} | {m['train_seconds']:.0f} | {m['examples_per_second']:.1f} |")
    print()
    final = rows["after DynaBERT (depth_kd)"]
    worst = min(final.values())
    gap = teacher[main_metric] - worst
    small = (min(widths), min(depths))
    lift = final[small] - rows["floor: sliced rewired teacher"][small]
    print(f"- every sub-network within 3 points of the teacher: {'yes' if gap <= 0.03 else 'no'} "
          f"(largest gap {100 * gap:.1f} points)")  # fmt: skip
    print(f"- {small} at least 15 points above its no-training floor: {'yes' if lift >= 0.15 else 'no'} "
          f"({100 * lift:+.1f} points)")  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
