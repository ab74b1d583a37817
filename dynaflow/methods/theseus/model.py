"""BERT-of-Theseus (Xu et al., 2020): compress a fine-tuned BERT by progressive module replacing.

The predecessor's ``L`` encoder layers are grouped into ``L/r`` modules of ``r`` consecutive layers. The
successor has one layer per module, initialised from the predecessor's *first* ``L/r`` layers (as the
official code does). In training, one independent Bernoulli draw per module and batch decides whether the
successor layer replaces its module; the predecessor's embeddings, layers, pooler and classifier are shared
and frozen, and gradients flow through the predecessor layers above a replaced module into the successor.
In eval mode only the successor layers run. :func:`export_successor` turns the result into a plain
Hugging Face ``BertForSequenceClassification`` with ``L/r`` layers.

Resume is exact because nothing here has hidden state: the replacing rate is a pure function of the
optimizer step (:class:`ReplacingSchedule`) and the draws a pure function of ``(seed, step)``
(:func:`draw_gates`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn
from transformers import BertForSequenceClassification
from transformers.modeling_outputs import BaseModelOutputWithPastAndCrossAttentions

_GATE_STREAM = 0x7E5E  # keeps the per-step draws apart from other (seed, n)-seeded streams


@dataclass(frozen=True)
class ReplacingSchedule:
    """Replacing rate ``p_t`` of the batch after ``t`` optimizer steps (the official schedulers, fixed).

    * ``linear`` (curriculum): ``p_t = min(1, k·t + b)`` with ``b = rate``; successor-only once it reaches 1.
    * ``constant``: ``p_t = rate``; ``1`` from step ``steps_for_replacing`` on. ``None`` means never (the
      official default ``0`` is not None there, so its constant runs jump straight to ``p = 1``).

    ``end``: ``p = 1`` from this step on whatever the scheduler says: the successor-only fine-tuning phase.
    """

    kind: Literal["constant", "linear"]
    rate: float
    k: float = 0.0
    steps_for_replacing: int | None = None
    end: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("constant", "linear"):
            raise ValueError(f"scheduler must be 'constant' or 'linear', got {self.kind!r}")
        if not 0 <= self.rate <= 1:
            raise ValueError(f"replacing rate {self.rate} is outside [0, 1]")
        if self.k < 0:
            raise ValueError(f"k = {self.k} must be >= 0")

    def __call__(self, step: int) -> float:
        if self.end is not None and step >= self.end:
            return 1.0
        if self.kind == "linear":
            return min(1.0, self.k * step + self.rate)
        if self.steps_for_replacing is not None and step >= self.steps_for_replacing:
            return 1.0
        return self.rate


def draw_gates(rate: float, n_modules: int, seed: int, step: int) -> list[bool]:
    """One independent Bernoulli(``rate``) draw per module: True = the successor layer replaces it."""
    u = np.random.default_rng([seed, _GATE_STREAM, step]).random(n_modules)
    return [bool(x) for x in u < rate]


class TheseusEncoder(nn.Module):
    """Drop-in ``BertEncoder``: the predecessor's layers ``layer`` (frozen), the successor's ``scc_layer``."""

    def __init__(self, predecessor: nn.Module, compress_ratio: int):
        super().__init__()
        n = len(predecessor.layer)
        if compress_ratio < 1 or n % compress_ratio:
            raise ValueError(f"compress_ratio {compress_ratio} does not divide the predecessor's {n} layers")
        self.config = predecessor.config
        self.compress_ratio = compress_ratio
        self.layer = predecessor.layer
        self.scc_layer = nn.ModuleList(copy.deepcopy(self.layer[i]) for i in range(n // compress_ratio))
        # Which modules the successor replaces in the next training forward (set per batch).
        self.gates: list[bool] | None = None

    def active_layers(self) -> list[nn.Module]:
        if not self.training:
            return list(self.scc_layer)
        if self.gates is None or len(self.gates) != len(self.scc_layer):
            raise RuntimeError(
                f"training forward needs gates for {len(self.scc_layer)} modules: set encoder.gates "
                "(see draw_gates), or call eval() for the successor alone"
            )
        r, layers = self.compress_ratio, []
        for i, replace in enumerate(self.gates):
            layers += [self.scc_layer[i]] if replace else list(self.layer[i * r : (i + 1) * r])
        return layers

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
        past_key_values: Any = None,
        use_cache: bool | None = None,
        **kwargs: Any,
    ) -> BaseModelOutputWithPastAndCrossAttentions:
        for layer in self.active_layers():
            hidden_states = layer(
                hidden_states,
                attention_mask,
                encoder_hidden_states,
                encoder_attention_mask=encoder_attention_mask,
                past_key_values=past_key_values,
                **kwargs,
            )
        return BaseModelOutputWithPastAndCrossAttentions(last_hidden_state=hidden_states)


def build_theseus(
    predecessor: BertForSequenceClassification, compress_ratio: int
) -> BertForSequenceClassification:
    """Turn ``predecessor`` (in place) into a Theseus model; only the successor layers keep requires_grad."""
    encoder = TheseusEncoder(predecessor.bert.encoder, compress_ratio)
    predecessor.bert.encoder = encoder
    for p in predecessor.parameters():
        p.requires_grad_(False)
    for p in encoder.scc_layer.parameters():
        p.requires_grad_(True)
    return predecessor


def theseus_encoder(model: BertForSequenceClassification) -> TheseusEncoder:
    encoder = model.bert.encoder
    if not isinstance(encoder, TheseusEncoder):
        raise TypeError("not a Theseus model (see build_theseus)")
    return encoder


def export_successor(model: BertForSequenceClassification) -> BertForSequenceClassification:
    """The successor as a plain ``BertForSequenceClassification`` (``num_hidden_layers = L/r``), eval mode."""
    encoder = theseus_encoder(model)
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = len(encoder.scc_layer)
    state = {
        k.replace("bert.encoder.scc_layer.", "bert.encoder.layer."): v
        for k, v in model.state_dict().items()
        if not k.startswith("bert.encoder.layer.")
    }
    successor = BertForSequenceClassification(config)
    successor.load_state_dict(state, strict=True)
    return successor.eval()


def check_divides(num_layers: int, compress_ratio: int) -> None:
    if num_layers % compress_ratio or compress_ratio > num_layers:
        raise ValueError(
            f"theseus.compress_ratio = {compress_ratio} does not divide the predecessor's {num_layers} "
            f"layers (allowed: {[r for r in range(2, num_layers + 1) if num_layers % r == 0]})"
        )


def check_backbone(params: Any) -> None:
    """Fail before any work if ``theseus.compress_ratio`` does not divide the backbone's layers."""
    from transformers import AutoConfig

    from dynaflow.config import ConfigError
    from dynaflow.models.backbone import _offline_hint, resolve

    try:
        config = AutoConfig.from_pretrained(resolve(params.backbone))
    except OSError as exc:
        raise ConfigError(f"backbone = {params.backbone!r}: {_offline_hint(params.backbone, exc)}") from exc
    try:
        check_divides(config.num_hidden_layers, params.theseus.compress_ratio)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
