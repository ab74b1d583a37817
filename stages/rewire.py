"""Rewire stage: head and neuron importance on the teacher, then reorder so the important ones come first.

DynaBERT keeps the *first* heads and neurons of every layer when it narrows the network, so the teacher's
heads and FFN neurons are permuted by descending importance (function-preserving; checked below). The
stage also slices the teacher into every (width, depth) sub-network with no further training, rewired and
not rewired, and records their dev metrics: the floor that distillation must beat, and what rewiring
alone buys.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from dynaflow.config import RewireConfig
from dynaflow.core.plots import heatmap
from dynaflow.core.tracking import NullTracker
from dynaflow.data.splits import (
    TOKENIZER_DIR,
    TokenizedSplit,
    iter_batches,
    load_split,
    num_batches,
    read_task_meta,
)
from stages.registry import Stage, StageContext, extremes, register

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)


def importance_split(data_dir: Path, cfg: RewireConfig, dev_splits: list[str]) -> TokenizedSplit:
    # The official code loops over every dev set of the task (MNLI: matched and mismatched).
    names = dev_splits if cfg.split == "dev" else ["train"]
    parts = [load_split(data_dir, n) for n in names]
    split = (
        parts[0]
        if len(parts) == 1
        else TokenizedSplit(
            [x for p in parts for x in p.input_ids],
            [x for p in parts for x in p.token_type_ids],
            np.concatenate([p.labels for p in parts]),
        )
    )
    return split if cfg.max_examples is None else split.subset(range(min(cfg.max_examples, len(split))))


def grid_scores(
    model: torch.nn.Module,
    task: str,
    dev: dict[str, TokenizedSplit],
    widths: list[float],
    depths: list[float],
) -> dict[str, float]:
    from dynaflow.methods.dynabert.grid import evaluate_grid

    return {k: m["score"] for k, m in evaluate_grid(model, task, dev, widths, depths).items()}


def rewire_teacher(
    cfg: RewireConfig,
    widths: list[float],
    depths: list[float],
    teacher_dir: Path,
    data_dir: Path,
    out_dir: Path,
    tracker: NullTracker,
) -> dict[str, Any]:
    # Imported here, as in every stage module: `dynaflow status` imports them all to read the declarations.
    import torch
    from safetensors.torch import save_file

    from dynaflow.evaluation.scoring import load_dev
    from dynaflow.methods.dynabert.importance import compute_importance, rewire_
    from dynaflow.models.backbone import load_elastic

    meta = read_task_meta(data_dir)
    model = load_elastic(teacher_dir)
    split = importance_split(data_dir, cfg, meta["dev_splits"])
    batches = iter_batches(split, cfg.batch_size, pad_id=model.config.pad_token_id or 0)
    head_imp, neuron_imp = compute_importance(
        model, batches, cumulative_grad=cfg.cumulative_grad, total=num_batches(len(split), cfg.batch_size)
    )

    dev = load_dev(data_dir, meta["dev_splits"])
    probe = next(iter_batches(dev[meta["dev_splits"][0]], 16))
    probe.pop("labels")
    model.eval()
    with torch.no_grad():
        before = model(**probe).logits
    floor_plain = grid_scores(model, meta["task"], dev, widths, depths) if cfg.evaluate_grid else {}
    rewire_(model, head_imp, neuron_imp)
    with torch.no_grad():
        drift = (model(**probe).logits - before).abs().max().item()
    if drift > 1e-4:  # a permutation must not change the function; anything else is a bug, not noise
        raise RuntimeError(f"rewiring changed the teacher's logits by {drift:.2e}")
    floor_rewired = grid_scores(model, meta["task"], dev, widths, depths) if cfg.evaluate_grid else {}

    model.save_pretrained(out_dir, safe_serialization=True)
    shutil.copytree(data_dir / TOKENIZER_DIR, out_dir, dirs_exist_ok=True)
    neurons = neuron_imp if isinstance(neuron_imp, list) else list(neuron_imp)
    save_file(
        {
            "head_importance": head_imp.contiguous(),
            **{f"neuron_importance.{i}": n.contiguous() for i, n in enumerate(neurons)},
        },
        out_dir / "importance.safetensors",
    )
    heatmap(head_imp.numpy(), [str(h) for h in range(head_imp.shape[1])],
            [str(layer) for layer in range(head_imp.shape[0])], "head (original index)", "layer",
            "Head importance |dL/d head-mask| (before rewiring)", out_dir / "head_importance.png",
            annotate=False)  # fmt: skip
    tracker.log_artifact(out_dir / "head_importance.png")

    metrics: dict[str, Any] = {"rewire_max_logit_drift": drift, "importance_examples": len(split)}
    metrics |= {f"floor_rewired.{k}": v for k, v in floor_rewired.items()}
    metrics |= {f"floor_plain.{k}": v for k, v in floor_plain.items()}
    tracker.log_metrics(metrics)
    log.info("rewired; sliced-teacher dev scores: %s", floor_rewired)
    return metrics


def run(ctx: StageContext) -> dict[str, Any]:
    p = ctx.params
    return rewire_teacher(
        p.rewire, p.widths, p.depths, ctx.upstream("teacher"), ctx.upstream("data"), ctx.out, ctx.tracker
    )


STAGE = register(
    Stage(
        name="rewire",
        out="artifacts/rewired",
        sections=("rewire", "widths", "depths"),
        upstream=("data", "teacher"),
        run=run,
        # the sliced, rewired teacher before any training: the floor distillation must beat
        headline=lambda m: extremes([v for k, v in m.items() if k.startswith("floor_rewired.")]),
        description="DynaBERT: head and neuron importance, teacher reordered most important first",
    )
)
