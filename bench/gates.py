"""Token gates and PoWER-BERT beside the teacher and DynaBERT (issue 15), on a project where those ran.

    GLUE_DIR=../shared/data/glue python bench/gates.py --project PROJECT --out bench/gates.json \\
        [--train-only] [--set gates.lambdas=[...] ...]

Trains one gated model per ``gates.lambdas`` and one PoWER-BERT model per ``powerbert.lambdas`` with the
stages' own functions from the project's data and teacher (the inputs DynaBERT used: equal terms), into
``PROJECT/artifacts/gates-bench/{gates,powerbert}/l<λ>/`` (a model already there is reused), and, when the
project trained DynaBERT, gates on every ``gates_dynabert.subnetworks`` cell per ``gates_dynabert.lambdas``
(``.../gates_dynabert/w<width>_d<depth>-l<λ>/``: width x depth x length), measures them
with the shared harness on every profile of the project's ``evaluate`` section (``--set
evaluate.latency_inputs=dev`` times every candidate on the dev inputs, dynamically padded), and merges them
with the project's selection into ``PROJECT/reports/gates/``. Calls stage functions, not the flow, so a
project made by an older dynaflow is compared as it is instead of being rebuilt.

Prints, per model, dev score (hard and soft form), tokens kept per layer, encoder FLOPs per dev example
against the teacher's, training time, and latency on every profile; then each profile's Pareto front.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from common import baselines, fronts, measure_together, project_main, settings_fingerprint, trained_once

from dynaflow.config import load_params
from dynaflow.core.tracking import NullTracker

OUT = "artifacts/gates-bench"
REPORT = "reports/gates"


def train_family(root: Path, params: Any, family: str, train: Any) -> dict[str, Any]:
    """Every λ of ``family`` (gates or powerbert), trained unless already there; their metrics."""
    from stages.gates import run_name
    from stages.registry import Layout

    layout, where, trained = Layout(root), root / OUT / family, {}
    fingerprint = settings_fingerprint(getattr(params, family), params.seed)
    for lam in getattr(params, family).lambdas:
        name = run_name(lam)
        trained[name] = trained_once(where / name, lambda folder, lam=lam, name=name: train(
            params, lam, layout.out("teacher"), layout.out("data"), folder,
            layout.work(f"gates-bench-{family}-{name}"), fingerprint, NullTracker(),
        ))  # fmt: skip
    return trained


def train_cells(root: Path, params: Any) -> dict[str, Any]:
    """Gates on each DynaBERT cell and λ of ``gates_dynabert`` (the project's depth_kd model), as the
    gates_dynabert stage trains them; nothing when the project has no DynaBERT."""
    from functools import cache

    from stages.gates_dynabert import cell_run_name, check_cells, resolve_distil_from, train_cell
    from stages.registry import Layout

    layout, trained = Layout(root), {}
    if not (layout.out("depth_kd") / "config.json").is_file():
        return trained
    check_cells(params)
    dirs = {name: layout.out(name) for name in ("data", "teacher", "depth_kd")}
    section = params.gates_dynabert
    fingerprint = settings_fingerprint(params.gates, params.seed)
    # once, and only when a model is trained: auto scores the teacher and DynaBERT on the held-out rows
    chosen = cache(lambda: resolve_distil_from(section.distil_from, dirs, params.gates.eval_batch_size))
    for cell in section.subnetworks:
        for lam in section.lambdas:
            name = cell_run_name(cell, lam, section.distil_from)
            work = layout.work(f"gates-bench-cells-{name}")

            def train(folder: Path, c: Any = cell, lam: float = lam, work: Path = work) -> dict[str, Any]:
                return train_cell(params, c, lam, chosen(), dirs, folder, work, fingerprint, NullTracker())

            trained[name] = trained_once(root / OUT / "gates_dynabert" / name, train)
    return trained


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dynaflow.evaluation.report import write_report
    from dynaflow.methods.gates import GATES_ON_DYNABERT, METHOD, POWER_BERT
    from dynaflow.methods.gates.candidates import gated_model
    from stages.gates import run_name, train_gates
    from stages.powerbert import train_power_bert

    root = args.project.resolve()
    params = load_params(root / "params.yaml", args.set)
    trained = {"gates": train_family(root, params, "gates", train_gates),
               "powerbert": train_family(root, params, "powerbert", train_power_bert),
               "gates_dynabert": train_cells(root, params)}  # fmt: skip
    if args.train_only:
        return {"project": str(root), "overrides": args.set, "trained": trained,
                "against_powerbert": against_power_bert(trained)}  # fmt: skip
    found = baselines(root, params)
    for method, family in ((METHOD, "gates"), (POWER_BERT, "powerbert")):
        where = root / OUT / family
        found += [gated_model(where / run_name(lam), method) for lam in getattr(params, family).lambdas]
    cells = root / OUT / "gates_dynabert"
    found += [gated_model(cells / name, GATES_ON_DYNABERT) for name in trained["gates_dynabert"]]
    results = measure_together(root, params, found, OUT)
    report = write_report(results, root / REPORT)
    return {
        "project": str(root),
        "overrides": args.set,
        "gates": params.gates.model_dump(),
        "powerbert": params.powerbert.model_dump(),
        "gates_dynabert": params.gates_dynabert.model_dump(),
        "trained": trained,
        "results": results,
        "fronts": fronts(results),
        "against_powerbert": against_power_bert(trained),
        "report": str(report.relative_to(root)),
    }


def against_power_bert(trained: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Each gated model's dev score minus PoWER-BERT's at the same FLOPs reduction, read off PoWER-BERT's
    curve (its models and the teacher at 1x, linearly between neighbours); absent outside the curve."""
    runs = list(trained["powerbert"].values())
    if not runs:
        return {}
    first = runs[0]
    curve = sorted([(1.0, first["teacher.score"])] + [(m["flops_reduction"], m["score"]) for m in runs])
    compared = {}
    for name, m in trained["gates"].items():  # not gates_dynabert: its reductions are against its cell
        x = m["flops_reduction"]
        for (x0, y0), (x1, y1) in zip(curve, curve[1:], strict=False):
            if x0 <= x <= x1:
                at = y0 + (y1 - y0) * (x - x0) / (x1 - x0) if x1 > x0 else y0
                compared[f"gates/{name}"] = {"flops_reduction": x, "score": m["score"], "powerbert_score": at,
                                             "difference": m["score"] - at}  # fmt: skip
    return compared


def markdown(result: dict[str, Any]) -> str:
    lines = ["| model | λ | dev (hard) | dev (soft) | tokens per layer (dev mean) | GFLOPs/example "
             "| vs teacher "
             "| train s |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for family, runs in result["trained"].items():
        for name, m in runs.items():
            lines.append(
                f"| {family}/{name} | {m['lambda']:g} | {m['score']:.4f} | {m['soft.score']:.4f} | "
                f"{m['kept_per_layer']} | {m['gflops_per_example']:.3f} | {m['flops_reduction']:.2f}x | "
                f"{m['wall_seconds']:.0f} |"
            )
    lines += ["\n| gated model | fewer FLOPs | dev | PoWER-BERT at those FLOPs | difference |",
              "|---|---|---|---|---|"]  # fmt: skip
    for name, c in result.get("against_powerbert", {}).items():
        lines.append(f"| {name} | {c['flops_reduction']:.2f}x | {c['score']:.4f} "
                     f"| {c['powerbert_score']:.4f} | {c['difference'] * 100:+.2f} pts |")  # fmt: skip
    for entry in result.get("results", {}).get("profiles", []):
        if entry["status"] != "measured":
            continue
        lines += [f"\n{entry['profile']['name']} (dev batches of {entry['profile']['batch_size']}):",
                  "| candidate | dev | GFLOPs/dev example | median ms | p90 ms |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in sorted(entry["rows"], key=lambda r: r["latency_median_ms"]):
            flops = r.get("gflops_per_dev_example")
            shown = "-" if flops is None else f"{flops:.3f}"
            lines.append(f"| {r['candidate']} | {r['metric']:.4f} | {shown} "
                         f"| {r['latency_median_ms']:.2f} | {r['latency_p90_ms']:.2f} |")  # fmt: skip
        lines.append(f"front (p90): {', '.join(result['fronts'][entry['profile']['name']])}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.argv, train_only = [a for a in sys.argv if a != "--train-only"], "--train-only" in sys.argv
    project_main(__doc__, lambda args: run(argparse.Namespace(**vars(args), train_only=train_only)), markdown)
