"""Data and teacher stages on tiny inputs: outputs, resume after a crash, and real learning."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dynaflow.config import Params
from dynaflow.core.tracking import NullTracker
from dynaflow.data.splits import load_split, read_task_meta
from stages import data, teacher
from tests.conftest import tiny_params


def prepare(tmp_path: Path, params: Params) -> Path:
    out = tmp_path / "data"
    out.mkdir(parents=True)
    data.prepare(params.data, params.backbone, params.seed, out, NullTracker())
    return out


def test_data_stage_writes_splits_and_metadata(tmp_path: Path, tiny_backbone: Path, tiny_glue: Path) -> None:
    params = Params.model_validate(
        tiny_params(tiny_backbone, tiny_glue)
        | {
            "data": {
                "task": "sst2",
                "glue_dir": str(tiny_glue),
                "max_seq_length": 6,
                "max_train_examples": 20,
                "heldout_examples": 8,
            }
        }
    )
    out = prepare(tmp_path, params)
    meta = read_task_meta(out)
    assert meta["num_labels"] == 2 and not meta["is_regression"]
    assert meta["counts"] == {"train": 20, "heldout": 8, "dev": 16}
    train = load_split(out, "train")
    assert len(train) == 20 and max(len(x) for x in train.input_ids) == 6  # truncated to max_seq_length
    assert set(np.unique(train.labels)) <= {0, 1}
    again = prepare(tmp_path / "again", params)  # seeded subset: same examples every time
    assert np.array_equal(load_split(again, "train").labels, train.labels)


def run_teacher(tmp_path: Path, params: Params, data_dir: Path, on_step=None) -> Path:
    out, work = tmp_path / "teacher", tmp_path / "work"
    out.mkdir(parents=True, exist_ok=True)
    teacher.fine_tune(
        params.teacher, params.backbone, params.seed, data_dir, out, work, "fp", NullTracker(), on_step
    )
    return out


def test_resume_after_crash_matches_uninterrupted(
    tmp_path: Path, tiny_backbone: Path, tiny_glue: Path
) -> None:
    params = Params.model_validate(tiny_params(tiny_backbone, tiny_glue, epochs=2, checkpoint_steps=4))
    data_dir = prepare(tmp_path, params)
    reference = load_file(run_teacher(tmp_path / "a", params, data_dir) / "model.safetensors")

    def crash(step: int) -> None:
        if step == 9:  # mid second epoch, one step after the step-8 checkpoint
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_teacher(tmp_path / "b", params, data_dir, crash)
    assert (tmp_path / "b" / "work" / "checkpoint.pt").is_file()
    resumed = load_file(run_teacher(tmp_path / "b", params, data_dir) / "model.safetensors")
    assert reference.keys() == resumed.keys()
    for name in reference:
        torch.testing.assert_close(resumed[name], reference[name], rtol=0, atol=1e-6, msg=name)


def test_checkpoint_of_other_params_is_ignored(tmp_path: Path, tiny_backbone: Path, tiny_glue: Path) -> None:
    params = Params.model_validate(tiny_params(tiny_backbone, tiny_glue, epochs=1))
    data_dir = prepare(tmp_path, params)
    work = tmp_path / "work"
    work.mkdir()
    torch.save({"fingerprint": "something-else"}, work / "checkpoint.pt")
    out = run_teacher(tmp_path, params, data_dir)  # would crash if it tried to load that checkpoint
    assert (out / "model.safetensors").is_file()


@pytest.mark.slow
def test_teacher_beats_majority_on_real_sst2(tmp_path: Path, glue_dir: Path) -> None:
    params = Params.model_validate(
        {
            "seed": 0,
            "backbone": "default",
            "data": {
                "task": "sst2",
                "glue_dir": str(glue_dir),
                "max_seq_length": 48,
                "max_train_examples": 384,
                "max_dev_examples": 200,
            },
            "teacher": {"epochs": 2, "batch_size": 16, "learning_rate": 1e-4, "warmup_ratio": 0.1},
        }
    )
    data_dir = prepare(tmp_path, params)
    out = run_teacher(tmp_path, params, data_dir)
    import json

    accuracy = json.loads((out / "metrics.json").read_text())["acc"]
    dev_labels = load_split(data_dir, "dev").labels
    majority = max(np.mean(dev_labels), 1 - np.mean(dev_labels))
    assert accuracy > majority + 0.1, (accuracy, majority)


def test_a_teacher_at_chance_warns_and_stops_the_stages_that_read_it(
    project: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    from dynaflow.cli.commands import main
    from dynaflow.config import load_params
    from stages import Layout, run_stage
    from stages.registry import UpstreamRefused

    at_chance = ["teacher.learning_rate=1e-12", "teacher_gate.on_fail=stop"]  # the head never moves
    params, layout = load_params(project / "params.yaml", at_chance), Layout(project)
    run_stage("data", params, layout)
    with caplog.at_level("WARNING"):
        run_stage("teacher", params, layout)
    gain = json.loads(layout.metrics("teacher").read_text())["gain_over_chance"]
    assert gain < params.teacher_gate.min_gain_over_chance
    assert "WEAK TEACHER" in caplog.text

    with pytest.raises(UpstreamRefused, match="teacher_gate.on_fail=warn"):
        run_stage("rewire", params, layout)
    assert not layout.out("rewire").exists()
    # The command DVC runs: one message naming the remedy, exit code 2, no traceback.
    capsys.readouterr()
    argv = ["stage", "augment", "--params", str(project / "params.yaml"), "--no-track"]
    argv += [f"--set={o}" for o in at_chance]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "stage 'augment' will not start: WEAK TEACHER" in err and "Traceback" not in err

    warn = load_params(project / "params.yaml", [at_chance[0], "teacher_gate.on_fail=warn"])
    run_stage("rewire", warn, layout)  # the user said go on
    assert (layout.out("rewire") / "manifest.json").is_file()


def test_run_prints_its_plan_first(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dynaflow.cli.commands import print_plan
    from dynaflow.config import load_params
    from stages import Layout, flow_stages, run_stage

    params = load_params(project / "params.yaml")
    run_stage("data", params, Layout(project))
    print_plan(params, project, flow_stages("dynaflow"))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "plan:" and len(lines) == 1 + len(flow_stages("dynaflow"))
    assert lines[1].split() == ["data", "cached"]
    assert lines[2].split()[:2] == ["teacher", "runs"] and "manifest.json is missing" in lines[2]
    assert lines[3].split()[:3] == ["rewire", "runs", "(after"]
