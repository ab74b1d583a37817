"""Token-gating stage: the teacher with trainable gates on every layer's tokens, one model per
``gates.lambdas``.

Each λ trains, in one stage (Jeong & Kwak, 2021, as reconstructed in
:mod:`dynaflow.methods.gates.modeling_gated_bert`), the teacher's weights and its gates on
``task + λ · Σ_j c_j · m_j + μ_t · Σ_j mean_k g(1 − g)``: the task loss (``gates.loss``: distillation from
the teacher, or labels), the mass of the gates that are on (``gates.mass``, ``gates.layer_cost``) and the
bi-modal term, whose weight μ_t rises from ``gates.bimodal_start`` to ``gates.bimodal_weight`` at the end.
The saved model drops, at inference, every rank whose gate ended below 0.5.

Outputs: ``artifacts/gates/l<λ>/``: the hard-gated model (remote code: ``modeling_gated_bert.py``), its
tokenizer, ``metrics.json`` (dev score of the hard and soft forms, tokens kept per layer and encoder FLOPs
per dev example beside the teacher's), ``gates.json`` (the gates at every epoch end) and the loss curve.
MLflow: the loss terms every few steps; per epoch, each layer's mean gate and its mean kept tokens on dev.
Checkpoints go to ``work_dir/l<λ>/``: a killed run resumes in the λ it was training.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynaflow.config import Params
from dynaflow.core.artifacts import atomic_write_json
from dynaflow.core.plots import LOSS_CURVE, curve_records, loss_plot
from dynaflow.core.tracking import NullTracker
from dynaflow.data.splits import TOKENIZER_DIR, load_split, read_task_meta
from stages.registry import Stage, StageContext, extremes, register
from stages.teacher import teacher_scores

log = logging.getLogger(__name__)
GATES_FILE = "gates.json"


def run_name(lam: float) -> str:
    """``l0.1``: a λ's folder and candidate name (MLflow-safe)."""
    return f"l{float(lam):g}"


@dataclass(frozen=True)
class GateTraining:
    """One training run of a gated model: what the regularisers weigh and whether the gates learn."""

    name: str
    lam: float
    mass: str = "length"
    layer_cost: str = "linear"
    mu: float = 0.0
    bimodal_start: float = 0.5
    epochs: int = 1
    selection: str = "last"
    learn_gates: bool = True  # False: gates fixed (PoWER-BERT's retraining), the hard form trained


def train_gated(
    section: Any,
    plan: GateTraining,
    model: Any,
    teacher: Any,
    seed: int,
    data_dir: Path,
    work_dir: Path,
    fingerprint: str,
    tracker: NullTracker,
) -> tuple[Any, dict[str, Any]]:
    """Train ``model`` (a gated model) under ``plan``; return it with its gates' history and training record.

    ``section``: the params section (gates or powerbert) with the optimiser settings and ``loss``.
    """
    import torch

    from dynaflow.evaluation.scoring import epoch_end_selection, load_dev
    from dynaflow.methods.gates.budget import gate_summary, token_budget
    from dynaflow.methods.gates.regularizers import bimodal_term, bimodal_weight, layer_costs, mass_term
    from dynaflow.training.kd import logit_loss
    from dynaflow.training.loop import TrainConfig, fit
    from dynaflow.training.selection import BestWeights, selection_split

    meta = read_task_meta(data_dir)
    train = load_split(data_dir, "train")
    dev = load_dev(data_dir, meta["dev_splits"])
    dev_lengths = [len(ids) for ids in dev[meta["dev_splits"][0]].input_ids]
    positions = max(len(ids) for ids in train.input_ids)  # the ranks training inputs reach
    costs = layer_costs(model.config.num_hidden_layers, plan.layer_cost)
    model.gates.requires_grad_(plan.learn_gates)
    model.config.hard_gates = not plan.learn_gates
    cfg = TrainConfig.from_section(section, seed, epochs=plan.epochs)
    total = -(-len(train) // cfg.batch_size) * cfg.epochs
    step_now = [0]

    def step(batch: dict[str, torch.Tensor], note: Any = None) -> dict[str, float]:
        labels = batch.pop("labels")
        out = model(**batch, labels=None if section.loss == "kd" else labels)  # task: its own CE / MSE
        if section.loss == "kd":
            with torch.no_grad():
                target = teacher(**batch).logits
            task = logit_loss(out.logits, target, meta["is_regression"])
        else:
            task = out.loss
        loss, terms = task, {"task_loss": task.item()}
        if plan.learn_gates:
            mass = mass_term(model.gates, batch["attention_mask"].sum(1), costs, plan.mass, positions)
            bimodal = bimodal_term(model.gates, positions)
            mu = bimodal_weight(plan.mu, step_now[0], total, plan.bimodal_start)
            loss = loss + plan.lam * mass + mu * bimodal
            terms |= {"mass": mass.item(), "bimodal": bimodal.item(), "mu": mu}
        loss.backward()
        return {"loss": loss.item()} | terms

    def before_step(done: int, indices: Any) -> None:
        step_now[0] = done

    def clip_gates(done: int) -> None:  # gates live in [0, 1] (PoWER-BERT clips its retention parameters)
        with torch.no_grad():
            model.gates.clamp_(0.0, 1.0)

    history: list[dict[str, Any]] = []
    best = BestWeights(model)
    score_epoch = epoch_end_selection(
        model, meta["task"], dev, selection_split(plan.selection, data_dir, dev), best, total // cfg.epochs,
        section.eval_batch_size, plan.name,
    )  # fmt: skip

    def on_epoch_end(epoch: int) -> dict[str, float]:
        hard = model.config.hard_gates
        model.config.hard_gates = True  # what ships is scored (and chosen) with its tokens really dropped
        try:
            logged = score_epoch(epoch)
        finally:
            model.config.hard_gates = hard
        summary = gate_summary(model.gates.cpu(), positions) | token_budget(
            model.config, model.keep_mask().cpu(), dev_lengths
        )
        history.append(
            {"epoch": epoch, "gates": model.gates.detach()[:, :positions].cpu().tolist()} | summary
        )
        for j, (g, k) in enumerate(
            zip(summary["gate_mean_per_layer"], summary["kept_per_layer"][1:], strict=True)
        ):
            logged |= {f"gates.layer{j}.mean": g, f"gates.layer{j}.kept_dev": k}
        return logged | {
            "gates.flops_reduction": summary["flops_reduction"],
            "gates.settled": summary["gates_settled"],
        }

    save_best, load_best = best.checkpoint_state

    def load_state(state: dict[str, Any]) -> None:  # a resumed run keeps the epochs it already recorded
        load_best(state["best"])
        history[:] = state["history"]

    result = fit(
        model, train, step, cfg, checkpoint=work_dir / "checkpoint.pt",
        fingerprint=f"{fingerprint}:{plan.name}",
        tracker=tracker, on_epoch_end=on_epoch_end, on_step=clip_gates, before_step=before_step,
        extra_state=(lambda: {"best": save_best(), "history": history}, load_state), desc=plan.name,
        param_lr={"gates": section.gate_learning_rate},
    )  # fmt: skip
    selected = best.restore() or result.global_step
    log.info("%s: keeping the weights of step %d of %d", plan.name, selected, result.global_step)
    record = {"steps": result.global_step, "selected_step": selected, "positions": positions,
              "train_seconds": result.seconds, "examples_per_second": result.examples_per_second,
              "history": history, "loss_history": result.loss_history}  # fmt: skip
    return model, record


def save_gated(
    model: Any, record: dict[str, Any], data_dir: Path, teacher_dir: Path, out_dir: Path,
    eval_batch_size: int, extra: dict[str, Any], tracker: NullTracker,
) -> dict[str, Any]:  # fmt: skip
    """Score the hard and soft forms on dev, count tokens and FLOPs, save the hard form to ``out_dir``."""
    from dynaflow.evaluation.scoring import evaluate, hf_logits, load_dev
    from dynaflow.methods.gates.budget import gate_summary, token_budget
    from dynaflow.methods.gates.candidates import mark_remote

    meta = read_task_meta(data_dir)
    dev = load_dev(data_dir, meta["dev_splits"])
    model = model.cpu().eval()
    model.config.hard_gates = False
    soft = evaluate(hf_logits(model), meta["task"], dev, eval_batch_size)
    model.config.hard_gates = True
    hard = evaluate(hf_logits(model), meta["task"], dev, eval_batch_size)
    lengths = [len(ids) for ids in dev[meta["dev_splits"][0]].input_ids]
    budget = token_budget(model.config, model.keep_mask(), lengths)
    metrics: dict[str, Any] = hard | {f"soft.{k}": v for k, v in soft.items()} | budget | extra
    metrics |= gate_summary(model.gates, record["positions"])
    metrics |= {k: record[k] for k in ("steps", "selected_step", "positions")}
    metrics |= teacher_scores(teacher_dir)
    mark_remote(model)
    model.save_pretrained(out_dir, safe_serialization=True)
    shutil.copytree(data_dir / TOKENIZER_DIR, out_dir, dirs_exist_ok=True)
    atomic_write_json(out_dir / "metrics.json", metrics)
    atomic_write_json(out_dir / GATES_FILE, record["history"])
    atomic_write_json(out_dir / LOSS_CURVE, curve_records(record["loss_history"]))
    tracker.log_artifact(out_dir / LOSS_CURVE)
    tracker.log_metrics({f"final.{out_dir.name}.dev.{k}": v for k, v in hard.items()})
    log.info("%s: dev %.4f hard (%.4f soft), %.2fx fewer encoder FLOPs than its source, tokens per layer %s",
             out_dir.name, hard["score"], soft["score"], budget["flops_reduction"],
             budget["kept_per_layer"])  # fmt: skip
    return metrics | {"train_seconds": record["train_seconds"]}


def frozen_teacher(teacher_dir: Path) -> Any:
    """The fine-tuned teacher on the training device, frozen: what every gated model is distilled from."""
    from dynaflow.core.distributed import device
    from dynaflow.models.backbone import load_elastic

    teacher = load_elastic(teacher_dir).eval().to(device())
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


def load_source(teacher_dir: Path, **config: Any) -> tuple[Any, Any]:
    """(the teacher as a gated model with open gates, the teacher frozen): where every gated run starts."""
    from dynaflow.methods.gates.modeling_gated_bert import gated_copy

    teacher = frozen_teacher(teacher_dir)
    return gated_copy(teacher, **config).train(), teacher


def train_gates(p: Params, lam: float, teacher_dir: Path, data_dir: Path, out_dir: Path, work_dir: Path,
                key: str, tracker: NullTracker) -> dict[str, Any]:  # fmt: skip
    """One λ of the gates stage: train from the teacher, save the hard-gated model into ``out_dir``."""
    cfg = p.gates
    model, teacher = load_source(
        teacher_dir, gate_scales_vector=cfg.gate_scales_vector, straight_through=cfg.straight_through
    )
    plan = GateTraining(
        f"gates-{run_name(lam)}", lam, cfg.mass, cfg.layer_cost, cfg.bimodal_weight, cfg.bimodal_start,
        cfg.epochs, cfg.selection,
    )  # fmt: skip
    model, record = train_gated(cfg, plan, model, teacher, p.seed, data_dir, work_dir, key, tracker)
    return save_gated(
        model, record, data_dir, teacher_dir, out_dir, cfg.eval_batch_size, {"lambda": lam}, tracker
    )


def run_metrics(name: str, found: dict[str, Any]) -> dict[str, Any]:
    """One trained model's metrics as the stage's flat ``<name>.<key>`` entries (the teacher's left out)."""
    return {f"{name}.{k}": v for k, v in found.items() if not k.startswith("teacher.")}


def each_lambda(
    ctx: StageContext, lambdas: list[float], train: Callable[..., dict[str, Any]]
) -> dict[str, Any]:
    """Train one model per λ into ``ctx.out/l<λ>``; the stage's flat metrics (teacher's left out)."""
    metrics: dict[str, Any] = {}
    for lam in lambdas:
        name = run_name(lam)
        found = train(ctx.params, lam, ctx.upstream("teacher"), ctx.upstream("data"), ctx.out / name,
                      ctx.work / name, ctx.key, ctx.tracker)  # fmt: skip
        metrics |= run_metrics(name, found)
    return metrics


def run(ctx: StageContext) -> dict[str, Any]:
    return each_lambda(ctx, ctx.params.gates.lambdas, train_gates)


def headline(metrics: dict[str, Any]) -> dict[str, Any]:
    """The best and worst λ's dev score and the training seconds of all."""
    runs = [k.removesuffix(".lambda") for k in metrics if k.endswith(".lambda")]
    return extremes([metrics[f"{r}.score"] for r in runs]) | {
        "seconds": sum(metrics[f"{r}.train_seconds"] for r in runs)
    }


def lambda_plots(lambdas: list[float], what: str) -> dict[str, dict[str, str]]:
    return {f"{run_name(lam)}/{LOSS_CURVE}": loss_plot(f"{what} lambda={lam:g}: training loss")[LOSS_CURVE]
            for lam in lambdas}  # fmt: skip


STAGE = register(
    Stage(
        name="gates",
        out="artifacts/gates",
        sections=("gates", "seed"),
        upstream=("data", "teacher"),
        run=run,
        flow="gates",
        plots=lambda p: lambda_plots(p.gates.lambdas, "token gates"),
        headline=headline,
        description="token gates with a bi-modal regulariser trained on the teacher (one model per λ)",
    )
)
