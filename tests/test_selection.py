"""Checkpoint selection in the stages that compare epoch ends (teacher, Theseus): held-out rows by default,
never dev. DynaBERT's own selection (summed over sub-networks) is tested in test_distill."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dynaflow.config import Params
from dynaflow.core.tracking import NullTracker
from dynaflow.training.selection import BestWeights
from stages import teacher, theseus
from tests.conftest import make_tiny_backbone, poisoned_copy, tiny_params
from tests.test_teacher import prepare, run_teacher


def test_best_weights_keep_the_first_best_and_restore_it() -> None:
    model = torch.nn.Linear(2, 1)
    best = BestWeights(model)
    assert best.restore() is None  # nothing offered: the model keeps its weights
    kept = model.weight.detach().clone()
    assert best.offer(1, 0.5) and not best.offer(2, 0.5)  # a tie keeps the earlier weights
    with torch.no_grad():
        model.weight.add_(1.0)
    assert not best.offer(3, 0.4)
    assert best.restore() == 1 and torch.equal(model.weight, kept)
    again = BestWeights(model)
    again.load(best.snapshot())  # what a resumed run reads back from its checkpoint
    assert again.step == 1 and again.score == 0.5


def train(stage: str, params: Params, data_dir: Path, teacher_dir: Path | None, out: Path) -> dict:
    out.mkdir(parents=True)
    work, tracker = out.parent / f"{out.name}-work", NullTracker()
    if stage == "teacher":
        return teacher.fine_tune(
            params.teacher, params.backbone, params.seed, data_dir, out, work, "fp", tracker
        )
    assert teacher_dir is not None
    return theseus.compress(params.theseus, params.seed, teacher_dir, data_dir, out, work, "fp", tracker)


@pytest.mark.parametrize("stage", ["teacher", "theseus"])
def test_heldout_selection_never_sees_dev(stage: str, tmp_path: Path, tiny_glue: Path) -> None:
    """With dev poisoned (conftest.poisoned_copy), held-out selection keeps the same epoch and the same
    weights; dev selection follows the poison to another epoch."""
    backbone = make_tiny_backbone(tmp_path / "bert-4", layers=4)  # Theseus r = 2: a 2-layer successor
    # Large steps: the tiny models go from chance to perfect within the run, so epoch ends differ. Theseus
    # starts from a teacher of 3 epochs; at 3e-3 its successor scores best on held-out rows before the end.
    section = {"batch_size": 8, "eval_batch_size": 16, "learning_rate": 1e-2}
    params = Params.model_validate(tiny_params(backbone, tiny_glue) | {
        "teacher": section | {"epochs": 4 if stage == "teacher" else 3},
        "theseus": section | {"learning_rate": 3e-3, "epochs": 2, "finetune_epochs": 2},
    })  # fmt: skip
    assert getattr(params, stage).selection == "heldout"  # the default
    data_dir = prepare(tmp_path, params)
    poisoned = poisoned_copy(data_dir, tmp_path / "poisoned")
    teacher_dir = run_teacher(tmp_path, params, data_dir) if stage == "theseus" else None

    clean = train(stage, params, data_dir, teacher_dir, tmp_path / "clean")
    dirty = train(stage, params, poisoned, teacher_dir, tmp_path / "dirty")
    assert dirty["selected_step"] == clean["selected_step"]
    a, b = (
        load_file(tmp_path / "clean" / "model.safetensors"),
        load_file(tmp_path / "dirty" / "model.safetensors"),
    )
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert dirty["acc"] != clean["acc"]  # reported on dev, never chosen on it

    getattr(params, stage).selection = "dev"
    on_dev = [train(stage, params, d, teacher_dir, tmp_path / f"dev-{d.name}") for d in (data_dir, poisoned)]
    assert on_dev[0]["selected_step"] != on_dev[1]["selected_step"]
