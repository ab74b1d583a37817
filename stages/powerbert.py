"""PoWER-BERT stage (Goyal et al., 2020): the two-stage baseline the token gates are compared against.

Per ``powerbert.lambdas`` entry, on the same teacher and data as the gates stage: (1) the configuration
search, soft extraction with PoWER-BERT's plain mass term (``LAMBDA · j`` per layer over every rank
position, no bi-modal term) for ``powerbert.search_epochs``; layer j then keeps its top ``ℓ_j`` ranks, the
rounded sum of its gates (never more than the layer before); (2) retraining from the searched weights with
that hard top-k extraction for ``powerbert.epochs``, the epoch end kept chosen on ``powerbert.selection``'s
split. The model is the gates stage's gated BERT with fixed prefix gates, so both families are measured by
the same code. Outputs: ``artifacts/powerbert/l<λ>/``, as the gates stage's (``metrics.json`` also has the
retention configuration ``retention``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from dynaflow.config import Params
from dynaflow.core.tracking import NullTracker
from stages.gates import (
    GateTraining,
    each_lambda,
    headline,
    lambda_plots,
    load_source,
    run_name,
    save_gated,
    train_gated,
)
from stages.registry import Stage, StageContext, register

log = logging.getLogger(__name__)


def train_power_bert(p: Params, lam: float, teacher_dir: Path, data_dir: Path, out_dir: Path, work_dir: Path,
                     key: str, tracker: NullTracker) -> dict[str, Any]:  # fmt: skip
    """Search, then retrain, one λ; save the retrained hard-extraction model into ``out_dir``."""
    import torch

    from dynaflow.methods.gates.regularizers import prefix_gates, retention

    cfg, name = p.powerbert, run_name(lam)
    model, teacher = load_source(teacher_dir)
    search = GateTraining(f"powerbert-{name}-search", lam, "positions", cfg.layer_cost, 0.0, 0.0,
                          cfg.search_epochs, "last")  # fmt: skip
    model, searched = train_gated(
        cfg, search, model, teacher, p.seed, data_dir, work_dir / "search", key, tracker
    )
    kept = retention(model.gates, searched["positions"])
    log.info("powerbert %s: the search keeps %s ranks per layer", name, kept)
    with torch.no_grad():
        model.gates.copy_(prefix_gates(kept, model.gates.shape[1]).to(model.gates))
    retrain = GateTraining(f"powerbert-{name}-retrain", lam, epochs=cfg.epochs, selection=cfg.selection,
                           learn_gates=False)  # fmt: skip
    model, record = train_gated(
        cfg, retrain, model, teacher, p.seed, data_dir, work_dir / "retrain", key, tracker
    )
    record["history"] = searched["history"] + record["history"]
    extra = {"lambda": lam, "retention": kept, "search_steps": searched["steps"]}
    metrics = save_gated(model, record, data_dir, teacher_dir, out_dir, cfg.eval_batch_size, extra, tracker)
    return metrics | {"train_seconds": searched["train_seconds"] + record["train_seconds"]}


def run(ctx: StageContext) -> dict[str, Any]:
    return each_lambda(ctx, ctx.params.powerbert.lambdas, train_power_bert)


STAGE = register(
    Stage(
        name="powerbert",
        out="artifacts/powerbert",
        sections=("powerbert", "seed"),
        upstream=("data", "teacher"),
        run=run,
        flow="gates",
        plots=lambda p: lambda_plots(p.powerbert.lambdas, "PoWER-BERT retraining"),
        headline=headline,
        description="PoWER-BERT: retention search, then retraining with hard extraction (one model per λ)",
    )
)
