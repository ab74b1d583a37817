"""Export a static sub-network and count its parameters / FLOPs.

:func:`extract_subnetwork` copies the (``width_mult``, ``depth_mult``) sub-network of an elastic model into a
physically smaller :class:`~dynaflow.models.elastic_bert.ElasticBertForSequenceClassification`: only kept
layers (renumbered), only the first heads / FFN neurons, contiguous weights. It saves and loads with
``save_pretrained`` / ``from_pretrained`` and gives the elastic model's logits at that width and depth.

The analytic counts follow ``research/dynabert.md`` §8: parameters include embeddings, pooler and classifier;
FLOPs = 2 x MACs of the encoder only (Q/K/V/O and FFN linear layers + QK^T + PV), per sequence, excluding
embeddings, biases, softmax, LayerNorm and activations.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import BertConfig

from dynaflow.models.elastic_bert import (
    ElasticBertConfig,
    ElasticBertForSequenceClassification,
    SubnetShape,
    subnet_shape,
)

__all__ = [
    "count_parameters",
    "elastic_remote_code",
    "extract_subnetwork",
    "subnetwork_flops",
    "subnetwork_params",
]


def elastic_remote_code() -> str:
    """``elastic_bert.py`` for ``trust_remote_code``, not registering with the Auto classes.

    Loaded as remote code, transformers maps the classes through ``config.auto_map``; registering them too
    would re-point ``elastic_bert`` to the remote copy in a process that also imports dynaflow.
    """
    from pathlib import Path

    import dynaflow.models.elastic_bert as source

    return Path(source.__file__).read_text().replace(
        "\n_register_auto()\n", "\n# Loaded as remote code: transformers maps the classes via auto_map.\n"
    )


def _head_size(config: BertConfig) -> int:
    return getattr(config, "attention_head_size", None) or config.hidden_size // config.num_attention_heads


@torch.no_grad()
def extract_subnetwork(
    model: ElasticBertForSequenceClassification, width_mult: float, depth_mult: float
) -> ElasticBertForSequenceClassification:
    """Physically sliced copy of ``model``'s sub-network at (``width_mult``, ``depth_mult``).

    The new config keeps ``num_attention_heads`` / ``intermediate_size`` of the source grid and records the
    real sizes in ``heads_per_layer`` / ``intermediate_per_layer``; ``num_hidden_layers`` is the kept depth.
    ``config.extracted_subnet`` records the multipliers and the source-layer indices.
    """
    cfg = model.config
    shape: SubnetShape = model.subnet_shape(width_mult, depth_mult)
    d = cfg.attention_head_size

    prev = getattr(cfg, "extracted_subnet", None)
    source_layers = [prev["source_layers"][i] for i in shape.layers] if prev else list(shape.layers)
    new_cfg = ElasticBertConfig.from_bert_config(
        cfg,
        num_hidden_layers=len(shape.layers),
        heads_per_layer=shape.heads,
        intermediate_per_layer=shape.intermediate,
        attention_head_size=d,
        extracted_subnet={
            "width_mult": float(width_mult),
            "depth_mult": float(depth_mult),
            "source_layers": source_layers,
        },
    )

    src = model.state_dict()
    state: dict[str, torch.Tensor] = {k: v for k, v in src.items() if not k.startswith("bert.encoder.")}
    for new_i, (old_i, heads, inter) in enumerate(
        zip(shape.layers, shape.heads, shape.intermediate, strict=True)
    ):
        old, new = f"bert.encoder.layer.{old_i}.", f"bert.encoder.layer.{new_i}."
        a = heads * d
        # (suffix, slice): rows for outputs that shrink, columns for inputs that shrink, whole otherwise.
        cuts = {
            "attention.self.query.weight": (slice(0, a),),
            "attention.self.query.bias": (slice(0, a),),
            "attention.self.key.weight": (slice(0, a),),
            "attention.self.key.bias": (slice(0, a),),
            "attention.self.value.weight": (slice(0, a),),
            "attention.self.value.bias": (slice(0, a),),
            "attention.output.dense.weight": (slice(None), slice(0, a)),
            "intermediate.dense.weight": (slice(0, inter),),
            "intermediate.dense.bias": (slice(0, inter),),
            "output.dense.weight": (slice(None), slice(0, inter)),
        }
        for key, value in src.items():
            if key.startswith(old):
                suffix = key[len(old) :]
                cut = cuts.get(suffix)
                # clone(): contiguous storage of exactly the kept size (a view would keep the full tensor
                # alive, and a strided weight makes the GEMM slower).
                state[new + suffix] = (value[cut] if cut is not None else value).clone(
                    memory_format=torch.contiguous_format
                )

    ref = next(model.parameters())
    sub = ElasticBertForSequenceClassification(new_cfg)
    sub.load_state_dict(state, strict=True)
    return sub.to(device=ref.device, dtype=ref.dtype).train(model.training)


def count_parameters(model: nn.Module) -> int:
    """Number of (unique) parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


def subnetwork_params(config: BertConfig, width_mult: float = 1.0, depth_mult: float = 1.0) -> int:
    """Analytic parameter count of the sub-network, embeddings, pooler and classifier included."""
    shape = subnet_shape(config, width_mult, depth_mult)
    hid, d = config.hidden_size, _head_size(config)
    embeddings = (config.vocab_size + config.max_position_embeddings + config.type_vocab_size) * hid + 2 * hid
    encoder = 0
    for heads, inter in zip(shape.heads, shape.intermediate, strict=True):
        a = heads * d
        encoder += 3 * (hid * a + a)  # Q, K, V
        encoder += a * hid + hid  # attention output dense
        encoder += hid * inter + inter  # FFN in
        encoder += inter * hid + hid  # FFN out
        encoder += 2 * 2 * hid  # two LayerNorms
    pooler = hid * hid + hid
    classifier = hid * config.num_labels + config.num_labels
    return embeddings + encoder + pooler + classifier


def subnetwork_flops(
    config: BertConfig, width_mult: float = 1.0, depth_mult: float = 1.0, seq_len: int = 128
) -> int:
    """Analytic encoder FLOPs for one sequence of ``seq_len`` tokens: 2 x MACs (linear layers, QK^T, PV)."""
    shape = subnet_shape(config, width_mult, depth_mult)
    hid, d, t = config.hidden_size, _head_size(config), seq_len
    macs = 0
    for heads, inter in zip(shape.heads, shape.intermediate, strict=True):
        a = heads * d
        macs += t * (4 * hid * a)  # Q, K, V and output projections
        macs += t * (2 * hid * inter)  # FFN in and out
        macs += 2 * t * t * a  # QK^T and PV
    return 2 * macs
