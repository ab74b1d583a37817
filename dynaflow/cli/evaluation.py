"""``dynaflow export``, ``dynaflow report`` and ``dynaflow evaluate``: the evaluation's hand tools.

* ``export --width W --depth D [--onnx] [--out DIR]``: any DynaBERT sub-network of the trained model,
  checked against the elastic model, as a Hugging Face directory (plus ONNX) with a model card.
* ``report [--results PATH ...] [--out DIR]``: rebuild the report from stored results, merging profiles
  measured on other machines (``artifacts/evaluation-hw/*``) into the local selection.
* ``evaluate --profile NAME``: measure one hardware profile on this machine, every method's candidates,
  then select and export for it (what a Prefect worker on that hardware runs) into
  ``artifacts/evaluation-hw/NAME/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dynaflow.cli.env import project_env
from dynaflow.config import ConfigError, load_params


def _root(args: argparse.Namespace) -> Path:
    return Path(args.params).resolve().parent


def _stored_row(root: Path, candidate: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(profile entry, measured row) of a candidate from the selection's or DynaBERT's stored results."""
    from dynaflow.evaluation.report import RESULTS_FILE
    from stages import STAGES

    for stage in ("select", "evaluate"):
        results = root / STAGES[stage].out / RESULTS_FILE
        if results.is_file():
            for entry in json.loads(results.read_text()).get("profiles", []):
                for row in entry.get("rows", []):
                    if row.get("candidate") == candidate:
                        return entry, row
    return None


def _grid_metric(model_dir: Path, name: str) -> float | None:
    grid = model_dir / "grid.json"
    scores = json.loads(grid.read_text()).get(name) if grid.is_file() else None
    return scores.get("score") if scores else None


def cmd_export(args: argparse.Namespace) -> int:
    from dynaflow.data.splits import TOKENIZER_DIR, load_split, read_task_meta
    from dynaflow.evaluation.export import export_candidate, label_names, reference_batch
    from dynaflow.methods.dynabert.candidates import subnetwork
    from dynaflow.models.backbone import load_elastic
    from dynaflow.models.elastic_bert import validate_mult
    from stages import Layout

    params = load_params(args.params, args.set)
    root = _root(args)
    layout = Layout(root)
    model_dir = Path(args.model) if args.model else layout.out("depth_kd")
    data_dir = Path(args.data) if args.data else layout.out("data")
    try:
        width, depth = validate_mult("--width", args.width), validate_mult("--depth", args.depth)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    needed = ((model_dir, "trained model (depth_kd output)"), (data_dir / "task.json", "data stage output"))
    for path, what in needed:
        if not path.exists():
            raise ConfigError(f"{path}: no {what}; run `dynaflow run` first or pass --model / --data")
    candidate = subnetwork(load_elastic(model_dir).eval(), width, depth)
    if width not in params.widths or depth not in params.depths:
        print(f"note: {candidate.name} is not in the trained grid (widths {params.widths} x depths "
              f"{params.depths}); it was not distilled for directly", file=sys.stderr)  # fmt: skip
    out = Path(args.out) if args.out else root / "exports" / candidate.name
    meta = read_task_meta(data_dir)
    card: dict[str, Any] = {
        "task": meta["task"], "metric_name": meta["main_metric"],
        "metric": _grid_metric(model_dir, candidate.name), "source": str(model_dir), "path": str(out),
    }  # fmt: skip
    measured = _stored_row(root, candidate.id)
    if measured is not None:
        entry, row = measured
        card |= {
            "metric": row["metric"], "profile": entry["profile"], "threads": entry.get("threads"),
            "machine": entry.get("machine"),
            "latency": {"median_ms": row["latency_median_ms"], "p90_ms": row["latency_p90_ms"],
                        "repeats": row["repeats"]},
            "memory_mb": row.get("memory_mb"),
        }  # fmt: skip
    tokenizer = data_dir / TOKENIZER_DIR
    int8_dev = load_split(data_dir, meta["dev_splits"][0]) if args.int8 else None
    summary = export_candidate(
        candidate, out, tokenizer_dir=tokenizer if tokenizer.is_dir() else None,
        batch=reference_batch(data_dir, vocab_size=0), onnx=args.onnx or args.int8, labels=label_names(meta),
        card=card, opset=params.evaluate.onnx_opset, exporter=params.evaluate.onnx_exporter,
        int8_dev=int8_dev, min_agreement=params.evaluate.int8_min_agreement,
        int8_recipe=params.evaluate.int8_recipe,
    )  # fmt: skip
    checks = f"max |Δ logit| HF {summary['diff_hf']:.2g}" + (
        f", ONNX {summary['diff_onnx']:.2g}" if "diff_onnx" in summary else ""
    )
    if q := summary.get("int8"):
        checks += f"; int8 agrees on {q['agreement']:.1%} of dev" if q["agreement"] is not None else ""
    print(f"exported {candidate.name} ({summary['params'] / 1e6:.2f} M params; {checks}) to {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from stages.select import rebuild_report

    paths = [Path(p) for p in args.results] if args.results else None
    try:
        report, summary = rebuild_report(_root(args), paths, Path(args.out) if args.out else None)
    except (FileNotFoundError, ValueError) as exc:
        raise ConfigError(str(exc)) from None
    print(f"{summary}: {report}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dynaflow.core.tracking import NullTracker, end_status, start_run
    from stages.select import measure_profile_here

    params = load_params(args.params, args.set)
    params.evaluate.profile(args.profile)
    root = _root(args)
    project_env(root)
    tags = {"driver": "cli", "stage": "evaluate", "profile": args.profile}
    tracker = NullTracker() if args.no_track else start_run(root, f"evaluate-{args.profile}", tags)
    try:
        result = measure_profile_here(params, root, args.profile, tracker)
    except BaseException as exc:
        tracker.end(end_status(exc))
        raise
    tracker.end()
    print(json.dumps({k: v for k, v in result.items() if k != "metrics"}, indent=2))
    return 0


def cmd_controls(args: argparse.Namespace) -> int:
    from dynaflow.core.tracking import NullTracker, end_status, start_run
    from stages.controls import run_controls

    overrides = [*args.set, *([f"controls.budget={args.budget}"] if args.budget else [])]
    params = load_params(args.params, overrides)
    root = _root(args)
    project_env(root)
    tags = {"driver": "cli", "stage": "controls", "budget": params.controls.budget}
    tracker = NullTracker() if args.no_track else start_run(root, f"controls-{params.controls.budget}", tags)
    try:
        summary = run_controls(params, root, tracker)
    except BaseException as exc:
        tracker.end(end_status(exc))
        raise
    tracker.end()
    metric = summary["main_metric"]
    print(f"same-size controls ({summary['budget']}), dev {metric}: DynaBERT's cell | trained alone | steps")
    for name, cell in summary["cells"].items():
        print(f"  {name}: {cell['dynabert_dev']['score']:.4f} | {cell['dev']['score']:.4f} | {cell['steps']} "
              f"(DynaBERT: {sum(cell['passes_in_dynabert'].values())})")  # fmt: skip
    print(f"report with the controls: {summary['report']}")
    return 0


def add_commands(sub: Any, common: Callable[..., None]) -> None:
    """Register the evaluation commands on the ``dynaflow`` parser's subcommands."""
    p = sub.add_parser("export", help="export one sub-network (HF dir, optional ONNX), checked, with a card")
    common(p, writes=True)
    p.add_argument("--width", type=float, required=True, help="width multiplier, e.g. 0.5")
    p.add_argument("--depth", type=float, required=True, help="depth multiplier, e.g. 0.75")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (checked with ONNX Runtime)")
    p.add_argument("--int8", action="store_true",
                   help="also write model.int8.onnx (dynamic int8, checked against the float model on dev; "
                   "implies --onnx)")  # fmt: skip
    p.add_argument("--out", help="output directory (default: exports/w<W>_d<D>)")
    p.add_argument("--model", help="elastic model directory (default: the depth_kd output)")
    p.add_argument("--data", help="data stage output (default: data/prepared)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="rebuild the evaluation report from stored results")
    common(p, writes=True)
    p.add_argument("--results", nargs="+", metavar="PATH",
                   help="results.json files or directories holding one (default: artifacts/selection and "
                   "artifacts/evaluation-hw/*)")  # fmt: skip
    p.add_argument("--out", help="output directory (default: reports/evaluation)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser(
        "evaluate", help="measure one hardware profile on this machine, every method, then select and export"
    )
    common(p, writes=True)
    p.add_argument("--profile", required=True, help="a name from params.yaml evaluate.profiles")
    p.add_argument("--no-track", action="store_true", help="do not record the run in MLflow")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "controls", help="same-size controls: DynaBERT grid cells distilled alone, measured and reported"
    )
    common(p, writes=True)
    p.add_argument("--budget", choices=("passes", "wall"), help="= --set controls.budget=...")
    p.add_argument("--no-track", action="store_true", help="do not record the run in MLflow")
    p.set_defaults(func=cmd_controls)
