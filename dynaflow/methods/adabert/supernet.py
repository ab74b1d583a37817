"""The search's supernet: every op on every edge of K_max cells, one-hot op and depth choices per step.

As in the official code, the architecture weights (``op_logits``: one row per edge; ``depth_logits``: one per
K) are shared by all cells, each cell has its own op weights, and every step samples a hard (straight-through)
Gumbel-softmax one-hot per edge and for K. ``single_path`` runs only the sampled op of each edge (GDAS-style:
the gradient reaches the architecture weights through the sampled op's weight of 1), which is what makes the
search fit two CPU cores; without it every op runs and is weighted (DARTS with hard Gumbel samples).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from dynaflow.methods.adabert.modeling_adabert import (
    EDGES,
    INPUT_NODES,
    NODES,
    OPS,
    AdaBertConfig,
    AdaBertForSequenceClassification,
    AdaBertStem,
    edge_index,
    heads,
    make_op,
    mean_pool,
    mix_nodes,
    op_shape,
)

ZERO = OPS.index("zero")


def op_costs(hidden: int) -> torch.Tensor:
    """Each op's multiply-adds per token, relative to the costliest (conv7): the efficiency loss's prices.

    The official PyTorch code mixes measured parameters and FLOPs, the TF code uses a near-flat table; FLOPs
    alone is what latency on a CPU follows. Pooling costs its window's adds; identity and zero cost nothing.
    """
    flops = []
    for name in OPS:
        kernel, _ = op_shape(name)
        flops.append(kernel * hidden * hidden if "conv" in name else kernel * hidden if "pool" in name else 0)
    costs = torch.tensor(flops, dtype=torch.float32)
    return costs / costs.max()


def efficiency_loss(op_probs: torch.Tensor, depth_probs: torch.Tensor, costs: torch.Tensor) -> torch.Tensor:
    """L_E = E[K] / K_max · mean over edges of Σ_o p(o) · cost(o) (the official form, on probabilities)."""
    k_max = depth_probs.shape[0]
    expected_depth = (depth_probs * torch.arange(1, k_max + 1, dtype=depth_probs.dtype)).sum() / k_max
    return expected_depth * (op_probs * costs).sum(-1).mean()


class MixedCell(nn.Module):
    """A cell with every op on each of its 9 edges (``edges[e][o]``)."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.edges = nn.ModuleList(nn.ModuleList(make_op(op, hidden) for op in OPS) for _ in range(EDGES))
        self.node_weights = nn.Parameter(torch.zeros(NODES))

    def forward(
        self,
        s0: torch.Tensor,
        s1: torch.Tensor,
        mask: torch.Tensor,
        op_weights: torch.Tensor,
        single_path: bool,
    ) -> torch.Tensor:
        states = [s0, s1]
        for node in range(NODES):
            total = torch.zeros_like(s0)
            for source in range(INPUT_NODES + node):
                e = edge_index(node, source)
                chosen = [int(op_weights[e].argmax())] if single_path else range(len(OPS))
                for o in chosen:
                    if o != ZERO:  # zero adds nothing, and no gradient either
                        total = total + op_weights[e, o] * self.edges[e][o](states[source], mask)
            states.append(total)
        return mix_nodes(self.node_weights, states[INPUT_NODES:])


class AdaBertSupernet(nn.Module):
    def __init__(self, config: AdaBertConfig, max_cells: int) -> None:
        super().__init__()
        self.config, self.max_cells = config, max_cells
        self.stem = AdaBertStem(config)
        self.cells = nn.ModuleList(MixedCell(config.hidden_size) for _ in range(max_cells))
        self.heads = heads(config, max_cells)
        self.op_logits = nn.Parameter(torch.zeros(EDGES, len(OPS)))  # α, shared by every cell
        self.depth_logits = nn.Parameter(torch.zeros(max_cells))

    def architecture_parameters(self) -> list[str]:
        return ["op_logits", "depth_logits"]

    def layer_logits(
        self,
        batch: dict[str, torch.Tensor],
        op_weights: torch.Tensor,
        depth_weights: torch.Tensor,
        single_path: bool = True,
        every_depth: bool = True,
    ) -> list[torch.Tensor]:
        """The logits of depths 1..K, K the depth ``depth_weights`` (one-hot) picks. The last is the official
        ``Σ_l y_l · logits_l``: forward it is depth K's; backward each depth's logits reach its weight, so
        with ``every_depth`` (all K_max cells run) the depth choice compares every depth, and without it
        (cells up to K only: cheaper) the sampled depth sees its own logits alone, which favours whichever
        depth is confident first. ``single_path``: each edge runs only its drawn op."""
        depth = int(depth_weights.argmax()) + 1
        run = self.max_cells if every_depth else depth
        s0, s1, x, mask = self.stem(
            batch["input_ids"], batch.get("attention_mask"), batch.get("token_type_ids")
        )
        pooled, out = [mean_pool(x, mask)], []
        for cell, head in zip(self.cells[:run], self.heads[:run], strict=True):
            s0, s1 = s1, cell(s0, s1, mask, op_weights, single_path)
            pooled.append(mean_pool(s1, mask))
            out.append(head(pooled))
        mixed = sum((w * logits for w, logits in zip(depth_weights[:run], out, strict=True)), out[0] * 0)
        return out[: depth - 1] + [mixed]


@torch.no_grad()
def derived_from(supernet: AdaBertSupernet, genotype: dict[str, Any]) -> AdaBertForSequenceClassification:
    """The derived network of ``genotype`` with the supernet's weights: its stem, the kept ops' weights of the
    first K cells, and the first K heads (with the ops forced to ``genotype`` the two compute the same)."""
    config = AdaBertConfig.from_dict(supernet.config.to_dict() | {"genotype": genotype})
    model = AdaBertForSequenceClassification(config).to(supernet.op_logits.device)
    model.stem.load_state_dict(supernet.stem.state_dict())
    for cell, mixed in zip(model.cells, supernet.cells, strict=False):
        cell.node_weights.copy_(mixed.node_weights)
        for op, (node, source, name) in zip(cell.ops, cell.links, strict=True):
            op.load_state_dict(mixed.edges[edge_index(node, source)][OPS.index(name)].state_dict())
    for head, source_head in zip(model.heads, supernet.heads, strict=False):
        head.load_state_dict(source_head.state_dict())
    return model.eval()
