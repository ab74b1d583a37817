"""params.yaml validation: every bad key, type or value stops with a message naming it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from dynaflow.config import ConfigError, Params, load_params

ROOT = Path(__file__).parents[1]
PARAMS_FILE = ROOT / "params.yaml"
# Keys the code has and params.yaml leaves out (their code default is then the value): none today. A key
# added to the models must be added to params.yaml too, or named here.
CODE_ONLY: set[str] = set()


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


def differences(code: Any, file: Any, prefix: str = "") -> list[str]:
    """Every key whose value differs between two params dumps: 'key: code default X, params.yaml Y'."""
    if isinstance(code, dict) and isinstance(file, dict):
        out = []
        for key in [*code, *(k for k in file if k not in code)]:
            name = f"{prefix}{key}"
            if key not in file:
                out.append(f"{name}: code default {code[key]!r}, not in params.yaml")
            elif key not in code:
                out.append(f"{name}: not in the code, params.yaml {file[key]!r}")
            else:
                out.extend(differences(code[key], file[key], f"{name}."))
        return out
    if isinstance(code, list) and isinstance(file, list) and len(code) == len(file):
        return [
            d
            for i, (c, f) in enumerate(zip(code, file, strict=True))
            for d in differences(c, f, f"{prefix}{i}.")
        ]
    return [] if code == file else [f"{prefix.rstrip('.')}: code default {code!r}, params.yaml {file!r}"]


def missing_keys(dump: Any, raw: Any, prefix: str = "") -> set[str]:
    """Keys of a params dump that the raw params file does not write out."""
    if isinstance(dump, dict) and isinstance(raw, dict):
        return {f"{prefix}{k}" for k in dump if k not in raw} | {
            m for k in dump if k in raw for m in missing_keys(dump[k], raw[k], f"{prefix}{k}.")
        }
    if isinstance(dump, list) and isinstance(raw, list):
        return {
            m
            for i, (d, r) in enumerate(zip(dump, raw, strict=True))
            for m in missing_keys(d, r, f"{prefix}{i}.")
        }
    return set()


def test_code_defaults_are_params_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One source of defaults: every default of the typed config is the value params.yaml ships."""
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))  # a directory: glue_dir stays null in both
    code = Params().model_dump(mode="json")
    file = load_params(PARAMS_FILE).model_dump(mode="json")
    diff = differences(code, file)
    assert not diff, "code defaults differ from params.yaml:\n  " + "\n  ".join(diff)
    assert code["data"]["glue_dir"] is None
    assert missing_keys(code, yaml.safe_load(PARAMS_FILE.read_text())) == CODE_ONLY


def test_differences_name_each_key_with_both_values() -> None:
    code = Params(data={"glue_dir": None}).model_dump(mode="json")
    file = Params(teacher={"epochs": 7}, evaluate={"warmup": 1}).model_dump(mode="json")
    assert differences(code, file) == [
        "teacher.epochs: code default 3, params.yaml 7",
        "evaluate.warmup: code default 5, params.yaml 1",
    ]
    del file["seed"]
    assert "seed: code default 42, not in params.yaml" in differences(code, file)
    assert missing_keys(code, {"seed": 1, "data": {"task": "sst2"}}) >= {"backbone", "data.max_seq_length"}


def readme_defaults(text: str) -> tuple[list[tuple[str, str]], list[str]]:
    """(key, stated default) of every row of README's `| key | default | meaning |` tables, and the rows
    that defer to params.yaml. Row forms: `a.b` | 1; `a.b` / `c` | 1 / 2; `a.b`, `c` | 1, 2;
    `*_kd.x` | v (both phases) or v (width_kd), w (depth_kd)."""
    rows: list[tuple[str, str]] = []
    deferred: list[str] = []
    in_table = False
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|"):
            in_table = False
        elif cells[:2] == ["key", "default"]:
            in_table = True
        elif in_table and not set(cells[0]) <= {"-"}:
            keys, stated = re.findall(r"`([^`]+)`", cells[0]), cells[1].replace("`", "")
            if stated == "see params.yaml":
                deferred.append(cells[0])
                continue
            values = [stated] if len(keys) == 1 else re.split(r" / |, ", stated)
            assert len(values) == len(keys), f"README row {line!r}: {len(keys)} keys, {len(values)} values"
            section = keys[0].rpartition(".")[0]
            for i, (key, value) in enumerate(zip(keys, values, strict=True)):
                key = key if i == 0 or "." in key else f"{section}.{key}"
                if key.startswith("*_kd."):
                    per_phase = dict((p, v) for v, p in re.findall(r"(\S+) \((\w+)\)", value))
                    for phase in ("width_kd", "depth_kd"):
                        rows.append((key.replace("*_kd", phase), per_phase.get(phase, value)))
                else:
                    rows.append((key, value))
    return rows, deferred


def stated_value(text: str, actual: Any) -> Any:
    """The README's spelling of a default as the value params.yaml gives (1e-4 is a float there)."""
    if isinstance(actual, list) and not text.startswith("["):  # evaluate.profiles: their names
        return [name.strip() for name in text.split(",")]
    try:
        return float(text) if isinstance(actual, float) else yaml.safe_load(text)
    except ValueError:
        return text


def readme_drift(text: str, params: dict[str, Any]) -> tuple[list[str], int]:
    """README rows whose default is not params.yaml's, and how many rows were checked."""
    rows, _ = readme_defaults(text)
    drift = []
    for key, stated in rows:
        node: Any = params
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                drift.append(f"{key}: README says {stated}, but params.yaml has no such key")
                break
            node = node[part]
        else:
            if isinstance(node, list) and node and isinstance(node[0], dict):  # profiles: their names
                node = [p["name"] for p in node]
            if stated_value(stated, node) != node:
                drift.append(f"{key}: README says {stated}, params.yaml {node!r}")
    return drift, len(rows)


def test_readme_params_tables_match_params_yaml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GLUE_DIR", str(tmp_path))
    params = load_params(PARAMS_FILE).model_dump(mode="json")
    text = (ROOT / "README.md").read_text()
    drift, checked = readme_drift(text, params)
    assert not drift, "README.md tables differ from params.yaml:\n  " + "\n  ".join(drift)
    assert checked > 60  # the tables were found and read
    assert readme_defaults(text)[1] == ["`width_kd.*`", "`depth_kd.*`"]  # the only rows that defer


def test_readme_drift_is_caught() -> None:
    params = Params(data={"glue_dir": None}).model_dump(mode="json")
    text = """| key | default | meaning |
|---|---|---|
| `data.max_train_examples` | 3000 | subset |
| `teacher.learning_rate` | 1e-4 | lr |
| `evaluate.warmup` / `repeats` | 5 / 31 | calls |
| `theseus.batch_size`, `eval_batch_size` | 32, 128 | as for the teacher |
| `*_kd.subnets` | all (width_kd), all (depth_kd) | which |
| `*_kd.random_subnets` | 2 | k |
| `evaluate.profiles` | cpu1, gpu | profiles |
| `data.nope` | 1 | gone |
"""
    drift, checked = readme_drift(text, params)
    assert checked == 12
    assert drift == [
        "data.max_train_examples: README says 3000, params.yaml 2000",
        "evaluate.repeats: README says 31, params.yaml 30",
        "depth_kd.subnets: README says all, params.yaml 'sandwich'",
        "evaluate.profiles: README says cpu1, gpu, params.yaml ['cpu1', 'cpu_all', 'gpu']",
        "data.nope: README says 1, but params.yaml has no such key",
    ]


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


def test_top_level_error_is_the_message_not_every_setting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "missing"
    monkeypatch.setenv("GLUE_DIR", str(missing))
    with pytest.raises(ConfigError) as info:
        load_params(PARAMS_FILE)  # the full file: its raw settings are over 2,000 characters
    msg = str(info.value)
    assert "$GLUE_DIR" in msg and str(missing) in msg
    assert len(msg) < 300 + len(str(PARAMS_FILE)), msg
    assert "max_train_examples" not in msg and "{" not in msg


def test_section_level_error_leaves_out_the_section(tmp_path: Path) -> None:
    msg = error_for(tmp_path, {"launch": {"nnodes": 2}})
    assert "launch: nnodes = 2 needs rdzv_endpoint" in msg and "{" not in msg


def test_malformed_override_value(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_params(write(tmp_path, {}), ["teacher.epochs=[1,"])
    msg = str(info.value)
    assert msg.startswith("override 'teacher.epochs=[1,': value '[1,' is not valid YAML")
    assert len(msg.splitlines()) <= 2 and "line 1" not in msg  # no YAML mark dump
    assert info.value.__cause__ is None and info.value.__suppress_context__


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n  # and another\n"])
def test_empty_params_file_is_an_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match="holds no settings") as info:
        load_params(path)
    assert str(path) in str(info.value) and "defaults" in str(info.value)


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
