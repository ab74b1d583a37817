"""DynaBERT's candidates: every (width, depth) grid point, extracted into a physically smaller BERT.

Each candidate builds the extracted sub-network (:func:`dynaflow.models.extract.extract_subnetwork`), whose
logits must match the elastic model's at that width and depth; exports carry ``modeling_elastic_bert.py``
so ``trust_remote_code=True`` opens them where dynaflow is not installed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from dynaflow.evaluation.candidates import Batch, Candidate, remote_auto_map
from dynaflow.methods.dynabert import METHOD
from dynaflow.models.elastic_bert import ElasticBertForSequenceClassification
from dynaflow.models.extract import elastic_remote_code, extract_subnetwork, subnetwork_flops

REMOTE_CODE = "modeling_elastic_bert.py"


def point_name(width: float, depth: float) -> str:
    """``w0.5_d0.75``: the key the distillation stages' ``grid.json`` uses for a sub-network."""
    return f"w{float(width)}_d{float(depth)}"


@torch.inference_mode()
def elastic_logits(
    model: ElasticBertForSequenceClassification, width: float, depth: float, batch: Batch
) -> np.ndarray:
    was_training = model.training
    model.eval()
    out = model(**batch, width_mult=width, depth_mult=depth).logits.float().cpu().numpy()
    model.train(was_training)
    return out


def extracted(model: ElasticBertForSequenceClassification, width: float, depth: float) -> torch.nn.Module:
    """The sub-network as a standalone model whose saved config opens with ``trust_remote_code``."""
    sub = extract_subnetwork(model, width, depth).eval()
    classes = ("ElasticBertConfig", "ElasticBertForSequenceClassification")
    sub.config.auto_map = remote_auto_map(REMOTE_CODE, *classes)
    return sub


def subnetwork(model: ElasticBertForSequenceClassification, width: float, depth: float) -> Candidate:
    shape = model.subnet_shape(width, depth)
    arch = {"width": float(width), "depth": float(depth), "layers": len(shape.layers),
            "heads": shape.heads[0], "intermediate": shape.intermediate[0]}  # fmt: skip
    return Candidate(
        method=METHOD,
        name=point_name(width, depth),
        arch=arch,
        build=lambda: extracted(model, width, depth),
        label=f"{width:g}/{depth:g}",
        title=f"DynaBERT sub-network: width {width:g}, depth {depth:g}",
        description=(
            "A physically smaller BERT cut out of a DynaBERT model trained with dynaflow: "
            f"{arch['layers']} layer(s) (source layers {list(shape.layers)}), {arch['heads']} attention "
            f"heads and {arch['intermediate']} FFN neurons per layer."
        ),
        reference=lambda batch: elastic_logits(model, width, depth, batch),
        flops=lambda seq_len: float(subnetwork_flops(model.config, width, depth, seq_len)),
        remote_code={REMOTE_CODE: elastic_remote_code()},
    )


def grid(
    model: ElasticBertForSequenceClassification, widths: Sequence[float], depths: Sequence[float]
) -> list[Candidate]:
    """Every grid point, deepest and widest first (the order of the distillation stages' grid)."""
    return [subnetwork(model, w, d) for d in depths for w in widths]
