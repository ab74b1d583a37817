"""ConvBERT stage: students cut from the rewired teacher (:mod:`dynaflow.methods.convbert.model`) and
distilled from the fine-tuned teacher, one per ``convbert.groups`` entry.

Each student trains with DynaBERT's losses (λ1 · soft cross-entropy on logits, MSE for regression, plus
λ2 · MSE on every hidden state, layer for layer: the student has the teacher's depth and width) and keeps
the epoch end that scored best on ``convbert.selection``'s split (default: the data stage's held-out
training rows; dev unseen). Outputs: ``artifacts/convbert/g<groups>/``, each a plain
``ConvBertForSequenceClassification`` with its tokenizer, ``metrics.json`` and loss curve. Checkpoints go
to ``work_dir/g<groups>/``: a killed run resumes in the student it was training.

Hugging Face's convolution branch ignores the attention mask, so in a padded batch the last real tokens of
a short sentence see padding through the convolution window. Each student records how much that moves its
dev predictions (``padding.*``: a padded batch in dev order against one sentence at a time); scoring and
serving cut batches from length-sorted examples, which keeps the padding, and the effect, small.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

from dynaflow.config import ConvBertStudentConfig
from dynaflow.core.artifacts import atomic_write_json
from dynaflow.core.plots import LOSS_CURVE, curve_records, loss_plot
from dynaflow.core.tracking import NullTracker
from dynaflow.data.splits import TOKENIZER_DIR, TokenizedSplit, load_split, read_task_meta
from stages.registry import Stage, StageContext, extremes, register
from stages.teacher import teacher_scores

log = logging.getLogger(__name__)
PADDING_BATCH = 64  # the padded batches of the padding check: dev in its own order, so lengths mix


def student_name(groups: int) -> str:
    return f"g{groups}"


def padding_effect(model: Any, split: TokenizedSplit) -> dict[str, float]:
    """How far padded batches move a ConvBERT's logits from one-sentence-at-a-time ones (no padding)."""
    import numpy as np
    import torch

    from dynaflow.data.splits import collate
    from dynaflow.evaluation.scoring import model_inputs

    model.eval()
    with torch.no_grad():
        padded = [
            model(**model_inputs(model, collate(split, list(range(i, min(i + PADDING_BATCH, len(split)))))))
            .logits.float().numpy()
            for i in range(0, len(split), PADDING_BATCH)
        ]  # fmt: skip
        alone = [model(**model_inputs(model, collate(split, [i]))).logits.float().numpy()
                 for i in range(len(split))]  # fmt: skip
    padded_logits, alone_logits = np.concatenate(padded), np.concatenate(alone)
    diff = np.abs(padded_logits - alone_logits).max(axis=1)
    changed = (padded_logits.argmax(1) != alone_logits.argmax(1)) if padded_logits.shape[1] > 1 else diff * 0
    return {
        "padding.max_logit_diff": float(diff.max()),
        "padding.mean_logit_diff": float(diff.mean()),
        "padding.changed_predictions": float(np.mean(changed)),
    }


def distil_student(
    cfg: ConvBertStudentConfig,
    groups: int,
    seed: int,
    rewire_dir: Path,
    teacher_dir: Path,
    data_dir: Path,
    out_dir: Path,
    work_dir: Path,
    fingerprint: str,
    tracker: NullTracker,
) -> dict[str, Any]:
    """Cut one ConvBERT student (``groups`` FFN groups) from the rewired teacher and distil it."""
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from dynaflow.core.distributed import device
    from dynaflow.evaluation.scoring import epoch_end_selection, evaluate, hf_logits, load_dev
    from dynaflow.methods.convbert.model import build_student, new_parameter_names
    from dynaflow.models.backbone import load_elastic
    from dynaflow.training.kd import hidden_loss, logit_loss
    from dynaflow.training.loop import TrainConfig, fit
    from dynaflow.training.selection import BestWeights, selection_split

    meta = read_task_meta(data_dir)
    train = load_split(data_dir, "train")
    dev = load_dev(data_dir, meta["dev_splits"])
    pad_id = AutoTokenizer.from_pretrained(data_dir / TOKENIZER_DIR).pad_token_id or 0
    student = build_student(load_elastic(rewire_dir), cfg.kernel_size, groups, pad_id, seed)
    teacher = BertForSequenceClassification.from_pretrained(teacher_dir).eval().to(device())
    for p in teacher.parameters():
        p.requires_grad_(False)
    layers = range(student.config.num_hidden_layers + 1)  # embeddings, then every layer: one to one
    name = student_name(groups)

    def step(batch: dict[str, torch.Tensor], note: Any = None) -> dict[str, float]:
        batch.pop("labels")
        with torch.no_grad():
            target = teacher(**batch, output_hidden_states=True)
        out = student(**batch, output_hidden_states=True)
        logit = logit_loss(out.logits, target.logits, meta["is_regression"])
        hidden = hidden_loss(out.hidden_states, target.hidden_states, layers)
        loss = cfg.lambda_logit * logit + cfg.lambda_hidden * hidden
        loss.backward()
        return {"loss": loss.item(), "logit_loss": logit.item(), "hidden_loss": hidden.item()}

    steps_per_epoch = -(-len(train) // cfg.batch_size)
    best = BestWeights(student)
    on_epoch_end = epoch_end_selection(
        student, meta["task"], dev, selection_split(cfg.selection, data_dir, dev), best, steps_per_epoch,
        cfg.eval_batch_size, f"convbert {name}",
    )  # fmt: skip
    result = fit(
        student, train, step, TrainConfig.from_section(cfg, seed), checkpoint=work_dir / "checkpoint.pt",
        fingerprint=f"{fingerprint}:{name}", tracker=tracker, on_epoch_end=on_epoch_end,
        extra_state=best.checkpoint_state, desc=f"convbert-{name}", pad_id=pad_id,
    )  # fmt: skip
    selected_step = best.restore() or result.global_step
    log.info("convbert %s: keeping the weights of step %d of %d (selection: %s)", name, selected_step,
             result.global_step, cfg.selection)  # fmt: skip

    student = student.cpu().eval()
    dev_metrics = evaluate(hf_logits(student), meta["task"], dev, cfg.eval_batch_size)
    student.save_pretrained(out_dir, safe_serialization=True)
    shutil.copytree(data_dir / TOKENIZER_DIR, out_dir, dirs_exist_ok=True)
    metrics: dict[str, Any] = (
        dev_metrics
        | padding_effect(student, dev[meta["dev_splits"][0]])
        | {
            "groups": groups,
            "kernel_size": cfg.kernel_size,
            "parameters": sum(p.numel() for p in student.parameters()),
            "new_parameters": sum(student.get_parameter(n).numel() for n in new_parameter_names(student)),
            "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
            "steps": result.global_step,
            "selected_step": selected_step,
        }
    )
    metrics |= teacher_scores(teacher_dir)
    # Deterministic content only in the artifact (see stages/teacher.py); timings go to metrics/ and MLflow.
    atomic_write_json(out_dir / "metrics.json", metrics)
    atomic_write_json(out_dir / LOSS_CURVE, curve_records(result.loss_history))
    tracker.log_artifact(out_dir / LOSS_CURVE)
    tracker.log_metrics({f"final.{name}.dev.{k}": v for k, v in dev_metrics.items()})
    log.info("convbert %s: dev %s (teacher %s)", name, metrics["score"], metrics.get("teacher.score"))
    return metrics | {"train_seconds": result.seconds, "examples_per_second": result.examples_per_second}


def run(ctx: StageContext) -> dict[str, Any]:
    p, metrics = ctx.params, {}
    for groups in p.convbert.groups:
        name = student_name(groups)
        found = distil_student(
            p.convbert, groups, p.seed, ctx.upstream("rewire"), ctx.upstream("teacher"), ctx.upstream("data"),
            ctx.out / name, ctx.work / name, ctx.key, ctx.tracker,
        )  # fmt: skip
        metrics |= {f"{name}.{k}": v for k, v in found.items() if not k.startswith("teacher.")}
    return metrics


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The best and worst student, and the training seconds of all of them."""
    students = [k.removesuffix(".groups") for k in metrics if k.endswith(".groups")]
    seconds = sum(metrics[f"{s}.train_seconds"] for s in students)
    return extremes([metrics[f"{s}.score"] for s in students]) | {"seconds": seconds}


STAGE = register(
    Stage(
        name="convbert",
        out="artifacts/convbert",
        sections=("convbert", "seed"),
        upstream=("data", "teacher", "rewire"),
        run=run,
        flow="convbert",
        plots=lambda p: {
            f"{student_name(g)}/{LOSS_CURVE}": loss_plot(f"convbert g{g}: training loss")[LOSS_CURVE]
            for g in p.convbert.groups
        },
        headline=headline,
        description="ConvBERT students cut from the rewired teacher and distilled (one per FFN group count)",
    )
)
