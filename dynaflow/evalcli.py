"""``dynaflow export``, ``dynaflow report`` and ``dynaflow evaluate``: the evaluation stage's hand tools.

* ``export --width W --depth D [--onnx] [--out DIR]``: any sub-network of the trained model, checked
  against the elastic model, as a Hugging Face directory (plus ONNX) with a model card.
* ``report [--results PATH ...] [--out DIR]``: rebuild the report from stored results, merging profiles
  measured on other machines (``artifacts/evaluation-hw/*``) and other methods' points (Theseus).
* ``evaluate --profile NAME``: evaluate one hardware profile on this machine (what a Prefect worker on that
  hardware runs) into ``artifacts/evaluation-hw/NAME/``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dynaflow.config import ConfigError, load_params


def _root(args: argparse.Namespace) -> Path:
    return Path(args.params).resolve().parent


def _stored_metric(root: Path, model_dir: Path, width: float, depth: float) -> tuple[float | None, Any]:
    """(dev score, a measured row or None) for a grid point from the evaluation or the model's grid.json."""
    from dynaflow.report import RESULTS_FILE
    from dynaflow.selection import point_name
    from stages.evaluate import OUT

    name = point_name({"width": width, "depth": depth})
    results = root / OUT / RESULTS_FILE
    if results.is_file():
        for entry in json.loads(results.read_text()).get("profiles", []):
            for row in entry.get("rows", []):
                if point_name(row) == name:
                    return row["metric"], (entry, row)
    grid = model_dir / "grid.json"
    if grid.is_file():
        scores = json.loads(grid.read_text()).get(name)
        if scores:
            return scores.get("score"), None
    return None, None


def cmd_export(args: argparse.Namespace) -> int:
    from dynaflow.backbone import load_elastic
    from dynaflow.data import TOKENIZER_DIR, read_task_meta
    from dynaflow.export import label_names, reference_batch, write_export
    from dynaflow.modeling import validate_mult
    from dynaflow.selection import point_name
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
    name = point_name({"width": width, "depth": depth})
    if width not in params.widths or depth not in params.depths:
        print(f"note: {name} is not in the trained grid (widths {params.widths} x depths {params.depths}); "
              "it was not distilled for directly", file=sys.stderr)  # fmt: skip
    out = Path(args.out) if args.out else root / "exports" / name
    meta = read_task_meta(data_dir)
    model = load_elastic(model_dir).eval()
    metric, measured = _stored_metric(root, model_dir, width, depth)
    card: dict[str, Any] = {
        "task": meta["task"], "metric_name": meta["main_metric"], "metric": metric,
        "source": str(model_dir), "path": str(out),
    }  # fmt: skip
    if measured is not None:
        entry, row = measured
        card |= {
            "profile": entry["profile"], "threads": entry.get("threads"), "machine": entry.get("machine"),
            "latency": {"median_ms": row["latency_median_ms"], "p90_ms": row["latency_p90_ms"],
                        "repeats": row["repeats"]},
            "memory_mb": row.get("memory_mb"),
        }  # fmt: skip
    tokenizer = data_dir / TOKENIZER_DIR
    summary = write_export(
        model, width, depth, out, tokenizer_dir=tokenizer if tokenizer.is_dir() else None,
        batch=reference_batch(data_dir, model.config.vocab_size), onnx=args.onnx, labels=label_names(meta),
        card=card, opset=params.evaluate.onnx_opset, exporter=params.evaluate.onnx_exporter,
    )  # fmt: skip
    checks = f"max |Δ logit| HF {summary['diff_hf']:.2g}" + (
        f", ONNX {summary['diff_onnx']:.2g}" if "diff_onnx" in summary else ""
    )
    print(f"exported {name} ({summary['params'] / 1e6:.2f} M params; {checks}) to {out}")
    return 0


REPORT_OUT = "reports/evaluation"  # the merged report (not a stage output: rebuilt from stored results)


def default_results(root: Path) -> list[Path]:
    """The local evaluation, every profile measured by ``dynaflow evaluate --profile``, then Theseus's."""
    from dynaflow.report import RESULTS_FILE
    from stages.evaluate import HW_OUT, OUT
    from stages.theseus_eval import OUT as THESEUS_OUT

    found = [root / OUT] if (root / OUT / RESULTS_FILE).is_file() else []
    found += sorted(p.parent for p in (root / HW_OUT).glob(f"*/{RESULTS_FILE}"))
    return found + ([root / THESEUS_OUT] if (root / THESEUS_OUT / RESULTS_FILE).is_file() else [])


def rebuild_report(root: Path, paths: list[Path] | None = None, out: Path | None = None) -> tuple[Path, str]:
    """Merge stored results (default: :func:`default_results`) into one report; (report path, summary)."""
    from dynaflow.artifacts import atomic_write_json, check_output, write_manifest
    from dynaflow.report import (
        REPORT_FILE,
        RESULTS_FILE,
        load_results,
        merge_results,
        report_key,
        write_report,
    )

    paths = paths if paths else default_results(root)
    if not paths:
        raise ConfigError("no evaluation results found; run `dynaflow stage evaluate` (or pass --results)")
    try:
        merged = merge_results(load_results(paths))
    except FileNotFoundError as exc:
        raise ConfigError(str(exc)) from None
    out = out or root / REPORT_OUT
    compared = f", compared with {', '.join(merged['compared'])}" if merged["compared"] else ""
    note = f"report of {len(merged['profiles'])} profile(s) from {len(paths)} result set(s){compared}"
    key = report_key(merged)
    if check_output(out, key) is None:  # same results, same code, files untouched: plotting again is waste
        return out / REPORT_FILE, f"{note} (unchanged, not rebuilt)"
    report = write_report(merged, out)
    atomic_write_json(out / RESULTS_FILE, merged)
    write_manifest(out, key)  # last: a report cut off half-way has no manifest and is rebuilt next time
    return report, note


def cmd_report(args: argparse.Namespace) -> int:
    paths = [Path(p) for p in args.results] if args.results else None
    report, summary = rebuild_report(_root(args), paths, Path(args.out) if args.out else None)
    print(f"{summary}: {report}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from dynaflow.cli import _project_env
    from dynaflow.tracking import NullTracker, start_run
    from stages.evaluate import run_profile

    params = load_params(args.params, args.set)
    params.evaluate.profile(args.profile)
    root = _root(args)
    _project_env(root)
    tags = {"driver": "cli", "stage": "evaluate", "profile": args.profile}
    tracker = NullTracker() if args.no_track else start_run(root, f"evaluate-{args.profile}", tags)
    try:
        result = run_profile(params, root, args.profile, tracker)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    print(json.dumps({k: v for k, v in result.items() if k != "metrics"}, indent=2))
    return 0


def add_commands(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register the three commands on the ``dynaflow`` parser's subcommands."""
    p = sub.add_parser("export", help="export one sub-network (HF dir, optional ONNX), checked, with a card")
    common(p)
    p.add_argument("--width", type=float, required=True, help="width multiplier, e.g. 0.5")
    p.add_argument("--depth", type=float, required=True, help="depth multiplier, e.g. 0.75")
    p.add_argument("--onnx", action="store_true", help="also write model.onnx (checked with ONNX Runtime)")
    p.add_argument("--out", help="output directory (default: exports/w<W>_d<D>)")
    p.add_argument("--model", help="elastic model directory (default: the depth_kd output)")
    p.add_argument("--data", help="data stage output (default: data/prepared)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("report", help="rebuild the evaluation report from stored results")
    common(p)
    p.add_argument("--results", nargs="+", metavar="PATH",
                   help="results.json files or directories holding one (default: artifacts/evaluation, "
                   "artifacts/evaluation-hw/* and artifacts/theseus-evaluation)")  # fmt: skip
    p.add_argument("--out", help="output directory (default: reports/evaluation)")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("evaluate", help="evaluate one hardware profile on this machine")
    common(p)
    p.add_argument("--profile", required=True, help="a name from params.yaml evaluate.profiles")
    p.add_argument("--no-track", action="store_true", help="do not record the run in MLflow")
    p.set_defaults(func=cmd_evaluate)
