"""The gates' regularisers: a mass term (the user's cost knob λ), a bi-modal term pushing each gate to 0 or
1, and PoWER-BERT's retention configuration read from soft gates.

The paper's symbols are not readable (``research/other_seeds.md`` section D); what is filled in here is a
param of the ``gates`` section: the layer costs ``c_j`` and how the mass is counted.
"""

from __future__ import annotations

from typing import Literal

import torch

LayerCost = Literal["linear", "uniform"]
Mass = Literal["length", "positions"]


def layer_costs(layers: int, kind: LayerCost) -> torch.Tensor:
    """``c_j``: linear (PoWER-BERT's ``LAMBDA * j``, here ``j / L`` for j = 1..L) or uniform (1 each)."""
    if kind == "linear":
        return torch.arange(1, layers + 1, dtype=torch.float32) / layers
    if kind == "uniform":
        return torch.ones(layers)
    raise ValueError(f"layer_cost must be 'linear' or 'uniform', got {kind!r}")


def mass_term(
    gates: torch.Tensor, lengths: torch.Tensor, costs: torch.Tensor, mode: Mass, positions: int
) -> torch.Tensor:
    """``Σ_j c_j · m_j``: m_j, layer j's share of gates that are on, [CLS]'s excluded (it is always kept).

    ``length``: each example counts the ranks its real tokens occupy (``lengths``, [CLS] included), so a gate
    is pushed in proportion to how often a real token sits at its rank, and positions beyond every input
    cost nothing. ``positions``: PoWER-BERT's plain sum over the first ``positions`` ranks, as a mean.
    """
    g = gates[:, 1:positions].clamp(0.0, 1.0)
    if mode == "positions":
        share = g.mean(dim=1)
    elif mode == "length":
        ranks = torch.arange(1, positions, device=g.device)
        real = (ranks[None, :] < lengths[:, None]).to(g.dtype)  # [B, positions - 1]: rank k is a real token
        share = ((real @ g.T) / real.sum(1, keepdim=True).clamp_min(1.0)).mean(0)  # [layers]
    else:
        raise ValueError(f"mass must be 'length' or 'positions', got {mode!r}")
    return (costs.to(share) * share).sum()


def bimodal_term(gates: torch.Tensor, positions: int) -> torch.Tensor:
    """``Σ_j mean_k g(1 − g)``: zero at 0 and 1, largest at 0.5; its gradient (1 − 2g) pushes a gate below
    one half down and one above it up (Srinivas et al., 2017)."""
    g = gates[:, 1:positions].clamp(0.0, 1.0)
    return (g * (1.0 - g)).mean(dim=1).sum()


def bimodal_weight(mu: float, step: int, total: int, start: float) -> float:
    """μ_t: 0 until ``start`` (a fraction of the steps), then rising linearly to ``mu`` at the last step, so
    the gates first find their level under the mass term and are then driven to 0 or 1."""
    begin = start * total
    if step < begin or total <= begin:
        return 0.0 if step < begin else mu
    return mu * min(1.0, (step - begin + 1) / (total - begin))


def retention(gates: torch.Tensor, positions: int) -> list[int]:
    """PoWER-BERT's configuration from its soft-extract gates: layer j keeps its top ``ℓ_j`` ranks,
    ``ℓ_j`` the rounded sum of its gates over the first ``positions`` ranks, never more than the layer
    before."""
    kept, previous = [], positions
    for row in gates[:, :positions].detach().clamp(0.0, 1.0):
        previous = max(1, min(previous, round(float(row.sum()))))
        kept.append(previous)
    return kept


def prefix_gates(kept: list[int], width: int) -> torch.Tensor:
    """``[layers, width]`` gates that keep exactly the top ``kept[j]`` ranks of layer j, whatever the input's
    length (PoWER-BERT's hard extraction)."""
    gates = torch.ones(len(kept), width)
    for j, n in enumerate(kept):
        gates[j, n:] = 0.0
    return gates
