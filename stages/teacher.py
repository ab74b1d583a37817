"""Teacher stage: fine-tune the backbone on the task; save it in the Hugging Face format with dev metrics.

The weights kept are those of the epoch end that scored best on ``teacher.selection``'s split (default: the
data stage's held-out training rows, so the teacher's dev score is not chosen on dev; see
:mod:`dynaflow.training.selection`).

Checkpoints go to ``work_dir`` (outside the output, which DVC deletes before a run), so re-running after a
crash resumes from the last one; the runner removes them once the output is in place.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dynaflow.config import Params, TeacherConfig, TeacherGateConfig
from dynaflow.core.artifacts import atomic_write_json
from dynaflow.core.plots import LOSS_CURVE, curve_records, loss_plot
from dynaflow.core.tracking import NullTracker
from dynaflow.data.splits import TOKENIZER_DIR, load_split, read_task_meta
from dynaflow.models.backbone import local_files
from stages.registry import Layout, Stage, StageContext, register

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def teacher_scores(teacher_dir: Path, prefix: str = "teacher") -> dict[str, Any]:
    """The teacher's recorded dev metrics as ``<prefix>.<key>`` entries, for a student's metrics beside its
    own (nothing when the teacher recorded none)."""
    path = Path(teacher_dir) / "metrics.json"
    if not path.is_file():
        return {}
    return {f"{prefix}.{k}": v for k, v in json.loads(path.read_text()).items()}

def task_loss(logits: torch.Tensor, labels: torch.Tensor, is_regression: bool) -> torch.Tensor:
    import torch.nn.functional as F

    if is_regression:
        return F.mse_loss(logits.squeeze(-1), labels.float())
    return F.cross_entropy(logits, labels)


def weak_teacher_message(score: float, chance: float, metric: str, gate: TeacherGateConfig) -> str:
    return (
        f"WEAK TEACHER: dev {metric} {score:.4f} is less than {gate.min_gain_over_chance:g} above the "
        f"majority-class/chance score {chance:.4f}; what is distilled from it is noise. Train it longer or "
        "on more examples (teacher.epochs, teacher.learning_rate, data.max_train_examples); "
        "teacher_gate.on_fail=warn goes on anyway"
    )


def gate(params: Params, layout: Layout) -> str | None:
    """Why the stages that read the teacher must not start (None: they may)."""
    cfg = params.teacher_gate
    scores, meta = layout.out("teacher") / "metrics.json", read_task_meta(layout.out("data"))
    chance = (meta.get("chance") or {}).get("score")
    if cfg.on_fail == "warn" or chance is None or not scores.is_file():
        return None
    score = json.loads(scores.read_text())["score"]
    if score - chance >= cfg.min_gain_over_chance:
        return None
    return weak_teacher_message(score, chance, meta["main_metric"], cfg)


def fine_tune(
    cfg: TeacherConfig,
    backbone: str,
    seed: int,
    data_dir: Path,
    out_dir: Path,
    work_dir: Path,
    fingerprint: str,
    tracker: NullTracker,
    on_step: Any = None,
    gate_cfg: TeacherGateConfig | None = None,
) -> dict[str, Any]:
    # Imported here, as in every stage module: `dynaflow status` imports them all to read the declarations.
    import torch

    from dynaflow.evaluation.scoring import epoch_end_selection, evaluate, hf_logits, load_dev
    from dynaflow.models.backbone import load_classifier
    from dynaflow.training.loop import TrainConfig, fit
    from dynaflow.training.selection import BestWeights, selection_split

    gate_cfg = gate_cfg or TeacherGateConfig()
    meta = read_task_meta(data_dir)
    train = load_split(data_dir, "train")
    dev = load_dev(data_dir, meta["dev_splits"])
    torch.manual_seed(seed)  # the classifier head is initialised here
    model = load_classifier(backbone, meta["num_labels"])
    pad_id = model.config.pad_token_id or 0

    def step(batch: dict[str, torch.Tensor], note: object = None) -> dict[str, float]:
        labels = batch.pop("labels")
        loss = task_loss(model(**batch).logits, labels, meta["is_regression"])
        loss.backward()
        return {"loss": loss.item()}

    best = BestWeights(model)
    on_epoch_end = epoch_end_selection(
        model, meta["task"], dev, selection_split(cfg.selection, data_dir, dev), best,
        -(-len(train) // cfg.batch_size), cfg.eval_batch_size, "teacher",
    )  # fmt: skip

    train_cfg = TrainConfig.from_section(cfg, seed)
    result = fit(
        model,
        train,
        step,
        train_cfg,
        checkpoint=work_dir / "checkpoint.pt",
        fingerprint=fingerprint,
        tracker=tracker,
        on_epoch_end=on_epoch_end,
        on_step=on_step,
        extra_state=best.checkpoint_state,
        desc="teacher",
        pad_id=pad_id,
    )
    selected_step = best.restore() or result.global_step
    log.info("teacher: keeping the weights of step %d of %d (selection: %s)", selected_step,
             result.global_step, cfg.selection)  # fmt: skip
    metrics = evaluate(hf_logits(model), meta["task"], dev, cfg.eval_batch_size)
    metrics["selected_step"] = selected_step
    chance = (meta.get("chance") or {}).get("score")
    if chance is not None:  # recorded beside the score; the gate (below) decides what follows from it
        metrics["gain_over_chance"] = metrics["score"] - chance
        if metrics["gain_over_chance"] < gate_cfg.min_gain_over_chance:
            log.warning(weak_teacher_message(metrics["score"], chance, meta["main_metric"], gate_cfg))
            tracker.set_tags({"weak_teacher": "true"})
    model.save_pretrained(out_dir, safe_serialization=True)
    shutil.copytree(data_dir / TOKENIZER_DIR, out_dir, dirs_exist_ok=True)
    # Only deterministic content in the artifact: a re-run with the same inputs then yields the same
    # manifest, and the stages downstream stay cached. Timings go to metrics/teacher.json and MLflow.
    atomic_write_json(out_dir / "metrics.json", metrics)
    atomic_write_json(out_dir / LOSS_CURVE, curve_records(result.loss_history))
    tracker.log_artifact(out_dir / LOSS_CURVE)
    tracker.log_metrics({("" if k == "selected_step" else "final.dev.") + k: v for k, v in metrics.items()})
    return metrics | {"train_seconds": result.seconds, "examples_per_second": result.examples_per_second}


def run(ctx: StageContext) -> dict[str, Any]:
    p = ctx.params
    return fine_tune(
        p.teacher, p.backbone, p.seed, ctx.upstream("data"), ctx.out, ctx.work, ctx.key, ctx.tracker,
        gate_cfg=p.teacher_gate,
    )  # fmt: skip


STAGE = register(
    Stage(
        name="teacher",
        out="artifacts/teacher",
        sections=("teacher", "backbone", "seed"),
        upstream=("data",),
        run=run,
        external=lambda p: local_files(p.backbone),
        plots=lambda p: loss_plot("teacher: training loss"),
        distributed=True,
        gate=gate,
        headline=lambda m: {"score": m["score"], "seconds": m["train_seconds"]},
        description="fine-tune the backbone on the task: the teacher every method starts from",
    )
)
