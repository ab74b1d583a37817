"""Theseus stage: compress the fine-tuned teacher (the predecessor) by progressive module replacing.

One training run over ``epochs + finetune_epochs`` epochs with one optimizer and learning-rate schedule, as
in the official code: during the first ``epochs`` (the replacing phase) each successor layer replaces its
``r`` teacher layers with the scheduled rate; after them ``p = 1`` (successor-only fine-tuning). Only the
successor's layers train. The output is the successor as a plain Hugging Face BERT classifier with dev
metrics, the loss curve and the replacing rate of every step. Checkpoints go to ``work_dir``; the rate and
the draws are pure functions of the step, so a resumed run ends with the same weights. The successor kept is
the one of the epoch end that scored best on ``theseus.selection``'s split (default: the data stage's
held-out training rows; see :mod:`dynaflow.training.selection`).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynaflow.config import TheseusConfig
from dynaflow.core.artifacts import atomic_write_json
from dynaflow.core.plots import LOSS_CURVE, curve_records, loss_plot
from dynaflow.core.tracking import NullTracker
from dynaflow.data.splits import TOKENIZER_DIR, load_split, read_task_meta
from stages.registry import Stage, StageContext, register
from stages.teacher import teacher_scores

# torch and transformers are imported where they are used, as in every stage module: `dynaflow status`
# imports them all to read the declarations and must stay fast.
if TYPE_CHECKING:
    import torch

    from dynaflow.methods.theseus.model import ReplacingSchedule

log = logging.getLogger(__name__)
RATE_CURVE = "replacing_rate.json"  # per step: the replacing rate and how many modules were replaced


def make_schedule(cfg: TheseusConfig, steps_per_epoch: int) -> ReplacingSchedule:
    """The configured scheduler; ``k: null`` makes the linear rate reach 1 when the replacing phase ends."""
    from dynaflow.methods.theseus.model import ReplacingSchedule

    end = steps_per_epoch * cfg.epochs
    k = cfg.k if cfg.k is not None else (1 - cfg.replacing_rate) / end
    if cfg.scheduler == "constant":
        k = 0.0
    return ReplacingSchedule(cfg.scheduler, cfg.replacing_rate, k, cfg.steps_for_replacing, end=end)


def compress(
    cfg: TheseusConfig,
    seed: int,
    teacher_dir: Path,
    data_dir: Path,
    out_dir: Path,
    work_dir: Path,
    fingerprint: str,
    tracker: NullTracker,
    on_step: Any = None,
) -> dict[str, Any]:
    import torch
    import torch.nn.functional as F
    from transformers import BertForSequenceClassification

    from dynaflow.evaluation.scoring import epoch_end_selection, evaluate, hf_logits, load_dev
    from dynaflow.methods.theseus.model import (
        build_theseus,
        check_divides,
        draw_gates,
        export_successor,
        theseus_encoder,
    )
    from dynaflow.training.loop import TrainConfig, fit
    from dynaflow.training.selection import BestWeights, selection_split

    meta = read_task_meta(data_dir)
    train = load_split(data_dir, "train")
    dev = load_dev(data_dir, meta["dev_splits"])
    torch.manual_seed(seed)
    model = BertForSequenceClassification.from_pretrained(teacher_dir)
    check_divides(model.config.num_hidden_layers, cfg.compress_ratio)
    predecessor_layers = model.config.num_hidden_layers
    model = build_theseus(model, cfg.compress_ratio)
    encoder = theseus_encoder(model)
    modules = len(encoder.scc_layer)

    steps_per_epoch = -(-len(train) // cfg.batch_size)
    schedule = make_schedule(cfg, steps_per_epoch)
    position = {"step": 0}  # steps taken before the current one (fit's before_step says, resume included)

    def gates_at(step: int) -> tuple[float, list[bool]]:
        rate = schedule(step)
        return rate, draw_gates(rate, modules, seed, step)

    def step(batch: dict[str, torch.Tensor], note: Any = None) -> dict[str, float]:
        rate, gates = gates_at(position["step"])
        encoder.gates = gates  # which modules the successor replaces in this forward
        if note is not None:
            note(f"p={rate:.2f} replaced {sum(gates)}/{modules}")
        labels = batch.pop("labels")
        logits = model(**batch).logits
        if meta["is_regression"]:
            loss = F.mse_loss(logits.squeeze(-1), labels.float())
        else:
            loss = F.cross_entropy(logits, labels)
        if loss.requires_grad:  # else no module was replaced: nothing trainable in this forward, no update
            loss.backward()
        return {"loss": loss.item()}

    def begin(step_index: int, indices: Any) -> None:
        position["step"] = step_index

    def on_each_step(at_step: int) -> dict[str, float]:
        rate, gates = gates_at(at_step - 1)  # what the step just taken used
        if on_step is not None:
            on_step(at_step)
        return {"replacing_rate": rate, "replaced_modules": float(sum(gates))}

    # In eval mode every module is the successor's: the scores at epoch ends are those of what would ship.
    best = BestWeights(model)
    on_epoch_end = epoch_end_selection(
        model, meta["task"], dev, selection_split(cfg.selection, data_dir, dev), best, steps_per_epoch,
        cfg.eval_batch_size, "theseus (successor)",
    )  # fmt: skip

    train_cfg = TrainConfig.from_section(cfg, seed, epochs=cfg.epochs + cfg.finetune_epochs)
    result = fit(
        model, train, step, train_cfg, checkpoint=work_dir / "checkpoint.pt", fingerprint=fingerprint,
        tracker=tracker, on_epoch_end=on_epoch_end, on_step=on_each_step, before_step=begin,
        extra_state=best.checkpoint_state, desc="theseus", pad_id=model.config.pad_token_id or 0,
    )  # fmt: skip
    selected_step = best.restore() or result.global_step
    log.info("theseus: keeping the weights of step %d of %d (selection: %s)", selected_step,
             result.global_step, cfg.selection)  # fmt: skip

    successor = export_successor(model)
    dev_metrics = evaluate(hf_logits(successor), meta["task"], dev, cfg.eval_batch_size)
    tracker.log_metrics({f"final.dev.{k}": v for k, v in dev_metrics.items()})
    successor.save_pretrained(out_dir, safe_serialization=True)
    shutil.copytree(data_dir / TOKENIZER_DIR, out_dir, dirs_exist_ok=True)
    metrics: dict[str, Any] = dev_metrics | {
        "layers": modules,
        "predecessor_layers": predecessor_layers,
        "parameters": sum(p.numel() for p in successor.parameters()),
        "predecessor_parameters": sum(p.numel() for p in model.parameters())
        - sum(p.numel() for p in encoder.scc_layer.parameters()),
        "replacing_steps": schedule.end,
        "steps": result.global_step,
        "selected_step": selected_step,
    }
    metrics |= teacher_scores(teacher_dir, "predecessor")
    rates = [(t + 1, *gates_at(t)) for t in range(result.global_step)]
    # Deterministic content only in the artifact (see stages/teacher.py); timings go to metrics/ and MLflow.
    atomic_write_json(out_dir / "metrics.json", metrics)
    atomic_write_json(out_dir / LOSS_CURVE, curve_records(result.loss_history))
    rate_records = [{"step": s, "replacing_rate": r, "replaced": sum(g)} for s, r, g in rates]
    atomic_write_json(out_dir / RATE_CURVE, rate_records)
    for curve in (LOSS_CURVE, RATE_CURVE):
        tracker.log_artifact(out_dir / curve)
    log.info("theseus: %d-layer successor dev %s (predecessor %s)", modules, metrics.get("score"),
             metrics.get("predecessor.score"))  # fmt: skip
    return metrics | {"train_seconds": result.seconds, "examples_per_second": result.examples_per_second}


def run(ctx: StageContext) -> dict[str, Any]:
    p = ctx.params
    return compress(
        p.theseus,
        p.seed,
        ctx.upstream("teacher"),
        ctx.upstream("data"),
        ctx.out,
        ctx.work,
        ctx.key,
        ctx.tracker,
    )


STAGE = register(
    Stage(
        name="theseus",
        out="artifacts/theseus",
        sections=("theseus", "seed"),
        upstream=("data", "teacher"),
        run=run,
        flow="theseus",
        plots=lambda p: loss_plot("theseus: training loss")
        | {RATE_CURVE: {"x": "step", "y": "replacing_rate", "template": "linear",
                        "title": "theseus: replacing rate"}},  # fmt: skip
        headline=lambda m: {"score": m["score"], "seconds": m["train_seconds"]},
        description="BERT-of-Theseus: a successor of L/r layers by progressive module replacing",
    )
)
