"""params.yaml validation: every bad key, type or value stops with a message naming it."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dynaflow.config import ConfigError, load_params


def write(tmp_path: Path, params: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def error_for(tmp_path: Path, params: dict, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_params(write(tmp_path, params), overrides)
    return str(info.value)


def test_repository_params_are_valid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GLUE_DIR", raising=False)
    params = load_params(Path(__file__).parents[1] / "params.yaml")
    assert params.data.task == "sst2"
    assert params.widths == sorted(params.widths, reverse=True)


def test_unknown_key_names_key_and_allowed(tmp_path: Path) -> None:
    msg = error_for(tmp_path, {"teacher": {"epoch": 2}})
    assert "teacher.epoch" in msg and "unknown key" in msg
    assert "epochs" in msg  # the allowed keys are listed


def test_unknown_section(tmp_path: Path) -> None:
    msg = error_for(tmp_path, {"teachr": {}})
    assert "teachr" in msg and "allowed here" in msg and "teacher" in msg


def test_wrong_type_names_key_and_value(tmp_path: Path) -> None:
    msg = error_for(tmp_path, {"teacher": {"epochs": "two"}})
    assert "teacher.epochs = 'two'" in msg and "integer" in msg


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"widths": [1.0, 1.5]}, "outside (0, 1]"),
        ({"depths": [0.0]}, "outside (0, 1]"),
        ({"widths": []}, "widths"),
        ({"teacher": {"learning_rate": -1}}, "teacher.learning_rate = -1"),
        ({"data": {"task": "imdb"}}, "data.task = 'imdb'"),
        ({"data": {"glue_dir": "/no/such/dir"}}, "/no/such/dir"),
        ({"rewire": {"split": "test"}}, "rewire.split"),
    ],
)
def test_impossible_values(tmp_path: Path, params: dict, fragment: str) -> None:
    assert fragment in error_for(tmp_path, params)


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    msg = error_for(tmp_path, {"teacher": {"epochs": 0, "batch_size": "x"}, "bogus": 1})
    assert "3 invalid" in msg and "teacher.epochs" in msg and "teacher.batch_size" in msg and "bogus" in msg


def test_overrides_apply_and_validate(tmp_path: Path) -> None:
    path = write(tmp_path, {})
    params = load_params(path, ["teacher.epochs=3", "data.max_train_examples=100", "widths=[0.5, 1.0]"])
    assert params.teacher.epochs == 3 and params.data.max_train_examples == 100
    assert params.widths == [1.0, 0.5]
    with pytest.raises(ConfigError, match="teacher.epochs = 0"):
        load_params(path, ["teacher.epochs=0"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        load_params(path, ["teacher.epochs"])


def test_bad_glue_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLUE_DIR", str(tmp_path / "missing"))
    assert "GLUE_DIR" in error_for(tmp_path, {})


def test_missing_and_malformed_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("teacher: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)


def test_grid_must_fit_backbone(tmp_path: Path, tiny_backbone: Path) -> None:
    from dynaflow.models.backbone import check_grid

    params = load_params(write(tmp_path, {"backbone": str(tiny_backbone), "widths": [1.0, 0.1]}))
    with pytest.raises(ConfigError, match=r"widths: 0.1: .*0 of 4 attention heads"):
        check_grid(params)
    check_grid(load_params(write(tmp_path, {"backbone": str(tiny_backbone)})))  # the default grid fits
