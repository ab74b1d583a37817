"""What every method's measurement stage does with its candidates: the shared harness, on every profile.

A method's measurement stage lists its candidates and calls :func:`measure_candidates`; the candidates are
dev-scored on the data stage's dev split and timed on every hardware profile present on this machine
(:mod:`dynaflow.evaluation.harness`). Outputs (``ctx.out``): ``results.json`` (the method's rows, the input
of the ``select`` stage and of ``dynaflow report``) and a ``report.md`` of the method alone; MLflow metrics.
Nothing is selected or exported here: selection runs over every method's candidates at once.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dynaflow.config import EvaluateConfig, HardwareProfile, Params
from dynaflow.core.artifacts import atomic_write_json
from dynaflow.data.splits import read_task_meta
from dynaflow.evaluation import hardware
from dynaflow.evaluation.candidates import Candidate
from dynaflow.evaluation.export import reference_batch
from dynaflow.evaluation.harness import flat_metrics, measure, results_document
from dynaflow.evaluation.report import RESULTS_FILE, write_report
from dynaflow.evaluation.scoring import load_dev
from stages.registry import StageContext


def this_machine(params: Params) -> list[Path]:
    """A measurement stage's external input: latency belongs to this machine, another one re-runs it."""
    return [hardware.machine_file()]


def measure_into(
    candidates: Sequence[Candidate],
    method: str,
    source: Path,
    data_dir: Path,
    profiles: Sequence[HardwareProfile],
    cfg: EvaluateConfig,
    root: Path,
    out_dir: Path,
) -> dict[str, Any]:
    """Measure ``candidates`` on ``profiles`` into ``out_dir/results.json``; return the results document."""
    meta = read_task_meta(data_dir)
    dev = load_dev(data_dir, meta["dev_splits"])
    with tempfile.TemporaryDirectory(prefix=f"dynaflow-measure-{method}-") as work:
        entries = measure(
            candidates, profiles, meta["task"], dev, cfg, reference_batch(data_dir, vocab_size=0), Path(work)
        )
    source_name = str(source.relative_to(root)) if source.is_relative_to(root) else str(source)
    results = results_document(
        [method],
        meta["task"],
        meta["main_metric"],
        {method: source_name},
        cfg,
        hardware.machine_info(),
        entries,
    )
    atomic_write_json(Path(out_dir) / RESULTS_FILE, results)
    return results


def measure_candidates(ctx: StageContext, method: str, source: Path, candidates: Sequence[Candidate]) -> dict:
    """The body of a method's measurement stage; returns the stage's flat metrics."""
    cfg = ctx.params.evaluate
    results = measure_into(
        candidates, method, source, ctx.upstream("data"), cfg.profiles, cfg, ctx.layout.root, ctx.out
    )
    report = write_report(results, ctx.out)
    metrics = flat_metrics(results["profiles"], results["main_metric"]) | {"candidates": len(candidates)}
    ctx.tracker.log_metrics(metrics)  # the tracker keeps the finite numbers
    ctx.tracker.log_artifact(ctx.out / RESULTS_FILE, "evaluation")
    ctx.tracker.log_artifact(report, "evaluation")
    return metrics
