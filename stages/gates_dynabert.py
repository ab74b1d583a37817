"""Token gates on DynaBERT sub-networks: width x depth x length, one candidate per cell and λ.

Each ``gates_dynabert.subnetworks`` cell (width, depth) is cut from the DynaBERT model (``depth_kd``) as the
evaluate stage cuts it, then trained as the gates stage trains the teacher (every setting but the cells,
``gates_dynabert.lambdas`` and ``gates_dynabert.distil_from`` is the ``gates`` section's). It is distilled
from the better, on the held-out rows, of the fine-tuned teacher and DynaBERT's full-size model
(``distil_from: auto``): on SST-2's bench the teacher scores 1.6 points under DynaBERT's cells and
distilling from it pulled a gated cell down to it, on STS-B's the teacher is the stronger and the better
source. ``teacher`` and ``dynabert`` force one, ``source`` distils from the cut cell itself, frozen.

The cut sub-network is the *source*: ``metrics.json`` has its own dev score (``source.score``) and FLOPs
beside the gated model's, so "how many fewer FLOPs for how many points" is read against the sub-network, not
the teacher (the teacher's FLOPs are there too).

Outputs: ``artifacts/gates_dynabert/w<width>_d<depth>-l<λ>[-kd_<distil_from>]/``, as the gates stage's
(the hard-gated model, its tokenizer, ``metrics.json``, ``gates.json``, the loss curve). Checkpoints:
``work_dir/<name>/``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dynaflow.config import Params
from dynaflow.core.plots import LOSS_CURVE, loss_plot
from dynaflow.core.tracking import NullTracker
from dynaflow.data.splits import read_task_meta
from stages.gates import (
    GateTraining,
    frozen_teacher,
    headline,
    run_metrics,
    run_name,
    save_gated,
    train_gated,
)
from stages.registry import Stage, StageContext, register

LOG = logging.getLogger(__name__)


def cell_run_name(cell: tuple[float, float], lam: float, distil_from: str = "auto") -> str:
    """``w0.5_d0.75-l0.02``: one cell's model at one λ (its folder and candidate name); a model distilled
    from a source forced by ``distil_from`` says so (``w0.5_d0.75-l0.02-kd_dynabert``), so two never share
    a name in one report."""
    from dynaflow.methods.dynabert.candidates import point_name

    suffix = "" if distil_from == "auto" else f"-kd_{distil_from}"
    return f"{point_name(*cell)}-{run_name(lam)}{suffix}"


def run_names(p: Params) -> list[str]:
    section = p.gates_dynabert
    cells = section.subnetworks
    return [cell_run_name(cell, lam, section.distil_from) for cell in cells for lam in section.lambdas]


def check_cells(p: Params) -> None:
    """Every cell must be one DynaBERT trained: its width in ``widths`` and its depth in ``depths``."""
    p.check_cells("gates_dynabert.subnetworks", p.gates_dynabert.subnetworks)


def resolve_distil_from(choice: str, dirs: dict[str, Path], eval_batch_size: int) -> dict[str, Any]:
    """``{"distil_from": ...}``: ``choice`` itself, or for ``auto`` the better of the teacher and DynaBERT's
    full-size model on the held-out rows (ties: the teacher), with both scores beside it. The held-out
    rows, not dev: the dev score the report shows must not have chosen anything."""
    if choice != "auto":
        return {"distil_from": choice}
    from dynaflow.data.splits import HELDOUT, load_heldout
    from dynaflow.evaluation.scoring import evaluate, hf_logits
    from dynaflow.models.backbone import load_elastic

    heldout, task = {HELDOUT: load_heldout(dirs["data"])}, read_task_meta(dirs["data"])["task"]
    scores = {
        name: evaluate(hf_logits(load_elastic(dirs[stage])), task, heldout, eval_batch_size)["score"]
        for name, stage in (("teacher", "teacher"), ("dynabert", "depth_kd"))
    }
    best = max(scores, key=scores.__getitem__)  # the first of equals: the teacher
    LOG.info("gated cells distil from %s (held-out score: teacher %.4f, DynaBERT %.4f)", best,
             scores["teacher"], scores["dynabert"])  # fmt: skip
    return {"distil_from": best} | {f"heldout_score.{name}": v for name, v in scores.items()}


def source_subnetwork(
    dynabert_dir: Path,
    teacher_dir: Path,
    cell: tuple[float, float],
    distil_from: str = "teacher",
    **config: Any,
) -> tuple[Any, Any]:
    """(the cell cut from DynaBERT as a gated model with open gates, the model it is distilled from, frozen:
    the fine-tuned teacher, DynaBERT's full-size model or the cut cell itself, as ``distil_from`` says)."""
    from dynaflow.core.distributed import device
    from dynaflow.methods.gates.modeling_gated_bert import gated_copy
    from dynaflow.models.backbone import load_elastic
    from dynaflow.models.extract import extract_subnetwork

    dynabert = load_elastic(dynabert_dir).eval()
    sub = extract_subnetwork(dynabert, *cell).to(device()).eval()
    kd_source = {
        "teacher": lambda: frozen_teacher(teacher_dir),
        "dynabert": lambda: dynabert.to(device()),  # with no sub-network set, the elastic model is full size
        "source": lambda: sub,  # gated_copy copies the weights: freezing the cell leaves the student's free
    }[distil_from]()
    for weight in kd_source.parameters():
        weight.requires_grad_(False)
    return gated_copy(sub, **config).train(), kd_source


def source_scores(model: Any, teacher_dir: Path, data_dir: Path, eval_batch_size: int) -> dict[str, float]:
    """The cut sub-network's own dev scores (open gates: the source model), as ``source.<metric>``, and the
    teacher's encoder GFLOPs per dev example (the gated model's metrics count them against the source)."""
    from transformers import BertConfig

    from dynaflow.evaluation.scoring import evaluate, hf_logits, load_dev
    from dynaflow.methods.gates.budget import all_kept, token_budget
    from dynaflow.models.elastic_bert import ElasticBertConfig

    meta = read_task_meta(data_dir)
    dev = load_dev(data_dir, meta["dev_splits"])
    model.eval()
    scores = evaluate(hf_logits(model), meta["task"], dev, eval_batch_size)
    model.train()
    lengths = [len(ids) for ids in dev[meta["dev_splits"][0]].input_ids]
    teacher_config = ElasticBertConfig.from_bert_config(BertConfig.from_pretrained(teacher_dir))
    keep = all_kept(teacher_config.num_hidden_layers, max(lengths))
    teacher_gflops = token_budget(teacher_config, keep, lengths)["gflops_per_example"]
    return {f"source.{k}": v for k, v in scores.items()} | {"teacher_gflops_per_example": teacher_gflops}


def train_cell(p: Params, cell: tuple[float, float], lam: float, chosen: dict[str, Any],
               dirs: dict[str, Path], out_dir: Path, work_dir: Path, key: str,
               tracker: NullTracker) -> dict[str, Any]:  # fmt: skip
    """One cell at one λ: cut, score the source, train the gates, save into ``out_dir``. ``chosen``: what
    :func:`resolve_distil_from` said (resolved once for every cell and λ: ``auto`` scores two models)."""
    cfg, name = p.gates, cell_run_name(cell, lam, p.gates_dynabert.distil_from)
    model, teacher = source_subnetwork(
        dirs["depth_kd"], dirs["teacher"], cell, chosen["distil_from"],
        gate_scales_vector=cfg.gate_scales_vector, straight_through=cfg.straight_through,
    )  # fmt: skip
    source = source_scores(model, dirs["teacher"], dirs["data"], cfg.eval_batch_size)
    plan = GateTraining(
        f"gates-{name}", lam, cfg.mass, cfg.layer_cost, cfg.bimodal_weight, cfg.bimodal_start, cfg.epochs,
        cfg.selection,
    )  # fmt: skip
    model, record = train_gated(cfg, plan, model, teacher, p.seed, dirs["data"], work_dir, key, tracker)
    extra = {"lambda": lam, "width": cell[0], "depth": cell[1]} | chosen | source
    return save_gated(
        model, record, dirs["data"], dirs["teacher"], out_dir, cfg.eval_batch_size, extra, tracker
    )


def run(ctx: StageContext) -> dict[str, Any]:
    p = ctx.params
    check_cells(p)
    dirs = {name: ctx.upstream(name) for name in ("data", "teacher", "depth_kd")}
    chosen = resolve_distil_from(p.gates_dynabert.distil_from, dirs, p.gates.eval_batch_size)
    metrics: dict[str, Any] = {}
    for cell in p.gates_dynabert.subnetworks:
        for lam in p.gates_dynabert.lambdas:
            name = cell_run_name(cell, lam, p.gates_dynabert.distil_from)
            found = train_cell(p, cell, lam, chosen, dirs, ctx.out / name, ctx.work / name, ctx.key,
                               ctx.tracker)  # fmt: skip
            metrics |= run_metrics(name, found)
    return metrics


STAGE = register(
    Stage(
        name="gates_dynabert",
        out="artifacts/gates_dynabert",
        sections=("gates", "gates_dynabert", "seed"),
        upstream=("data", "teacher", "depth_kd"),
        run=run,
        flow="gates_dynabert",
        plots=lambda p: {
            f"{name}/{LOSS_CURVE}": loss_plot(f"token gates on {name}: training loss")[LOSS_CURVE]
            for name in run_names(p)
        },
        headline=headline,
        description="token gates on DynaBERT sub-networks (width x depth x length; one model per cell and λ)",
    )
)
