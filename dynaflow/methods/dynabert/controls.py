"""Same-size controls: is one DynaBERT training as good as training each size alone?

DynaBERT's claim (Hou et al., 2020, Table 1 against separately compressed models) is that a sub-network cut
from the one trained model is about as good as the same architecture trained on its own. A *control* for
grid cell (w, d) tests it on our backbone: it starts from the same rewired teacher DynaBERT_W starts from,
and only that sub-network is distilled, with the depth stage's losses and hyper-parameters, from the
fine-tuned teacher at full width, on the same training data, its checkpoint chosen on the same held-out
rows. Its budget is either

* ``passes``: as many training steps through that sub-network as DynaBERT's two distillation stages gave
  it (counted by replaying their sub-network draws, :func:`passes_in_dynabert`), or
* ``wall``: as long as those two stages took, for all their sub-networks together.

The control's candidate is the cell extracted from the control model: the same architecture as DynaBERT's
extracted sub-network (:func:`control_candidate`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dynaflow.evaluation.candidates import Candidate
from dynaflow.methods.dynabert.candidates import point_name, subnetwork
from dynaflow.methods.dynabert.distill import SubnetGrid, SubnetSampler

METHOD = "control"  # the report's family: a DynaBERT grid cell trained alone


def draws_with(grid: SubnetGrid, rule: str, k: int, seed: int, steps: int, cell: tuple[float, float]) -> int:
    """How many of ``steps`` training steps drew ``cell`` (width, depth) under the sampler ``rule``."""
    sampler, pair = SubnetSampler(grid, rule, k, seed), (cell[1], cell[0])  # the sampler's (depth, width)
    if pair not in sampler.pairs:
        return 0
    return sum(pair in sampler.draw(step) for step in range(steps))


def stage_steps(width_kd: Any, depth_kd: Any, train_examples: int) -> dict[str, int]:
    """The training steps of DynaBERT's two stages (``width_kd``, ``depth_kd``)."""
    return {
        name: cfg.epochs * -(-train_examples // cfg.batch_size)
        for name, cfg in (("width_kd", width_kd), ("depth_kd", depth_kd))
    }


def passes_in_dynabert(
    cell: tuple[float, float],
    widths: list[float],
    depths: list[float],
    width_kd: Any,
    depth_kd: Any,
    steps: dict[str, int],
    seed: int,
) -> dict[str, int]:
    """Of each stage's first ``steps[stage]`` steps, those that trained ``cell``: the width stage trains full
    depth only, the depth stage every cell it draws (all, or the sandwich rule's); their draws replayed."""
    stages = {
        "width_kd": (SubnetGrid(tuple(widths), (1.0,)), width_kd),
        "depth_kd": (SubnetGrid(tuple(widths), tuple(depths)), depth_kd),
    }
    return {
        stage: draws_with(grid, cfg.subnets, cfg.random_subnets, seed, steps[stage], cell)
        for stage, (grid, cfg) in stages.items()
    }


def cell_name(cell: tuple[float, float]) -> str:
    return point_name(*cell)


def control_candidate(model: Any, cell: tuple[float, float], budget: str) -> Candidate:
    """The cell extracted from its control model: DynaBERT's candidate of that cell, as method ``control``."""
    width, depth = cell
    base = subnetwork(model, width, depth)
    return dataclasses.replace(
        base,
        method=METHOD,
        label=f"{width:g}/{depth:g} alone",
        title=f"Same-size control: width {width:g}, depth {depth:g}, distilled alone ({budget})",
        description=f"The DynaBERT grid cell (width {width:g}, depth {depth:g}) distilled on its own from "
        f"the rewired teacher, with DynaBERT's budget for it ({budget}). {base.description}",
    )
