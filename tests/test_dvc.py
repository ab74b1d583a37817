"""dvc.yaml declares the same stages as the registry, and `dvc repro` re-runs exactly what changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages import STAGES, code_modules

ROOT = Path(__file__).resolve().parents[1]


def test_dvc_yaml_is_generated_from_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """dvc.yaml's deps are each stage's import closure and upstream: `dynaflow dvc-yaml --check` is clean."""
    from dynaflow.config import load_params
    from stages.dvcfile import differences, stage_entry

    monkeypatch.delenv("GLUE_DIR", raising=False)
    params = load_params(ROOT / "params.yaml")
    assert differences(ROOT / "dvc.yaml", params) == [], "run `dynaflow dvc-yaml`"
    declared = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    assert list(declared) == [*STAGES, "report"]  # the merged report is a DVC stage too
    for name, stage in STAGES.items():
        code = {f"{m.replace('.', '/')}.py" for m in code_modules(name)}
        code = {c if (ROOT / c).is_file() else c.removesuffix(".py") + "/__init__.py" for c in code}
        outs = {STAGES[u].out for u in (*stage.upstream, *stage.gathers())}
        assert set(declared[name]["deps"]) == code | outs, name
        assert declared[name]["cmd"] == f"dynaflow stage {name}"
        assert declared[name]["outs"] == [{stage.out: {"persist": True}}]  # dvc repro must not delete it
    # `dvc metrics show`: a headline per stage, and one per profile for the selection
    assert [next(iter(m)) for m in declared["select"]["metrics"]] == [
        "metrics/headline/select.json",
        *(f"metrics/headline/select_{p.name}.json" for p in params.evaluate.profiles),
    ]
    report = declared["report"]
    assert report["cmd"] == "dynaflow report" and report["outs"] == [
        {"reports/evaluation": {"persist": True}}
    ]
    # it reads the selection, through the selection's code
    select_code = {d for d in declared["select"]["deps"] if d.endswith(".py")}
    assert set(report["deps"]) == {STAGES["select"].out} | select_code

    # A stale file is named: a dep missing and one that is not in the closure.
    stale = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stale["stages"]["teacher"]["deps"].remove("dynaflow/training/loop.py")
    stale["stages"]["teacher"]["deps"].append("dynaflow/evaluation/report.py")
    path = ROOT / ".pytest_cache" / "dvc.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(stale))
    problems = differences(path, params)
    assert problems == [
        "stage teacher: deps missing dynaflow/training/loop.py",
        "stage teacher: deps not in its import closure dynaflow/evaluation/report.py",
    ]
    assert stage_entry("teacher", params)["params"] == ["teacher", "backbone", "seed"]


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
    for package in ("stages", "dynaflow"):  # the code dvc.yaml's deps name
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    dvc(project, "init", "--no-scm", "-q")

    first = dvc(project, "repro")
    assert "Running stage 'data'" in first and "Running stage 'teacher'" in first
    assert "Running stage 'report'" in first and (project / "reports/evaluation/report.md").is_file()
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

    # one row per stage (and per profile), a few shared columns: the table fits a terminal
    shown = dvc(project, "metrics", "show")
    rows = shown.strip().splitlines()
    assert "metrics/headline/teacher.json" in shown and "metrics/headline/select_cpu1.json" in shown
    assert len(rows) == 1 + len(STAGES) + len(params["evaluate"]["profiles"]), shown
    assert max(map(len, rows)) <= 160, shown


def git(project: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=project, check=True,
                   capture_output=True)  # fmt: skip


@pytest.mark.slow
def test_what_dynaflow_run_built_is_built_for_dvc(project: Path, tmp_path: Path) -> None:
    for file in ("dvc.yaml", ".gitignore"):
        shutil.copy(ROOT / file, project)
    for package in ("stages", "dynaflow"):  # the code dvc.yaml's deps name
        shutil.copytree(ROOT / package, project / package, ignore=shutil.ignore_patterns("__pycache__"))
    git(project, "init", "-q")
    dvc(project, "init", "-q")
    dvc(project, "config", "cache.type", "reflink,hardlink,copy")  # as the repository's .dvc/config
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    done = subprocess.run(
        [sys.executable, "-m", "dynaflow.cli", "run", "--flow", "compare", "--no-track"],
        cwd=project, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "recorded" in done.stdout and "in dvc.lock" in done.stdout, done.stdout
    assert "up to date" in dvc(project, "status")
    assert "Data and pipelines are up to date" in dvc(project, "repro")

    dvc(project, "plots", "show", "-o", str(tmp_path / "plots"))
    html = (tmp_path / "plots" / "index.html").read_text()
    declared = yaml.safe_load((project / "dvc.yaml").read_text())["plots"]
    for plot in declared:  # every declared plot was drawn (a profile skipped here has no points)
        path, props = next(iter(plot.items()))
        records = json.loads((project / path).read_text())
        assert not records or props["title"] in html, path

    # A DVC experiment on what `dynaflow run` built, committed as DVC wants it (dvc.lock in git): a
    # selection param re-runs the measurements and the selection, not the training.
    git(project, "add", "-A")
    git(project, "commit", "-q", "-m", "built by dynaflow run")
    ran = dvc(project, "exp", "run", "--set-param", "evaluate.max_metric_drop=0.5")
    assert "Running stage 'select'" in ran and "Running stage 'teacher'" not in ran, ran
    assert "max_metric_drop: 0.5" in (project / "params.yaml").read_text()
