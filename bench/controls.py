"""Same-size controls (issue 18): is one DynaBERT training as good as training each size alone?

Run in a project where the DynaBERT flow has run (`dynaflow run`, with the params to compare):

    GLUE_DIR=../shared/data/glue python bench/controls.py --project . --budget passes wall \\
        --out bench/controls.json [--set KEY=VALUE ...]

For each budget it runs `dynaflow controls` (the cells of params.yaml `controls.cells`, each distilled
alone and measured on every hardware profile; cached), then prints one row per cell: DynaBERT's dev score of
the cell (its checkpoint chosen as `depth_kd.selection` says), the control's, the difference, and the
training steps each gave that sub-network. `wall` gives each control the whole wall time of DynaBERT's two
distillation stages: hours on a CPU.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from common import run_and_report

from dynaflow.config import load_params


def run(args: argparse.Namespace) -> dict[str, Any]:
    from stages.controls import run_controls

    budgets = {}
    for budget in args.budget:
        params = load_params(args.project / "params.yaml", [*args.set, f"controls.budget={budget}"])
        budgets[budget] = run_controls(params, args.project.resolve())
    return {"project": str(args.project.resolve()), "overrides": args.set, "budgets": budgets}


def markdown(result: dict[str, Any]) -> str:
    lines = []
    for budget, summary in result["budgets"].items():
        metric = summary["main_metric"]
        lines += [
            f"### Budget: {budget}",
            "",
            f"| cell | DynaBERT dev {metric} | alone dev {metric} | alone − DynaBERT "
            "| steps DynaBERT gave it | steps alone | seconds alone |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, cell in summary["cells"].items():
            mine, theirs = cell["dev"]["score"], cell["dynabert_dev"]["score"]
            passes = cell["passes_in_dynabert"]
            lines.append(
                f"| {name} | {theirs:.4f} | {mine:.4f} | {mine - theirs:+.4f} | "
                f"{sum(passes.values())} ({passes['width_kd']} + {passes['depth_kd']}) | {cell['steps']} | "
                f"{cell['train_seconds']:.0f} |"
            )
        lines += ["", f"Report with the controls beside every method: `{summary['report']}`", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--project", type=Path, default=Path("."), help="project root (params.yaml, artifacts)"
    )
    parser.add_argument("--budget", nargs="+", choices=("passes", "wall"), default=["passes"])
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a params.yaml override"
    )
    parser.add_argument("--out", type=Path, help="write the raw result here (JSON)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_and_report(args, run, markdown)


if __name__ == "__main__":
    main()
