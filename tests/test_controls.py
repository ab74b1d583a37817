"""Same-size controls: pass counting replays DynaBERT's draws; a control is the extracted cell, trained alone
for the counted steps, measured and reported beside DynaBERT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from dynaflow.config import ConfigError, Params, load_params
from dynaflow.methods.dynabert.controls import draws_with, passes_in_dynabert, stage_steps
from dynaflow.methods.dynabert.distill import SubnetGrid, SubnetSampler
from stages import Layout, run_stage
from tests.conftest import tiny_params, write_sst2
from tests.test_methods import CPU1


def test_pass_counts_replay_the_sandwich_draws() -> None:
    grid = SubnetGrid((1.0, 0.75, 0.5, 0.25), (1.0, 0.75, 0.5))
    steps, k = 50, 2
    counts = {(w, d): draws_with(grid, "sandwich", k, 7, steps, (w, d)) for d, w in grid}
    assert counts[(1.0, 1.0)] == counts[(0.25, 0.5)] == steps  # the largest and the smallest: every step
    assert sum(counts.values()) == steps * (2 + k)  # k of the others per step
    sampler = SubnetSampler(grid, "sandwich", k, 7)
    assert counts[(0.5, 0.75)] == sum((0.75, 0.5) in sampler.draw(s) for s in range(steps))
    assert draws_with(grid, "all", k, 7, steps, (0.5, 0.75)) == steps
    assert draws_with(grid, "all", k, 7, steps, (0.3, 0.75)) == 0  # not a cell of this grid


def test_width_stage_passes_count_for_full_depth_cells_only() -> None:
    params = Params(data={"glue_dir": None})
    steps = stage_steps(params.width_kd, params.depth_kd, 2000)
    assert steps == {"width_kd": 63, "depth_kd": 189}
    both = [passes_in_dynabert(c, params.widths, params.depths, params.width_kd, params.depth_kd, steps, 42)
            for c in ((0.5, 1.0), (0.5, 0.5))]  # fmt: skip
    assert both[0]["width_kd"] == 63 and both[1]["width_kd"] == 0  # 1 epoch of 2000 / 32, every width
    assert both[1]["depth_kd"] > 0 and both[0]["depth_kd"] > 0


def test_cells_outside_the_grid_are_refused_before_any_work(tmp_path: Path) -> None:
    from stages.controls import run_controls

    params = Params(data={"glue_dir": str(tmp_path)}, controls={"cells": [[0.3, 0.5]]})
    with pytest.raises(ConfigError, match=r"controls.cells: \(0.3, 0.5\) is not a cell of the trained grid"):
        run_controls(params, tmp_path)


def test_a_control_is_the_extracted_cell_trained_alone_for_its_passes(
    tmp_path: Path, tiny_backbone: Path
) -> None:
    from dynaflow.evaluation.report import load_results
    from dynaflow.methods.dynabert import candidates as dynabert
    from dynaflow.models.backbone import load_elastic
    from stages.controls import OUT, run_controls

    glue = write_sst2(tmp_path / "glue")
    kd = {"batch_size": 8, "learning_rate": 1e-3}
    raw = tiny_params(tiny_backbone, glue) | {
        "widths": [1.0, 0.5], "depths": [1.0, 0.5],
        "width_kd": kd, "depth_kd": kd | {"epochs": 2, "subnets": "sandwich", "random_subnets": 1},
        "evaluate": {"warmup": 1, "repeats": 3, "profiles": [CPU1], "int8": False, "quality_floor": False},
        "controls": {"cells": [[0.5, 0.5], [1.0, 1.0]]},
    }  # fmt: skip
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(Params.model_validate(raw).model_dump(mode="json")))
    params, layout = load_params(tmp_path / "params.yaml"), Layout(tmp_path)
    for stage in ("data", "teacher", "rewire", "augment", "width_kd", "depth_kd", "evaluate", "select"):
        run_stage(stage, params, layout)

    summary = run_controls(params, tmp_path)
    cells = summary["cells"]
    # 48 training rows in batches of 8: 6 steps per epoch. The width stage trains full depth only; the
    # sandwich of a 2 x 2 grid trains the largest and the smallest cell on every one of its 12 steps.
    assert cells["w0.5_d0.5"]["passes_in_dynabert"] == {"width_kd": 0, "depth_kd": 12}
    assert cells["w1.0_d1.0"]["passes_in_dynabert"] == {"width_kd": 6, "depth_kd": 12}
    assert [cells[c]["steps"] for c in ("w0.5_d0.5", "w1.0_d1.0")] == [12, 18]
    # what trained the weights DynaBERT kept: the smallest cell is drawn on every step up to the kept one
    kept = json.loads(layout.metrics("depth_kd").read_text())["selected_step"]
    assert cells["w0.5_d0.5"]["passes_in_kept_weights"] == {"width_kd": 0, "depth_kd": kept}
    assert (
        cells["w0.5_d0.5"]["dynabert_dev"]["score"]
        == json.loads((layout.out("depth_kd") / "grid.json").read_text())["w0.5_d0.5"]["score"]
    )

    trained = load_elastic(layout.out("depth_kd")).eval()
    for w, d in ((0.5, 0.5), (1.0, 1.0)):
        name = f"w{w}_d{d}"
        control = load_elastic(tmp_path / OUT / "passes" / name).eval()
        mine, theirs = dynabert.subnetwork(control, w, d), dynabert.subnetwork(trained, w, d)
        assert mine.arch == theirs.arch  # same layers, heads, FFN neurons
        a, b = mine.build().state_dict(), theirs.build().state_dict()
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
        assert any(not torch.equal(a[k], b[k]) for k in a)  # trained apart: other weights

    results = load_results([tmp_path / OUT / "passes"])[0]
    assert results["methods"] == ["control"]
    assert sorted(r["candidate"] for r in results["profiles"][0]["rows"]) == [
        "control/w0.5_d0.5",
        "control/w1.0_d1.0",
    ]
    report = (tmp_path / summary["report"]).read_text()
    assert "control/w0.5_d0.5" in report and "dynabert/w0.5_d0.5" in report  # side by side

    again = run_controls(params, tmp_path)  # cached: the same controls, not trained again
    assert again["cells"]["w0.5_d0.5"]["train_seconds"] == cells["w0.5_d0.5"]["train_seconds"]
    alone = params.model_copy(update={"controls": params.controls.model_copy(update={"cells": [(0.5, 0.5)]})})
    again = run_controls(alone, tmp_path)  # listed without the other cell: still the same control
    assert again["cells"]["w0.5_d0.5"]["train_seconds"] == cells["w0.5_d0.5"]["train_seconds"]
    # ... and the other cell, trained earlier under the same key, stays in the summary and the results
    assert again["cells"]["w1.0_d1.0"]["steps"] == 18
    rows = load_results([tmp_path / OUT / "passes"])[0]["profiles"][0]["rows"]
    assert sorted(r["candidate"] for r in rows) == ["control/w0.5_d0.5", "control/w1.0_d1.0"]


def test_the_wall_pilot_times_steps_not_what_a_run_pays_once() -> None:
    """Two pilot runs differenced: loading, the epoch-end evaluation and the checkpoint cancel out."""
    from stages.controls import PILOT_STEPS, pilot_seconds_per_step

    asked: list[int] = []

    def train(steps: int, where: Path) -> dict[str, float]:
        asked.append(steps)
        assert where.is_dir()  # a scratch directory of its own
        return {"train_seconds": 7.5 + 0.25 * steps}  # 7.5 s paid once, 0.25 s a step

    assert pilot_seconds_per_step(train) == pytest.approx(0.25)
    assert asked == [PILOT_STEPS, 2 * PILOT_STEPS]
