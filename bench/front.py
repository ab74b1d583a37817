"""Every method's candidates measured in one harness run: the cross-method front per profile (issues 18, 19).

    GLUE_DIR=../shared/data/glue python bench/front.py --project PROJECT --out bench/front.json [--set ...]

The flow measures each method in its own stage, at different times; on a shared 2-core machine the same
architecture can then measure tens of percent apart between two runs, which is enough to move a point on or
off a front. Here DynaBERT's grid, the Theseus successor, the ConvBERT students of ``bench/convbert.py``
and the same-size controls of each budget (``bench/controls.py``; the wall budget's names end in ``-wall``),
whichever the project has, are prepared together and timed in the same interleaved rounds, float32 and int8.
Writes
``PROJECT/reports/front/`` (report, plots, ``results.json``) and prints each profile's table and front.
Selection here has no quality floor (``evaluate_profiles.py`` does the same); the flow's has one.
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import Any

from common import front_p90, project_main, select_each

from dynaflow.config import load_params

REPORT = "reports/front"
CONVBERT_BENCH = "artifacts/convbert-bench"  # bench/convbert.py's students
CONTROLS = "artifacts/controls"
BUDGETS = ("passes", "wall")  # controls.budget: each one the project has joins the front


def collect(params: Any, root: Path) -> tuple[list[Any], dict[str, str]]:
    """The candidates of every method the project has, and where each method's came from."""
    from dynaflow.methods.convbert.candidates import student
    from dynaflow.methods.dynabert import candidates as dynabert
    from dynaflow.methods.dynabert.controls import cell_name, control_candidate
    from dynaflow.methods.theseus import candidates as theseus
    from dynaflow.models.backbone import load_elastic
    from stages.convbert import student_name
    from stages.registry import Layout

    layout = Layout(root)
    found, sources = [], {}
    found += dynabert.grid(load_elastic(layout.out("depth_kd")).eval(), params.widths, params.depths)
    sources["dynabert"] = str(layout.out("depth_kd"))
    if (layout.out("theseus") / "metrics.json").is_file():
        found.append(theseus.successor(layout.out("theseus")))
        sources["theseus"] = str(layout.out("theseus"))
    students = [root / CONVBERT_BENCH / student_name(g) for g in params.convbert.groups]
    if all((s / "metrics.json").is_file() for s in students):
        found += [student(s) for s in students]
        sources["convbert"] = str(root / CONVBERT_BENCH)
    for budget in BUDGETS:  # every cell trained so far: a wall-budget cell costs DynaBERT's whole run
        cells = [(root / CONTROLS / budget / cell_name(c), c) for c in params.controls.cells]
        cells = [(d, c) for d, c in cells if (d / "config.json").is_file()]
        if not cells:
            continue
        for d, c in cells:
            control = control_candidate(load_elastic(d).eval(), c, budget)
            if budget != "passes":  # the passes controls keep the names of earlier reports
                name, label = f"{control.name}-{budget}", f"{control.label}, {budget}"
                control = replace(control, name=name, label=label)
            found.append(control)
        sources["control"] = ", ".join(filter(None, [sources.get("control"), str(root / CONTROLS / budget)]))
    return found, sources


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dynaflow.core.artifacts import atomic_write_json
    from dynaflow.data.splits import read_task_meta
    from dynaflow.evaluation import machine
    from dynaflow.evaluation.export import reference_batch
    from dynaflow.evaluation.harness import measure, results_document
    from dynaflow.evaluation.report import write_report
    from dynaflow.evaluation.scoring import load_dev

    root = args.project.resolve()
    params = load_params(root / "params.yaml", args.set)
    cfg, data_dir = params.evaluate, root / "data" / "prepared"
    candidates, sources = collect(params, root)
    meta = read_task_meta(data_dir)
    with tempfile.TemporaryDirectory(prefix="dynaflow-front-") as work:
        entries = measure(candidates, cfg.profiles, meta["task"], load_dev(data_dir, meta["dev_splits"]), cfg,
                          reference_batch(data_dir, vocab_size=0), Path(work))  # fmt: skip
    results = results_document(list(sources), meta["task"], meta["main_metric"], sources, cfg,
                               machine.machine_info(), entries)  # fmt: skip
    select_each(results, cfg)
    out = root / REPORT
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", results)
    report = write_report(results, out)
    return {"project": str(root), "overrides": args.set, "report": str(report), "results": results}


def markdown(result: dict[str, Any]) -> str:
    from dynaflow.evaluation.report import profile_table

    lines = []
    for entry in result["results"]["profiles"]:
        if entry["status"] != "measured":
            continue
        name = entry["profile"]["name"]
        lines += [f"### {name} (foreign load {entry.get('foreign_load_cores', 0):.2f} cores)", "",
                  entry["selection"]["message"], ""]  # fmt: skip
        lines += profile_table(entry, result["results"]["main_metric"], "p90") + [""]
        front = [
            f"{r['candidate']} ({r['metric']:.4f}, {r['latency_p90_ms']:.1f} ms)"
            for r in front_p90(entry["rows"])
        ]
        lines += [f"Front (dev against p90): {' → '.join(front)}", ""]
    return "\n".join(lines + [f"Report: {result['report']}"])


def main() -> None:
    project_main(__doc__, run, markdown)


if __name__ == "__main__":
    main()
