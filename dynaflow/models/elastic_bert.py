"""Elastic (width- and depth-adaptive) BERT for sequence classification, as in DynaBERT.

One readable file in the spirit of nanoGPT's ``model.py``, with Hugging Face ``modeling_bert`` module names so
HF checkpoints load unchanged (``bert.embeddings...``, ``bert.encoder.layer.N.attention.self.query``, ...,
``bert.pooler.dense``, ``classifier``).

Sub-network rules follow the official DynaBERT code (see docs in ``research/dynabert.md`` §1):

* width m_w keeps the first ``h = round(H * m_w)`` heads (Python ``round``) and the first
  ``int(h / H * d_ff)`` FFN neurons (at least 1) of every layer; head size never changes;
* depth m_d keeps layers ``[floor(i / m_d) for i in range(round(m_d * L))]``.

Width is applied by slicing weights (``weight[:out, :in]``) before ``F.linear``, never by masking, so a
narrower sub-network really does less work. Embeddings, LayerNorms, pooler and classifier are never sliced.

A physically smaller sub-network (see :mod:`dynaflow.models.extract`) is described by
``ElasticBertConfig.heads_per_layer`` / ``intermediate_per_layer``. ``num_attention_heads`` and
``intermediate_size`` keep describing the *source* grid, so a width multiplier means the same thing for the
source model and for an extracted one (the per-layer sizes act as a cap).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import BertConfig, PreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import SequenceClassifierOutput

__all__ = [
    "ElasticBertConfig",
    "ElasticBertForSequenceClassification",
    "SubnetShape",
    "hidden_layer_map",
    "kept_layers",
    "subnet_shape",
    "validate_mult",
    "width_heads",
    "width_intermediate",
]


# ------------------------------------------------------------------------------------------------------------
# Sub-network rules (official DynaBERT code, generalised from 12 heads / 12 layers to H heads / L layers)


def validate_mult(name: str, value: float) -> float:
    """Check that a width/depth multiplier lies in (0, 1]; return it as a float."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0.0 < value <= 1.0:
        raise ValueError(
            f"{name}={value!r} is not allowed: a multiplier must be a number in (0, 1], "
            f"where 1.0 is the full network (e.g. 1.0, 0.75, 0.5, 0.25)"
        )
    return float(value)


def width_heads(num_heads: int, width_mult: float) -> int:
    """Heads kept at width ``width_mult``: ``round(num_heads * width_mult)`` (Python round, as official)."""
    width_mult = validate_mult("width_mult", width_mult)
    heads = round(num_heads * width_mult)
    if heads < 1:
        raise ValueError(
            f"width_mult={width_mult!r} keeps round({num_heads} * {width_mult!r}) = 0 of {num_heads} "
            f"attention heads; width_mult must be in (0, 1] and keep at least one head, i.e. be > "
            f"{0.5 / num_heads:.4g} for {num_heads} heads"
        )
    return heads


def width_intermediate(intermediate_size: int, num_heads: int, width_mult: float) -> int:
    """FFN neurons kept at width ``width_mult`` (official ``round_to_nearest``: ``max(1, int(h/H*d_ff))``)."""
    # Same operation order as the official code, so float rounding gives identical sizes.
    new_width_mult = width_heads(num_heads, width_mult) / num_heads
    return max(1, int(new_width_mult * intermediate_size))


def kept_layers(num_layers: int, depth_mult: float) -> list[int]:
    """0-based indices of the layers kept at depth ``depth_mult`` (official ``BertEncoder`` rule).

    ``[floor(i / m_d) for i in range(round(m_d * L))]`` (Python round); for L=12, 0.75 drops 3, 7, 11 and
    0.5 keeps the even layers.
    """
    depth_mult = validate_mult("depth_mult", depth_mult)
    depth = round(depth_mult * num_layers)
    if depth < 1:
        raise ValueError(
            f"depth_mult={depth_mult!r} keeps round({depth_mult!r} * {num_layers}) = 0 of {num_layers} "
            f"layers; depth_mult must be in (0, 1] and keep at least one layer, i.e. be > "
            f"{0.5 / num_layers:.4g} for {num_layers} layers"
        )
    return [math.floor(i / depth_mult) for i in range(depth)]


def hidden_layer_map(num_layers: int, depth_mult: float) -> list[int]:
    """Teacher ``hidden_states`` index for each student ``hidden_states`` entry (official run_glue map).

    ``[floor(i / m_d) for i < depth] + [L]``: entry 0 pairs the embedding outputs, the last entry pairs the
    student's last layer with the teacher's last layer. Note the official map is shifted with respect to
    :func:`kept_layers` (e.g. for 0.75 the student's 3rd layer, source layer 2, is matched to teacher
    index 4); this is reproduced as is.
    """
    return kept_layers(num_layers, depth_mult) + [num_layers]


@dataclass(frozen=True)
class SubnetShape:
    """Physical shape of one sub-network: kept source-layer indices and per-kept-layer head / FFN sizes."""

    layers: list[int]
    heads: list[int]
    intermediate: list[int]


def subnet_shape(config: BertConfig, width_mult: float = 1.0, depth_mult: float = 1.0) -> SubnetShape:
    """Sizes of the sub-network at (``width_mult``, ``depth_mult``) of a (possibly already smaller) model."""
    num_heads = config.num_attention_heads
    heads = width_heads(num_heads, width_mult)
    inter = width_intermediate(config.intermediate_size, num_heads, width_mult)
    layers = kept_layers(config.num_hidden_layers, depth_mult)
    heads_pl = getattr(config, "heads_per_layer", None) or [num_heads] * config.num_hidden_layers
    inter_pl = getattr(config, "intermediate_per_layer", None) or [config.intermediate_size] * len(heads_pl)
    return SubnetShape(
        layers=layers,
        heads=[min(heads, heads_pl[i]) for i in layers],
        intermediate=[min(inter, inter_pl[i]) for i in layers],
    )


# ------------------------------------------------------------------------------------------------------------
# Config


class ElasticBertConfig(BertConfig):
    """``BertConfig`` plus per-layer sizes for physically smaller sub-networks.

    Args:
        heads_per_layer: heads actually stored in each layer (None = ``num_attention_heads`` everywhere).
        intermediate_per_layer: FFN neurons stored in each layer (None = ``intermediate_size`` everywhere).
        attention_head_size: head size; defaults to ``hidden_size // num_attention_heads`` of the source and
            is stored explicitly so it never changes when heads are removed.
    """

    model_type = "elastic_bert"

    # A plain __init__ (rather than dataclass fields) works with the transformers 4.x and 5.x config classes.
    def __init__(
        self,
        heads_per_layer: Sequence[int] | None = None,
        intermediate_per_layer: Sequence[int] | None = None,
        attention_head_size: int | None = None,
        **kwargs: Any,
    ) -> None:
        kwargs.pop("model_type", None)  # a "bert" config.json must not override our model_type
        super().__init__(**kwargs)
        self.heads_per_layer = [int(h) for h in heads_per_layer] if heads_per_layer is not None else None
        self.intermediate_per_layer = (
            [int(n) for n in intermediate_per_layer] if intermediate_per_layer is not None else None
        )
        self.attention_head_size = int(attention_head_size or self.hidden_size // self.num_attention_heads)
        for name in ("heads_per_layer", "intermediate_per_layer"):
            sizes = getattr(self, name)
            if sizes is not None and (len(sizes) != self.num_hidden_layers or min(sizes, default=1) < 1):
                raise ValueError(
                    f"{name}={sizes} must list one size >= 1 per layer "
                    f"(num_hidden_layers={self.num_hidden_layers})"
                )

    @classmethod
    def from_bert_config(cls, config: BertConfig, **overrides: Any) -> ElasticBertConfig:
        """Copy a ``BertConfig`` (e.g. of an HF checkpoint) into an ``ElasticBertConfig``."""
        d = config.to_dict()
        for key in ("model_type", "architectures", "transformers_version"):
            d.pop(key, None)
        d.update(overrides)
        return cls(**d)

    def layer_heads(self, i: int) -> int:
        """Heads stored in layer ``i``."""
        return self.heads_per_layer[i] if self.heads_per_layer is not None else self.num_attention_heads

    def layer_intermediate(self, i: int) -> int:
        """FFN neurons stored in layer ``i``."""
        if self.intermediate_per_layer is not None:
            return self.intermediate_per_layer[i]
        return self.intermediate_size


# ------------------------------------------------------------------------------------------------------------
# Modules (HF names so state-dict keys match BertForSequenceClassification)


def _linear(
    layer: nn.Linear, x: torch.Tensor, out: int | None = None, inp: int | None = None
) -> torch.Tensor:
    """``layer(x)`` using only the first ``out`` output rows / first ``inp`` input columns (DynaLinear)."""
    weight, bias = layer.weight, layer.bias
    if out is not None and out != weight.shape[0]:
        weight = weight[:out]
        bias = bias[:out] if bias is not None else None
    if inp is not None and inp != weight.shape[1]:
        weight = weight[:, :inp]  # bias is per output unit, so it stays whole
    return F.linear(x, weight, bias)


class BertEmbeddings(nn.Module):
    def __init__(self, config: ElasticBertConfig) -> None:
        super().__init__()
        self.word_embeddings = nn.Embedding(
            config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id
        )
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        # No position_ids / token_type_ids buffers: computing them here keeps the state dict free of buffers.
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        x = x + self.position_embeddings(positions)[None]
        return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nn.Module):
    def __init__(self, config: ElasticBertConfig, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_size = config.attention_head_size
        all_head_size = num_heads * self.head_size
        self.query = nn.Linear(config.hidden_size, all_head_size)
        self.key = nn.Linear(config.hidden_size, all_head_size)
        self.value = nn.Linear(config.hidden_size, all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        num_heads: int,
        head_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        B, T, _ = x.shape
        out = num_heads * self.head_size
        # [B, T, h*d] -> [B, h, T, d]
        q = _linear(self.query, x, out=out).view(B, T, num_heads, self.head_size).transpose(1, 2)
        k = _linear(self.key, x, out=out).view(B, T, num_heads, self.head_size).transpose(1, 2)
        v = _linear(self.value, x, out=out).view(B, T, num_heads, self.head_size).transpose(1, 2)
        if head_mask is None:
            p = self.dropout.p if self.training else 0.0
            ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p)
        else:
            # Eager path: the head mask multiplies the attention probabilities after softmax and dropout,
            # exactly where the official code applies it (needed for head-importance gradients).
            scores = (q @ k.transpose(-1, -2)) / math.sqrt(self.head_size)
            if attn_mask is not None:
                scores = scores + attn_mask
            probs = self.dropout(scores.softmax(dim=-1))
            probs = probs * head_mask[:num_heads].view(1, -1, 1, 1).to(probs.dtype)
            ctx = probs @ v
        return ctx.transpose(1, 2).reshape(B, T, out)


class BertSelfOutput(nn.Module):
    def __init__(self, config: ElasticBertConfig, num_heads: int) -> None:
        super().__init__()
        self.dense = nn.Linear(num_heads * config.attention_head_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, ctx: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h = _linear(self.dense, ctx, inp=ctx.shape[-1])
        return self.LayerNorm(self.dropout(h) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: ElasticBertConfig, num_heads: int) -> None:
        super().__init__()
        self.self = BertSelfAttention(config, num_heads)
        self.output = BertSelfOutput(config, num_heads)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None, num_heads: int, head_mask: torch.Tensor | None
    ) -> torch.Tensor:
        return self.output(self.self(x, attn_mask, num_heads, head_mask), x)


class BertIntermediate(nn.Module):
    def __init__(self, config: ElasticBertConfig, intermediate_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, intermediate_size)
        act = config.hidden_act
        self.intermediate_act_fn = ACT2FN[act] if isinstance(act, str) else act  # "gelu" is the erf GELU

    def forward(self, x: torch.Tensor, intermediate_size: int) -> torch.Tensor:
        return self.intermediate_act_fn(_linear(self.dense, x, out=intermediate_size))


class BertOutput(nn.Module):
    def __init__(self, config: ElasticBertConfig, intermediate_size: int) -> None:
        super().__init__()
        self.dense = nn.Linear(intermediate_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, h: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        h = _linear(self.dense, h, inp=h.shape[-1])
        return self.LayerNorm(self.dropout(h) + residual)


class BertLayer(nn.Module):
    def __init__(self, config: ElasticBertConfig, layer_idx: int) -> None:
        super().__init__()
        heads, inter = config.layer_heads(layer_idx), config.layer_intermediate(layer_idx)
        self.attention = BertAttention(config, heads)
        self.intermediate = BertIntermediate(config, inter)
        self.output = BertOutput(config, inter)

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        num_heads: int,
        intermediate_size: int,
        head_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        a = self.attention(x, attn_mask, num_heads, head_mask)
        return self.output(self.intermediate(a, intermediate_size), a)


class BertEncoder(nn.Module):
    def __init__(self, config: ElasticBertConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList([BertLayer(config, i) for i in range(config.num_hidden_layers)])

    def forward(
        self,
        x: torch.Tensor,
        attn_mask: torch.Tensor | None,
        shape: SubnetShape,
        head_mask: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        hidden_states = [x] if output_hidden_states else None
        for li, heads, inter in zip(shape.layers, shape.heads, shape.intermediate, strict=True):
            # head_mask is indexed by the ORIGINAL layer index, as in the official code.
            hm = head_mask[li] if head_mask is not None else None
            x = self.layer[li](x, attn_mask, heads, inter, hm)
            if hidden_states is not None:
                hidden_states.append(x)
        return x, tuple(hidden_states) if hidden_states is not None else None


class BertPooler(nn.Module):
    def __init__(self, config: ElasticBertConfig) -> None:
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)
        self.activation = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(x[:, 0]))


class ElasticBertModel(nn.Module):
    """The ``bert.`` trunk: embeddings, elastic encoder, pooler."""

    def __init__(self, config: ElasticBertConfig) -> None:
        super().__init__()
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.pooler = BertPooler(config)


# ------------------------------------------------------------------------------------------------------------
# Top-level model


class ElasticBertForSequenceClassification(PreTrainedModel):
    """BERT classifier whose width and depth can be chosen per forward call (DynaBERT sub-networks).

    State-dict keys equal HF ``BertForSequenceClassification``'s, so ``from_pretrained`` loads HF BERT
    checkpoints (a plain ``BertModel`` checkpoint gives a randomly initialised classifier).
    """

    config_class = ElasticBertConfig
    config: ElasticBertConfig
    base_model_prefix = "bert"
    _no_split_modules = ["BertEmbeddings", "BertLayer"]
    # HF BERT checkpoints saved by transformers 4.x carry the position_ids buffer; we compute it instead.
    _keys_to_ignore_on_load_unexpected = [r"position_ids", r"token_type_ids"]

    def __init__(self, config: BertConfig) -> None:
        if not isinstance(config, ElasticBertConfig):
            config = ElasticBertConfig.from_bert_config(config)
        super().__init__(config)
        self.num_labels = config.num_labels
        self.bert = ElasticBertModel(config)
        drop = (
            config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        )
        self.dropout = nn.Dropout(drop)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        # Default sub-network used when forward() gets no multipliers; see set_subnet() / subnet().
        self.width_mult = 1.0
        self.depth_mult = 1.0
        self.post_init()

    # -- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_bert(cls, model: nn.Module) -> ElasticBertForSequenceClassification:
        """Build from an HF ``BertForSequenceClassification`` instance (weights copied, same device/dtype)."""
        new = cls(ElasticBertConfig.from_bert_config(model.config))
        state = {
            k: v for k, v in model.state_dict().items() if not k.endswith(("position_ids", "token_type_ids"))
        }
        new.load_state_dict(state, strict=True)
        ref = next(model.parameters())
        return new.to(device=ref.device, dtype=ref.dtype).train(model.training)

    # -- sub-network selection ------------------------------------------------------------------------------
    def set_subnet(self, width_mult: float = 1.0, depth_mult: float = 1.0) -> None:
        """Set the sub-network used by forward calls that do not pass multipliers."""
        subnet_shape(self.config, width_mult, depth_mult)  # validates both (raises ValueError)
        self.width_mult, self.depth_mult = float(width_mult), float(depth_mult)

    @contextmanager
    def subnet(
        self, width_mult: float = 1.0, depth_mult: float = 1.0
    ) -> Iterator[ElasticBertForSequenceClassification]:
        """Context manager ``with model.subnet(0.5, 0.75): model(**batch)``; restores the previous setting."""
        old = (self.width_mult, self.depth_mult)
        self.set_subnet(width_mult, depth_mult)
        try:
            yield self
        finally:
            self.width_mult, self.depth_mult = old

    def subnet_shape(self, width_mult: float | None = None, depth_mult: float | None = None) -> SubnetShape:
        """Shape of the sub-network that forward() would run with these multipliers."""
        w = self.width_mult if width_mult is None else width_mult
        d = self.depth_mult if depth_mult is None else depth_mult
        return subnet_shape(self.config, w, d)

    # -- forward --------------------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        width_mult: float | None = None,
        depth_mult: float | None = None,
        output_hidden_states: bool = False,
        head_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        """Run the sub-network at (``width_mult``, ``depth_mult``); None means the model's current setting.

        ``head_mask``: ``[num_hidden_layers, num_attention_heads]``, indexed by the original layer index; it
        multiplies the attention probabilities (slower eager attention path, for importance scores).
        ``hidden_states`` (if requested) = embedding output, then the output of each kept layer.
        """
        shape = self.subnet_shape(width_mult, depth_mult)
        if head_mask is not None:
            want = (self.config.num_hidden_layers, max(shape.heads))
            if head_mask.dim() != 2 or head_mask.shape[0] != want[0] or head_mask.shape[1] < want[1]:
                raise ValueError(
                    f"head_mask must have shape [layers, heads] = {list(want)}, got {list(head_mask.shape)}"
                )

        x = self.bert.embeddings(input_ids, token_type_ids)
        attn_mask = None
        if attention_mask is not None:
            # Additive mask as HF: 0 where attended, dtype-min where padded; broadcast over heads and queries.
            m = attention_mask[:, None, None, :].to(x.dtype)
            attn_mask = (1.0 - m) * torch.finfo(x.dtype).min
        x, hidden_states = self.bert.encoder(x, attn_mask, shape, head_mask, output_hidden_states)
        logits = self.classifier(self.dropout(self.bert.pooler(x)))
        return SequenceClassifierOutput(
            loss=self.classification_loss(logits, labels), logits=logits, hidden_states=hidden_states
        )

    def classification_loss(self, logits: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
        """Hugging Face's: MSE for one output (regression), cross-entropy otherwise; None without labels."""
        if labels is None:
            return None
        if self.num_labels == 1 or self.config.problem_type == "regression":
            return F.mse_loss(logits.view(-1), labels.view(-1).to(logits.dtype))
        return F.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))


def _register_auto() -> None:
    """Let ``AutoConfig`` / ``AutoModelForSequenceClassification`` open saved elastic checkpoints."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    try:
        AutoConfig.register(ElasticBertConfig.model_type, ElasticBertConfig)
        AutoModelForSequenceClassification.register(ElasticBertConfig, ElasticBertForSequenceClassification)
    except ValueError:  # already registered (module reloaded)
        pass


_register_auto()
