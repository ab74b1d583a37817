"""ConvBERT students beside DynaBERT and Theseus (issue 19), on a project where those already ran.

    GLUE_DIR=../shared/data/glue python bench/convbert.py --project PROJECT --out bench/convbert.json \\
        [--set convbert.epochs=3 ...]

Trains each ``convbert.groups`` student with the convbert stage's own function from the project's data,
teacher and rewired teacher (the same inputs the DynaBERT flow used: equal terms), into
``PROJECT/artifacts/convbert-bench/g<groups>/`` (a student already there is reused), measures them with the
shared harness on every profile of the project's ``evaluate`` section, and merges them with the project's
selection into ``PROJECT/reports/convbert/``. It calls the stage function, not the flow, so a project
made by an older dynaflow (other cache keys) is compared as it is instead of being rebuilt.

Prints, per student, dev score, parameters, FLOPs, the padding effect, training time, and latency on
every profile; then each profile's Pareto front of the merged report.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from common import front_p90, project_main, settings_fingerprint, trained_once

from dynaflow.config import load_params
from dynaflow.core.tracking import NullTracker

OUT = "artifacts/convbert-bench"
REPORT = "reports/convbert"


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dynaflow.methods.convbert import METHOD
    from dynaflow.methods.convbert.candidates import student
    from stages.convbert import distil_student, student_name
    from stages.measure import chosen_on, measure_into
    from stages.registry import Layout
    from stages.select import STAGE as SELECT
    from stages.select import rebuild_report

    root = args.project.resolve()
    params, layout = load_params(root / "params.yaml", args.set), Layout(root)
    where = root / OUT
    trained: dict[str, Any] = {}
    for groups in params.convbert.groups:
        name = student_name(groups)
        trained[name] = trained_once(where / name, lambda folder, groups=groups, name=name: distil_student(
            params.convbert, groups, params.seed, layout.out("rewire"), layout.out("teacher"),
            layout.out("data"), folder, layout.work(f"convbert-bench-{name}"),
            settings_fingerprint(params.convbert, params.seed), NullTracker(),
        ))  # fmt: skip
    candidates = [student(where / student_name(g)) for g in params.convbert.groups]
    data_dir, cfg = layout.out("data"), params.evaluate
    results = measure_into(candidates, METHOD, where, data_dir, cfg.profiles, cfg, root, where,
                           chosen_on(params.convbert.selection, data_dir))  # fmt: skip
    report, _ = rebuild_report(root, [root / SELECT.out, where], root / REPORT)
    merged = json.loads((root / REPORT / "results.json").read_text())
    return {
        "project": str(root),
        "overrides": args.set,
        "convbert": params.convbert.model_dump(),
        "students": trained,
        "results": results,
        "fronts": fronts(merged),
        "report": str(report.relative_to(root)),
    }


def fronts(merged: dict[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Each measured profile's Pareto front (dev metric against p90 latency), fastest first."""
    keep = ("candidate", "precision", "metric", "latency_p90_ms")
    return {
        e["profile"]["name"]: [{k: r[k] for k in keep} for r in front_p90(e["rows"])]
        for e in merged["profiles"]
        if e["status"] == "measured"
    }


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| student | dev | params (M) | GFLOPs/seq | padding: max logit diff, changed predictions "
        "| steps (kept) | training s |",
        "|---|---:|---:|---:|---|---:|---:|",
    ]
    gflops = {r["name"]: r["gflops_per_seq"] for e in result["results"]["profiles"] for r in e["rows"]}
    for name, m in result["students"].items():
        lines.append(
            f"| {name} | {m['score']:.4f} | {m['parameters'] / 1e6:.2f} | {gflops.get(name, 0.0):.3f} "
            f"| {m['padding.max_logit_diff']:.3g}, {m['padding.changed_predictions']:.2%} "
            f"| {m['steps']} ({m['selected_step']}) | {m['train_seconds']:.0f} |"
        )
    lines += [
        "",
        "| profile | candidate | precision | dev | p50 ms | p90 ms | memory MiB |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for entry in result["results"]["profiles"]:
        for r in entry["rows"]:
            memory = f"{r['memory_mb']:.0f}" if r.get("memory_mb") is not None else "–"
            lines.append(
                f"| {entry['profile']['name']} | {r['candidate']} | {r['precision']} | {r['metric']:.4f} "
                f"| {r['latency_median_ms']:.2f} | {r['latency_p90_ms']:.2f} | {memory} |"
            )
    for profile, front in result["fronts"].items():
        points = " → ".join(
            f"{p['candidate']} ({p['metric']:.4f}, {p['latency_p90_ms']:.1f} ms)" for p in front
        )
        lines += ["", f"Front `{profile}`: {points}"]
    return "\n".join(lines + ["", f"Merged report: `{result['report']}`"])


def main() -> None:
    project_main(__doc__, run, markdown)


if __name__ == "__main__":
    main()
