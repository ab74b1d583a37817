"""Token-gated BERT: every layer ranks its tokens by significance and keeps only those whose gate is on.

Jeong & Kwak (2021, arXiv 2102.09727) learn trainable gates on the tokens entering every layer, with a
bi-modal regulariser that drives each gate to 0 or 1, so one fine-tuning stage decides how many tokens each
layer needs. No code was published and only the paper's introduction is readable; this file is dynaflow's
reconstruction (``research/other_seeds.md`` section D), built on PoWER-BERT's code-verified soft extraction:

* In layer j, after self-attention, every token gets a **significance**: the attention it receives, summed
  over heads and over the (present) queries, as PoWER-BERT and the Length-Adaptive Transformer compute it.
  [CLS] ranks first always; padding and tokens dropped earlier rank last and are never counted.
* The k-th most significant token is multiplied by the gate ``gates[j, k]`` in [0, 1] (one gate per rank
  position per layer, not per token: the gates say *how many* tokens a layer keeps, significance *which*).
* **Soft form** (training): a gated token's vector is scaled by its gate (``gate_scales_vector``) and its
  *presence* (the product of its gates so far) weights it as a key in every later layer's softmax, so a
  gate of exactly 0 removes the token from all later attention. That second part is our choice: with it,
  exact 0/1 gates give the same predictions as dropping the tokens (PoWER-BERT's zeroed vectors still
  receive attention through the key bias).
* Soft gates alone left a gap (bench profile, SST-2): the layers learned gates of 0.1 on every token but
  [CLS], which a softmax over presences and the next LayerNorm all but undo, so the soft form kept 84.6%
  while dropping those tokens gave chance. ``straight_through`` (default in params.yaml) runs the forward
  pass with the gates rounded, so training sees what inference does; the gradient still reaches the gate
  (through a presence of 0, the gradient says what the token would add), and the mass and bi-modal terms
  act on the unrounded gates.
* **Hard form** (inference, ``config.hard_gates``): ranks whose gate is >= 0.5 are gathered out after the
  attention block (its output projection and LayerNorm run on every token the layer received: one gather
  instead of two, and ONNX Runtime fuses the block as in the plain model; at batch 1 that made the 4-layer
  gated cell 10-20% faster than gathering first), the FFN runs on the kept tokens only and later layers run
  on the shorter sequence, so the compute really shrinks. Which ranks a layer keeps is fixed by the
  trained gates; how many tokens that is depends on the input's length (:func:`kept_lengths`).

The classes subclass the elastic BERT (``elastic_bert.py``), so a gated model can sit on the teacher or on
any extracted DynaBERT sub-network; saved with ``auto_map``, both files load as remote code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import SequenceClassifierOutput

from dynaflow.models.elastic_bert import ElasticBertConfig, ElasticBertForSequenceClassification

KEEP_THRESHOLD = 0.5  # a rank whose gate is at least this is kept by the hard form


class GatedBertConfig(ElasticBertConfig):
    """``ElasticBertConfig`` plus the gates' form.

    Args:
        hard_gates: drop the tokens whose rank's gate is below 0.5 (inference) instead of scaling them.
        gate_scales_vector: in the soft form, also scale a gated token's vector by its gate (not only its
            weight as a key in later layers).
        straight_through: in the soft form, the forward pass uses each gate rounded to 0 or 1 (what the hard
            form does) and the gradient reaches the gate as if it had not been rounded.
    """

    model_type = "gated_bert"

    def __init__(
        self, hard_gates: bool = False, gate_scales_vector: bool = True, straight_through: bool = False,
        **kwargs: Any,
    ) -> None:  # fmt: skip
        super().__init__(**kwargs)
        self.hard_gates = bool(hard_gates)
        self.gate_scales_vector = bool(gate_scales_vector)
        self.straight_through = bool(straight_through)


def significance(probs: torch.Tensor, presence: torch.Tensor) -> torch.Tensor:
    """``[B, T]``: the attention each token receives from present queries, summed over heads; [CLS] first,
    absent tokens (padding, dropped) last. ``probs``: ``[B, heads, queries, keys]``."""
    received = torch.einsum("bhqk,bq->bk", probs, presence)
    received = received.masked_fill(presence <= 0, float("-inf"))
    # [CLS] sits at position 0 in both forms (the soft form keeps the input order; the hard form gathers the
    # kept ranks in rank order, rank 0 first). A pad exports as two ONNX ops where writing into a zeros
    # tensor takes fifteen, each a few microseconds per layer at batch 1.
    return nn.functional.pad(received[:, 1:], (1, 0), value=float("inf"))


def rank_order(score: torch.Tensor) -> torch.Tensor:
    """Token indices from the most to the least significant (``topk``: ONNX exports it, not a stable sort;
    the only ties are between absent tokens, whose order changes nothing)."""
    return torch.topk(score.detach(), score.shape[-1], dim=-1).indices


def gate_row(gates: torch.Tensor, length: int) -> torch.Tensor:
    """One layer's gates for ``length`` rank positions, [CLS]'s (rank 0) fixed at 1."""
    row = gates[:length].clamp(0.0, 1.0)
    return torch.cat([row.new_ones(1), row[1:]])


def kept_lengths(keep: torch.Tensor, length: int) -> list[int]:
    """Tokens entering the first layer, then kept by each layer, for one input of ``length`` real tokens.

    ``keep``: ``[layers, positions]`` booleans (rank k of layer j kept). A layer ranks only the tokens the
    previous one kept, so layer j keeps the kept ranks below that count.
    """
    counts, n = [length], length
    for row in keep.tolist():
        n = 1 + sum(row[1:n])  # [CLS] always
        counts.append(n)
    return counts


class GatedBertForSequenceClassification(ElasticBertForSequenceClassification):
    """An elastic BERT whose layers gate (soft) or drop (hard) their least significant tokens.

    ``gates``: ``[layers, max_position_embeddings]``, one per rank position per layer, initialised to 1
    (every token kept: the source model's logits).
    """

    config_class = GatedBertConfig
    config: GatedBertConfig

    def __init__(self, config: Any) -> None:
        if not isinstance(config, GatedBertConfig):
            config = GatedBertConfig(**config.to_dict())
        super().__init__(config)
        self.gates = nn.Parameter(torch.ones(config.num_hidden_layers, config.max_position_embeddings))

    def _init_weights(self, module: nn.Module) -> None:
        if module is self:  # post_init on the top module: the gates start open (from_pretrained loads them)
            with torch.no_grad():
                self.gates.fill_(1.0)
            return
        super()._init_weights(module)

    def keep_mask(self) -> torch.Tensor:
        """``[layers, positions]``: the ranks the hard form keeps (gate >= 0.5; [CLS]'s always)."""
        keep = self.gates.detach() >= KEEP_THRESHOLD
        keep[:, 0] = True
        return keep

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        output_hidden_states: bool = False,
        labels: torch.Tensor | None = None,
        **_: Any,
    ) -> SequenceClassifierOutput:
        """Every layer of the model (it is already the sub-network it should be), gated or dropping.

        ``hidden_states`` (if requested): the embedding output, then each layer's output in the soft form
        (tokens in input order, same length: a distillation target can be compared token for token).
        """
        x = self.bert.embeddings(input_ids, token_type_ids)
        presence = attention_mask.to(x.dtype) if attention_mask is not None else x.new_ones(x.shape[:2])
        hidden_states = [x] if output_hidden_states else None
        for j, layer in enumerate(self.bert.encoder.layer):
            x, presence = self._layer(j, layer, x, presence)
            if hidden_states is not None:
                hidden_states.append(x)
        logits = self.classifier(self.dropout(self.bert.pooler(x)))
        states = tuple(hidden_states) if hidden_states is not None else None
        return SequenceClassifierOutput(
            loss=self.classification_loss(logits, labels), logits=logits, hidden_states=states
        )

    def _layer(
        self, j: int, layer: nn.Module, x: torch.Tensor, presence: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        attn = layer.attention.self
        B, T, _ = x.shape
        heads, d = self.config.layer_heads(j), self.config.attention_head_size
        q, k, v = (lin(x).view(B, T, heads, d).transpose(1, 2) for lin in (attn.query, attn.key, attn.value))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(d)
        if self.config.hard_gates:
            # presence is 0 or 1 here: the usual additive mask (2 ONNX ops where the soft form takes 13)
            absent = (1.0 - presence[:, None, None, :]) * torch.finfo(scores.dtype).min
            probs = (scores + absent).softmax(dim=-1)
        else:  # softmax with each key weighted by its presence: 0 removes it exactly, 1 leaves it unchanged.
            top = scores.masked_fill(presence[:, None, None, :] <= 0, float("-inf")).amax(-1, keepdim=True)
            weights = torch.exp(scores - top.detach().clamp_min(-1e4)) * presence[:, None, None, :]
            probs = weights / weights.sum(-1, keepdim=True).clamp_min(1e-30)
        ctx = (attn.dropout(probs) @ v).transpose(1, 2).reshape(B, T, heads * d)
        order = rank_order(significance(probs, presence))
        if self.config.hard_gates:
            keep = self.keep_mask()[j, :T]
            ranks = torch.nonzero(keep).squeeze(1)  # the kept rank positions below this length
            index = order.index_select(1, ranks)  # [B, kept]: the tokens at those ranks
            a = layer.attention.output(ctx, x)
            a = a.gather(1, index[..., None].expand(-1, -1, a.shape[-1]))
            presence = presence.gather(1, index)
            return self._ffn(layer, a), presence
        gate = gate_row(self.gates[j], T)[torch.argsort(order, dim=-1)]  # [B, T]: each token's rank's gate
        if self.config.straight_through:  # the hard form's decision forward, the gate's gradient backward
            gate = (gate >= KEEP_THRESHOLD).to(gate.dtype) + gate - gate.detach()
        a = layer.attention.output(ctx, x)
        if self.config.gate_scales_vector:
            a = a * gate[..., None]
        presence = presence * gate
        return self._ffn(layer, a), presence

    @staticmethod
    def _ffn(layer: nn.Module, a: torch.Tensor) -> torch.Tensor:
        return layer.output(layer.intermediate(a, layer.intermediate.dense.out_features), a)


def gated_flops(config: Any, lengths: Sequence[int]) -> int:
    """Encoder FLOPs (2 x MACs, as ``extract.subnetwork_flops``) of one input whose layers see ``lengths``
    tokens (:func:`kept_lengths`): Q, K, V, scores, context and the output projection over the layer's
    input, the FFN over the tokens it keeps (what the hard form runs)."""
    hid, d = config.hidden_size, config.attention_head_size
    macs = 0
    for j in range(config.num_hidden_layers):
        t_in, t_out = lengths[j], lengths[j + 1]
        a = config.layer_heads(j) * d
        macs += t_in * 4 * hid * a + 2 * t_in * t_in * a
        macs += t_out * 2 * hid * config.layer_intermediate(j)
    return 2 * macs


def gated_copy(
    model: ElasticBertForSequenceClassification, **config: Any
) -> GatedBertForSequenceClassification:
    """A gated model with ``model``'s weights (the teacher, or an extracted DynaBERT sub-network), gates
    open."""
    gated = GatedBertForSequenceClassification(GatedBertConfig(**model.config.to_dict() | config))
    missing, unexpected = gated.load_state_dict(model.state_dict(), strict=False)
    if unexpected or missing != ["gates"]:
        raise ValueError(f"not an elastic BERT's weights: missing {missing}, unexpected {unexpected}")
    ref = next(model.parameters())
    return gated.to(device=ref.device, dtype=ref.dtype)
