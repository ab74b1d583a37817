"""dvc.yaml declares the same stages as the registry, and `dvc repro` re-runs exactly what changed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages import STAGES

ROOT = Path(__file__).resolve().parents[1]


def test_dvc_yaml_matches_stage_registry() -> None:
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(declared) == list(STAGES)
    for name, stage in STAGES.items():
        entry = declared[name]
        assert entry["cmd"] == f"dynaflow stage {name}"
        code = {str(f.resolve().relative_to(ROOT)) for f in stage.source_files()}
        upstream = {STAGES[u].out for u in stage.upstream}
        assert set(entry["deps"]) == code | upstream, name
        assert set(entry["params"]) == set(stage.sections), name
        assert entry["outs"] == [stage.out]
        extra = []
        if name == "evaluate":  # the stage also writes one metrics file per hardware profile
            from dynaflow.config import load_params

            profiles = load_params(ROOT / "params.yaml").evaluate.profiles
            extra = [f"metrics/eval_{p.name}.json" for p in profiles]
        assert [next(iter(m)) for m in entry["metrics"]] == [f"metrics/{name}.json", *extra]


def dvc(project: Path, *args: str) -> str:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(
        [sys.executable, "-m", "dvc", *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


@pytest.mark.slow
def test_dvc_repro_reruns_only_what_changed(
    project: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    shutil.copy(ROOT / "dvc.yaml", project)
    for package in ("stages", "dynaflow"):
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    dvc(project, "init", "--no-scm", "-q")

    first = dvc(project, "repro")
    assert "Running stage 'data'" in first and "Running stage 'teacher'" in first
    assert "Data and pipelines are up to date" in dvc(project, "repro")

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["teacher"]["learning_rate"] = 0.002
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    # Re-run only up to the changed stage (the full pipeline ran above): the second full run would
    # double the suite's slowest test. `dvc status` still has to see that the teacher's readers are stale.
    third = dvc(project, "repro", "teacher")
    assert "Stage 'data' didn't change" in third and "Running stage 'teacher'" in third
    stale = dvc(project, "status")
    assert "rewire:" in stale and "data:" not in stale and "teacher:" not in stale, stale

    shown = dvc(project, "metrics", "show")
    assert "metrics/teacher.json" in shown and "metrics/data.json" in shown
