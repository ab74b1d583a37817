"""What a gated model's trained gates cost on real inputs: tokens per layer and encoder FLOPs per example.

Token dropping saves compute in proportion to the inputs' lengths, so its cost is counted on the dev
inputs one at a time (no padding), beside the source model's on the same inputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from dynaflow.methods.gates.modeling_gated_bert import gated_flops, kept_lengths


def all_kept(layers: int, positions: int) -> torch.Tensor:
    """The keep mask of the source model: every rank of every layer."""
    return torch.ones(layers, positions, dtype=torch.bool)


def token_budget(config: Any, keep: torch.Tensor, lengths: Sequence[int]) -> dict[str, Any]:
    """Mean tokens entering each layer (``kept_per_layer[0]``: the input), mean encoder GFLOPs per input of
    the gated model and of its source, and their ratio (how many times fewer FLOPs the gates leave)."""
    kept = np.array([kept_lengths(keep, n) for n in lengths], dtype=np.float64)
    source = all_kept(config.num_hidden_layers, keep.shape[1])
    gated = float(np.mean([gated_flops(config, row) for row in kept.astype(int).tolist()]))
    full = float(np.mean([gated_flops(config, kept_lengths(source, n)) for n in lengths]))
    return {
        "kept_per_layer": [round(float(v), 3) for v in kept.mean(axis=0)],
        "kept_fraction": float((kept[:, -1] / kept[:, 0]).mean()),  # tokens the last layer keeps, per input
        "gflops_per_example": gated / 1e9,
        "source_gflops_per_example": full / 1e9,
        "flops_reduction": full / gated if gated else float("inf"),
    }


def gate_summary(gates: torch.Tensor, positions: int) -> dict[str, Any]:
    """The gates of the ranks real inputs can reach: per layer their mean and how many are on; and how many
    of all are settled (below 0.1 or above 0.9: what the bi-modal term drives them to)."""
    g = gates[:, 1:positions].detach().clamp(0.0, 1.0)
    return {
        "gate_mean_per_layer": [round(float(v), 4) for v in g.mean(dim=1)],
        "gates_on_per_layer": [int(v) for v in (g >= 0.5).sum(dim=1)],
        "gates_settled": float(((g < 0.1) | (g > 0.9)).float().mean()),
    }
