"""Genotypes: deriving the discrete cell from the architecture weights, and drawing random ones.

A genotype is ``{"depth": K, "cell": [[[source, op], [source, op]] for each of the 3 nodes]}``, the form
``AdaBertConfig.genotype`` stores (JSON-ready). Derivation follows DARTS and the official code: each node
keeps its two strongest incoming edges (an edge's strength: its best op other than ``zero``), each edge its
best op other than ``zero``, and K is the most likely depth. The one guard we add against the collapse users
reported (searches ending in parameter-free cells): at most ``parameter_free_cap`` of the kept edges may be
parameter-free ops; past it, the edges where a parametric op came closest switch to it.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from dynaflow.methods.adabert.modeling_adabert import INPUT_NODES, NODES, OPS, PARAMETER_FREE, edge_index

KEPT_EDGES = 2 * NODES  # two edges into each intermediate node


def _capped(ops: list[str], probs: list[np.ndarray], cap: float) -> list[str]:
    """Switch the parameter-free ops beyond ``cap`` (a fraction of the edges) to each edge's best
    parametric op, starting where that op's probability is closest to the chosen one's."""
    allowed = math.floor(cap * len(ops) + 1e-9)
    free = [i for i, op in enumerate(ops) if op in PARAMETER_FREE]
    parametric = [j for j, op in enumerate(OPS) if op not in PARAMETER_FREE and op != "zero"]

    def gap(i: int) -> float:
        return float(probs[i][OPS.index(ops[i])] - max(probs[i][j] for j in parametric))

    ops = list(ops)
    for i in sorted(free, key=gap)[: max(0, len(free) - allowed)]:
        ops[i] = OPS[max(parametric, key=lambda j: probs[i][j])]
    return ops


def derive(op_probs: np.ndarray, depth_probs: np.ndarray, parameter_free_cap: float = 1.0) -> dict[str, Any]:
    """The discrete genotype from ``op_probs`` ``[EDGES, len(OPS)]`` and ``depth_probs`` ``[K_max]``."""
    op_probs, zero = np.asarray(op_probs, dtype=float), OPS.index("zero")
    nonzero = [j for j in range(len(OPS)) if j != zero]
    chosen: list[tuple[int, int]] = []  # (node, source) of each kept edge
    for node in range(NODES):
        sources = range(INPUT_NODES + node)
        strength = {s: op_probs[edge_index(node, s)][nonzero].max() for s in sources}
        chosen += [(node, s) for s in sorted(sorted(sources, key=lambda s: -strength[s])[:2])]
    probs = [op_probs[edge_index(n, s)] for n, s in chosen]
    ops = [OPS[max(nonzero, key=lambda j: p[j])] for p in probs]
    ops = _capped(ops, probs, parameter_free_cap)
    cell = [[[s, op] for (n, s), op in zip(chosen, ops, strict=True) if n == node] for node in range(NODES)]
    return {"depth": int(np.argmax(depth_probs)) + 1, "cell": cell}


def random_genotype(
    rng: np.random.Generator, max_cells: int, parameter_free_cap: float = 1.0
) -> dict[str, Any]:
    """A genotype drawn uniformly from what derivation can produce: K in 1..K_max, two distinct sources per
    node, an op other than ``zero`` per edge, within the same parameter-free cap."""
    choices = [op for op in OPS if op != "zero"]
    while True:
        cell = [
            [
                [int(s), str(rng.choice(choices))]
                for s in sorted(rng.choice(INPUT_NODES + node, 2, replace=False))
            ]
            for node in range(NODES)
        ]
        free = sum(op in PARAMETER_FREE for edges in cell for _, op in edges)
        if free <= math.floor(parameter_free_cap * KEPT_EDGES + 1e-9):
            return {"depth": int(rng.integers(1, max_cells + 1)), "cell": cell}


def one_hot(genotype: dict[str, Any], max_cells: int) -> tuple[np.ndarray, np.ndarray]:
    """(op weights ``[EDGES, len(OPS)]``, depth weights ``[K_max]``) that force the supernet to run
    ``genotype``: its ops on its edges, ``zero`` on every other edge, its depth."""
    ops = np.zeros((edge_index(NODES, 0), len(OPS)), dtype=np.float32)
    ops[:, OPS.index("zero")] = 1.0
    for node, edges in enumerate(genotype["cell"]):
        for source, op in edges:
            ops[edge_index(node, source)] = 0.0
            ops[edge_index(node, source), OPS.index(op)] = 1.0
    depth = np.zeros(max_cells, dtype=np.float32)
    depth[genotype["depth"] - 1] = 1.0
    return ops, depth


def describe(genotype: dict[str, Any]) -> str:
    """One line: ``K=3: n0 <- conv5(s0) + conv3(s1); n1 <- ...``."""
    names = ["s0", "s1"] + [f"n{i}" for i in range(NODES)]
    nodes = [" + ".join(f"{op}({names[s]})" for s, op in edges) for edges in genotype["cell"]]
    return f"K={genotype['depth']}: " + "; ".join(f"n{i} <- {n}" for i, n in enumerate(nodes))


def validate(genotype: Any, max_cells: int | None = None) -> dict[str, Any]:
    """``genotype`` checked (a hand-written one in a config or file); ValueError naming what is wrong."""
    if not isinstance(genotype, dict) or set(genotype) != {"depth", "cell"}:
        raise ValueError(f"a genotype is {{'depth': K, 'cell': [...]}}, got {genotype!r}")
    depth, cell = genotype["depth"], genotype["cell"]
    if not isinstance(depth, int) or depth < 1 or (max_cells is not None and depth > max_cells):
        raise ValueError(f"genotype depth must be an integer in 1..{max_cells or 'K_max'}, got {depth!r}")
    if not isinstance(cell, list) or len(cell) != NODES:
        raise ValueError(f"genotype cell must list {NODES} nodes, got {cell!r}")
    for node, edges in enumerate(cell):
        for edge in edges:
            if len(edge) != 2 or edge[1] not in OPS or not 0 <= int(edge[0]) < INPUT_NODES + node:
                raise ValueError(
                    f"genotype node {node}: edge {edge!r} must be [source in 0..{INPUT_NODES + node - 1}, "
                    "op in "
                    f"{', '.join(OPS)}]"
                )
    return genotype
