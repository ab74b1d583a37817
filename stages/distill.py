"""Distillation stages: width-adaptive (DynaBERT_W), then width-and-depth (DynaBERT).

* ``width``: student = the rewired teacher, teacher = the fine-tuned teacher (fixed); widths only.
* ``depth``: student and teacher both start from DynaBERT_W (the teacher fixed); widths × depths, then
  optionally final fine-tuning of every sub-network on labels.

Checkpoint selection follows the official code: at each evaluation (every ``eval_every`` steps, or each
epoch end) every sub-network is scored and the weights with the best *sum* of main scores are kept. By
default (``selection: heldout``) they are scored on the data stage's held-out training rows, never trained
on; the official code selects on dev (``selection: dev``), which is also what gets reported, so its dev
scores are optimistic. ``last`` keeps the final weights.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynaflow.config import DepthDistillConfig, DistillConfig
from dynaflow.core.artifacts import atomic_write_json
from dynaflow.core.plots import LOSS_CURVE, curve_records, grid_heatmap, loss_plot
from dynaflow.core.tracking import NullTracker
from dynaflow.data.splits import TOKENIZER_DIR, TokenizedSplit, load_split, read_task_meta
from stages.registry import Stage, StageContext, extremes, register

# The training machinery (torch, transformers) is imported inside the functions that use it, as in every
# stage module: `dynaflow status` imports them all to read the declarations and must stay fast.
if TYPE_CHECKING:
    import torch

    from dynaflow.methods.dynabert.distill import SubnetGrid, TeacherCache
    from dynaflow.training.loop import TrainConfig

log = logging.getLogger(__name__)


def build_teacher_cache(
    teacher: torch.nn.Module, train: TokenizedSplit, grid: SubnetGrid, teacher_width: str, cfg: TrainConfig
) -> TeacherCache:
    """The teacher's outputs for every training example, once, at every width the step will ask for."""
    from dynaflow.core.distributed import device
    from dynaflow.methods.dynabert.distill import TeacherCache, pad_lengths
    from dynaflow.training import precision

    started = time.perf_counter()
    widths = [1.0] if teacher_width == "full" else list(grid.widths)
    lengths = pad_lengths(train, cfg.batch_size, cfg.seed, cfg.epochs)
    dev, pad_id = device(), teacher.config.pad_token_id or 0
    cache = TeacherCache(teacher, train, lengths, widths, cfg.batch_size, pad_id, dev,
                         precision.resolve(cfg.precision, dev))  # fmt: skip
    log.info("teacher outputs cached for %d examples at %d width(s): %.0f MiB in %.1f s", len(train),
             len(widths), cache.nbytes / 2**20, time.perf_counter() - started)  # fmt: skip
    return cache


def final_finetune(
    student: torch.nn.Module,
    train: TokenizedSplit,
    grid: SubnetGrid,
    regression: bool,
    cfg: DistillConfig | DepthDistillConfig,
    seed: int,
    epochs: int,
    checkpoint: Path,
    fingerprint: str,
    tracker: NullTracker,
) -> None:
    """The optional label phase after distillation: every sub-network of ``grid`` on the task labels.

    A short phase: the section's batch size, learning rate and clipping, but no warm-up, weight decay or
    mid-epoch checkpoints.
    """
    from dynaflow.methods.dynabert.distill import make_label_step
    from dynaflow.training.loop import TrainConfig, fit

    finetune_cfg = TrainConfig.from_section(
        cfg, seed, epochs=epochs, warmup_ratio=0.0, weight_decay=0.0, checkpoint_steps=0
    )
    fit(
        student, train, make_label_step(student, grid, regression), finetune_cfg, checkpoint=checkpoint,
        fingerprint=fingerprint, tracker=tracker, desc="final-finetune",
        pad_id=student.config.pad_token_id or 0,
    )  # fmt: skip


def distill(
    phase: str,
    cfg: DistillConfig | DepthDistillConfig,
    widths: list[float],
    depths: list[float],
    seed: int,
    student_dir: Path,
    teacher_dir: Path,
    train_dir: Path,
    data_dir: Path,
    out_dir: Path,
    work_dir: Path,
    fingerprint: str,
    tracker: NullTracker,
    on_step: Any = None,
    max_steps: int | None = None,
) -> dict[str, Any]:
    """Distil ``student_dir`` from ``teacher_dir`` over the grid ``widths`` x ``depths`` (``depths`` is
    ``[1.0]`` in the width phase); ``max_steps``: stop there (the same-size controls), else every epoch."""
    if phase not in ("width", "depth"):
        raise ValueError(f"phase must be 'width' or 'depth', got {phase!r}")
    import torch

    from dynaflow.core.distributed import device
    from dynaflow.evaluation.scoring import load_dev
    from dynaflow.methods.dynabert.distill import DistillStep, SubnetGrid, SubnetSampler
    from dynaflow.methods.dynabert.grid import evaluate_grid
    from dynaflow.models.backbone import load_elastic
    from dynaflow.training.loop import TrainConfig, fit
    from dynaflow.training.selection import BestWeights, selection_split

    meta = read_task_meta(data_dir)
    task, regression = meta["task"], meta["is_regression"]
    train = load_split(train_dir, "train")
    dev = load_dev(data_dir, meta["dev_splits"])
    chooser = selection_split(cfg.selection, data_dir, dev)

    torch.manual_seed(seed)
    student, teacher = load_elastic(student_dir), load_elastic(teacher_dir)
    teacher.to(device())  # fit moves the student; on CPU both stay where they are
    for p in teacher.parameters():
        p.requires_grad_(False)
    grid = SubnetGrid(tuple(widths), (1.0,) if phase == "width" else tuple(depths))
    teacher_width = getattr(cfg, "teacher_width", "full")
    train_cfg = TrainConfig.from_section(cfg, seed, max_steps=max_steps)
    cache = build_teacher_cache(teacher, train, grid, teacher_width, train_cfg) if cfg.teacher_cache else None
    step = DistillStep(
        student, teacher, SubnetSampler(grid, cfg.subnets, cfg.random_subnets, seed),
        lambda_logit=cfg.lambda_logit, lambda_hidden=cfg.lambda_hidden, is_regression=regression,
        teacher_width=teacher_width, cache=cache,
    )  # fmt: skip

    best = BestWeights(student)  # by the summed score over all sub-networks

    def select(at_step: int) -> dict[str, float]:
        assert chooser is not None
        widths, depths = list(grid.widths), list(grid.depths)
        results = evaluate_grid(student, task, chooser, widths, depths, cfg.eval_batch_size)
        total = sum(r["score"] for r in results.values())
        best.offer(at_step, total, results)
        log.info("%s distillation, step %d: summed selection score %.4f (best %.4f at step %d)",
                 phase, at_step, total, best.score, best.step)  # fmt: skip
        return {"selection.sum": total, **{f"selection.{k}": r["score"] for k, r in results.items()}}

    steps_per_epoch = -(-len(train) // cfg.batch_size)
    evaluate_now = cfg.selection != "last" and cfg.eval_every > 0

    def on_each_step(at_step: int) -> dict[str, float] | None:
        if on_step is not None:
            on_step(at_step)
        return select(at_step) if evaluate_now and at_step % cfg.eval_every == 0 else None

    def on_epoch_end(epoch: int) -> dict[str, float]:
        at_step = epoch * steps_per_epoch if max_steps is None else min(epoch * steps_per_epoch, max_steps)
        if cfg.selection == "last" or (cfg.eval_every and at_step % cfg.eval_every == 0):
            return {}  # nothing to select, or just evaluated at this very step
        return select(at_step)

    result = fit(
        student, train, step, train_cfg, checkpoint=work_dir / "checkpoint.pt", fingerprint=fingerprint,
        tracker=tracker, on_epoch_end=on_epoch_end, on_step=on_each_step, before_step=step.begin,
        extra_state=best.checkpoint_state, desc=f"distill-{phase}",
        pad_id=student.config.pad_token_id or 0,
    )  # fmt: skip
    if best.restore() is not None:
        log.info("%s distillation: keeping the weights of step %d (selection on %s)", phase, best.step,
                 cfg.selection)  # fmt: skip

    finetune_epochs = getattr(cfg, "final_finetune_epochs", 0)
    if finetune_epochs:
        final_finetune(student, train, grid, regression, cfg, seed, finetune_epochs,
                       work_dir / "finetune.pt", fingerprint, tracker)  # fmt: skip

    if cfg.selection == "dev" and best.results is not None and not finetune_epochs:
        results = best.results  # the kept weights' dev scores: measured when they were selected
    else:
        results = evaluate_grid(student, task, dev, list(grid.widths), list(grid.depths), cfg.eval_batch_size)
    student.save_pretrained(out_dir, safe_serialization=True)
    shutil.copytree(data_dir / TOKENIZER_DIR, out_dir, dirs_exist_ok=True)
    atomic_write_json(out_dir / "grid.json", results)
    atomic_write_json(out_dir / LOSS_CURVE, curve_records(result.loss_history))
    bars = [{"sub_network": name, "score": r["score"]} for name, r in results.items()]
    atomic_write_json(out_dir / GRID_PLOT, bars)
    grid_heatmap(
        {k: r["score"] for k, r in results.items()}, list(grid.widths), list(grid.depths),
        f"DynaBERT{'_W' if phase == 'width' else ''} dev {meta['main_metric']} ({task})",
        out_dir / "grid.png",
    )  # fmt: skip
    tracker.log_artifact(out_dir / "grid.png")
    tracker.log_artifact(out_dir / "grid.json")
    metrics: dict[str, Any] = {f"dev.{k}.{m}": v for k, r in results.items() for m, v in r.items()}
    metrics |= {
        "selected_step": result.global_step if cfg.selection == "last" else best.step,
        "train_seconds": result.seconds,
        "examples_per_second": result.examples_per_second,
        "train_examples": len(train),
        "bf16": float(result.precision == "bf16"),
    }
    tracker.log_metrics(metrics)
    log.info(
        "%s distillation dev scores: %s",
        phase,
        json.dumps({k: round(r["score"], 4) for k, r in results.items()}),
    )
    return metrics


def run_phase(ctx: StageContext, phase: str, student: str, teacher: str) -> dict[str, Any]:
    """One distillation stage: ``student`` and ``teacher`` name the upstream stages they start from."""
    p = ctx.params
    return distill(
        phase, p.width_kd if phase == "width" else p.depth_kd, p.widths, p.depths, p.seed,
        student_dir=ctx.upstream(student), teacher_dir=ctx.upstream(teacher),
        train_dir=ctx.upstream("augment"), data_dir=ctx.upstream("data"), out_dir=ctx.out, work_dir=ctx.work,
        fingerprint=ctx.key, tracker=ctx.tracker,
    )  # fmt: skip


GRID_PLOT = "grid_plot.json"  # the grid as records, for `dvc plots`


def distill_plots(title: str) -> dict[str, dict[str, str]]:
    grid = {"x": "score", "y": "sub_network", "template": "bar_horizontal", "title": f"{title}: dev score"}
    return loss_plot(f"{title}: training loss") | {GRID_PLOT: grid}


def grid_headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The grid's best and worst dev score, the training examples and seconds."""
    scores = [v for k, v in metrics.items() if k.startswith("dev.") and k.endswith(".score")]
    return extremes(scores) | {"examples": metrics["train_examples"], "seconds": metrics["train_seconds"]}


def run_width(ctx: StageContext) -> dict[str, Any]:
    return run_phase(ctx, "width", student="rewire", teacher="teacher")


def run_depth(ctx: StageContext) -> dict[str, Any]:
    return run_phase(ctx, "depth", student="width_kd", teacher="width_kd")  # DynaBERT_W teaches itself


WIDTH_STAGE = register(
    Stage(
        name="width_kd",
        out="artifacts/dynabert_w",
        sections=("width_kd", "widths", "seed"),
        upstream=("data", "teacher", "rewire", "augment"),
        run=run_width,
        distributed=True,
        plots=lambda p: distill_plots("DynaBERT_W"),
        headline=grid_headline,
        description="DynaBERT_W: width-adaptive distillation from the teacher",
    )
)
DEPTH_STAGE = register(
    Stage(
        name="depth_kd",
        out="artifacts/dynabert",
        sections=("depth_kd", "widths", "depths", "seed"),
        upstream=("data", "augment", "width_kd"),
        run=run_depth,
        distributed=True,
        plots=lambda p: distill_plots("DynaBERT"),
        headline=grid_headline,
        description="DynaBERT: width-and-depth distillation, every sub-network of the grid",
    )
)
