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
from typing import TYPE_CHECKING, Any

from dynaflow.config import EvaluateConfig, HardwareProfile, Params
from dynaflow.core.artifacts import atomic_write_json
from dynaflow.data.splits import HELDOUT, read_task_meta
from dynaflow.evaluation import machine
from dynaflow.evaluation.report import RESULTS_FILE, write_report
from stages.registry import StageContext, extremes

# The harness (torch, ONNX Runtime) is imported where it is used: every stage module is imported to read
# the declarations (`dynaflow status`), and that must stay fast.
if TYPE_CHECKING:
    from dynaflow.evaluation.candidates import Candidate


def this_machine(params: Params) -> list[Path]:
    """A measurement stage's external input: latency belongs to this machine, another one re-runs it."""
    return [machine.machine_file()]


def measure_into(
    candidates: Sequence[Candidate],
    method: str,
    source: Path,
    data_dir: Path,
    profiles: Sequence[HardwareProfile],
    cfg: EvaluateConfig,
    root: Path,
    out_dir: Path,
    chosen_on: str | None = None,
) -> dict[str, Any]:
    """Measure ``candidates`` on ``profiles`` into ``out_dir/results.json``; return the results document."""
    from dynaflow.evaluation.export import reference_batch
    from dynaflow.evaluation.harness import measure, results_document
    from dynaflow.evaluation.scoring import load_dev

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
        machine.machine_info(),
        entries,
        {method: chosen_on} if chosen_on else None,
    )
    atomic_write_json(Path(out_dir) / RESULTS_FILE, results)
    return results


def measurement_headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """A measurement stage's row of `dvc metrics show`: its candidates and their best and worst dev score."""
    return {"candidates": metrics["candidates"]} | extremes(
        [v for k, v in metrics.items() if k.startswith("dev.")]
    )


def chosen_on(selection: str | None, data_dir: Path) -> str | None:
    """How a training stage's ``selection`` chose the weights, in words for the report (None: not said)."""
    if selection is None:
        return None
    if selection == "heldout":
        n = read_task_meta(data_dir)["counts"].get(HELDOUT, 0)
        return f"{n} held-out training rows, never trained on (dev unseen)"
    if selection == "dev":
        return "dev, as the official code (the dev scores shown also chose the checkpoint: optimistic)"
    return "nothing: the last step's weights"


def measure_candidates(
    ctx: StageContext,
    method: str,
    source: Path,
    candidates: Sequence[Candidate],
    selection: str | None = None,
) -> dict:
    """The body of a method's measurement stage; returns the stage's flat metrics. ``selection``: how the
    training stage chose the weights the candidates come from (heldout, dev or last), for the report."""
    from dynaflow.evaluation.harness import flat_metrics

    cfg = ctx.params.evaluate
    data_dir = ctx.upstream("data")
    results = measure_into(candidates, method, source, data_dir, cfg.profiles, cfg, ctx.layout.root, ctx.out,
                           chosen_on(selection, data_dir))  # fmt: skip
    report = write_report(results, ctx.out)
    metrics = flat_metrics(results["profiles"], results["main_metric"]) | {"candidates": len(candidates)}
    ctx.tracker.log_metrics(metrics)  # the tracker keeps the finite numbers
    ctx.tracker.log_artifact(ctx.out / RESULTS_FILE, "evaluation")
    ctx.tracker.log_artifact(report, "evaluation")
    return metrics
