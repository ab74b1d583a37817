"""Head / neuron importance and network rewiring (DynaBERT stage 1, official ``run_glue.py`` rules).

* :func:`compute_importance` reproduces ``compute_neuron_head_importance``: model in eval mode, ordinary task
  loss against gold labels, a ``head_mask`` of ones with ``requires_grad`` so ``|dL/d head_mask|`` scores each
  head, and a first-order Taylor score per FFN neuron.
* :func:`rewire_` permutes heads and neurons of every layer in place so the most important come first (the
  width rule keeps the *first* heads/neurons). The permutation preserves the function exactly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from dynaflow.models.elastic_bert import ElasticBertForSequenceClassification

__all__ = ["compute_importance", "rewire_"]

_BATCH_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def _ffn_params(model: ElasticBertForSequenceClassification) -> list[tuple[nn.Linear, nn.Linear]]:
    """(FFN-in ``intermediate.dense``, FFN-out ``output.dense``) of every layer."""
    return [(layer.intermediate.dense, layer.output.dense) for layer in model.bert.encoder.layer]


def compute_importance(
    model: ElasticBertForSequenceClassification,
    batches: Iterable[Mapping[str, torch.Tensor]],
    cumulative_grad: bool = True,
    progress: bool = True,
    total: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | list[torch.Tensor]]:
    """Head and neuron importance of the full-size network, as the official code computes them.

    Args:
        model: the fine-tuned model (run at width 1, depth 1).
        batches: dicts with ``input_ids``, ``attention_mask``, ``token_type_ids`` and ``labels`` (the official
            code uses the dev set, sequential, batch 8).
        cumulative_grad: True (default) reproduces the official quirk: gradients are never zeroed between
            batches, so each batch adds ``|sum of gradients so far|``. False zeroes gradients before each
            batch, giving ``sum_t |g_t|``.
        progress: show a tqdm progress bar (``total``: the number of batches, for its ETA).

    Returns:
        ``head_importance`` ``[L, H]`` and ``neuron_importance`` ``[L, d_ff]`` (a list of per-layer tensors if
        the layers have different FFN sizes). Neuron score: ``|sum_j W1[i,j] G1[i,j] + b1[i] gb1[i]| +
        |sum_k W2[k,i] G2[k,i]|`` with ``W1``/``b1`` the FFN-in weight/bias and ``W2`` the FFN-out weight.
        Scores are not normalised (only the ranking within a layer matters).
    """
    cfg = model.config
    device = next(model.parameters()).device
    ffn = _ffn_params(model)
    tracked = [p for w1, w2 in ffn for p in (w1.weight, w1.bias, w2.weight)]

    was_training = model.training
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    # Only the FFN parameters need weight gradients; turning the others off saves the (large) embedding and
    # attention weight-gradient work without changing any tracked gradient.
    for p in model.parameters():
        p.requires_grad_(False)
    for p in tracked:
        p.requires_grad_(True)
        p.grad = None  # "clear gradients once" before the loop (Alg. 1)

    head_mask = torch.ones(cfg.num_hidden_layers, cfg.num_attention_heads, device=device, requires_grad=True)
    head_importance = torch.zeros(cfg.num_hidden_layers, cfg.num_attention_heads, device=device)
    neuron_importance = [torch.zeros(w1.out_features, device=device) for w1, _ in ffn]

    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="importance", unit="batch", total=total, dynamic_ncols=True)

    model.eval()  # official: from_pretrained() leaves the model in eval mode, so dropout is off
    try:
        for batch in batches:
            if not cumulative_grad:
                head_mask.grad = None
                for p in tracked:
                    p.grad = None
            inputs = {k: batch[k].to(device) for k in _BATCH_KEYS if batch.get(k) is not None}
            out = model(**inputs, width_mult=1.0, depth_mult=1.0, head_mask=head_mask)
            out.loss.backward()
            with torch.no_grad():
                head_importance += head_mask.grad.abs()
                for (w1, w2), imp in zip(ffn, neuron_importance, strict=True):
                    imp += ((w1.weight * w1.weight.grad).sum(dim=1) + w1.bias * w1.bias.grad).abs()
                    imp += (w2.weight * w2.weight.grad).sum(dim=0).abs()
    finally:
        for p in tracked:
            p.grad = None  # do not leak importance gradients into a later training step
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
        model.train(was_training)

    sizes = {len(t) for t in neuron_importance}
    neurons: torch.Tensor | list[torch.Tensor] = (
        torch.stack(neuron_importance) if len(sizes) == 1 else neuron_importance
    )
    return head_importance, neurons


def _order(scores: torch.Tensor) -> torch.Tensor:
    """Indices sorting ``scores`` in descending order (stable, so ties keep their original order)."""
    return torch.sort(scores, descending=True, stable=True).indices


@torch.no_grad()
def rewire_(
    model: ElasticBertForSequenceClassification,
    head_importance: torch.Tensor,
    neuron_importance: torch.Tensor | list[torch.Tensor],
) -> ElasticBertForSequenceClassification:
    """Reorder heads and FFN neurons of every layer by descending importance, in place; returns ``model``.

    Heads: rows of Q/K/V weights and biases, columns of the attention-output dense (its bias is per output
    unit and stays). Neurons: rows of ``intermediate.dense`` weight and bias, columns of ``output.dense``.
    Parameters are overwritten with ``copy_`` so optimizer references stay valid.
    """
    d = model.config.attention_head_size
    for li, layer in enumerate(model.bert.encoder.layer):
        attn = layer.attention.self
        heads = attn.num_heads
        order = _order(head_importance[li][:heads].to(attn.query.weight.device))
        rows = (order[:, None] * d + torch.arange(d, device=order.device)).flatten()
        for lin in (attn.query, attn.key, attn.value):
            lin.weight.copy_(lin.weight.index_select(0, rows))
            lin.bias.copy_(lin.bias.index_select(0, rows))
        out = layer.attention.output.dense
        out.weight.copy_(out.weight.index_select(1, rows))

        w1, w2 = layer.intermediate.dense, layer.output.dense
        order = _order(neuron_importance[li].to(w1.weight.device))
        w1.weight.copy_(w1.weight.index_select(0, order))
        w1.bias.copy_(w1.bias.index_select(0, order))
        w2.weight.copy_(w2.weight.index_select(1, order))
    return model
