"""A `dynaflow run` with nothing to do starts no Prefect server and no flow run, and says so."""

from __future__ import annotations

import json
from pathlib import Path

import pytest


def test_a_run_with_nothing_to_do_starts_no_flow(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from dynaflow.cli import main
    from dynaflow.config import load_params
    from stages import run_stage
    from stages.registry import Layout

    params = load_params(project / "params.yaml")
    run_stage("data", params, Layout(project))
    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    import flows.pipeline

    def no_flow(*args: object, **kwargs: object) -> None:
        raise AssertionError("a flow was started with nothing to run")

    monkeypatch.setattr(flows.pipeline, "run_flow", no_flow)
    code = main(["run", "--params", str(project / "params.yaml"), "--until", "data", "--no-track"])
    out = capsys.readouterr().out
    assert code == 0 and "everything is up to date" in out and "data         cached" in out
    # every stage DVC declares has a headline (`dvc metrics show` warns about a missing one): empty for
    # the stages that did not run
    layout = Layout(project)
    assert json.loads(layout.headline("data").read_text())["examples"] > 0
    assert json.loads(layout.headline("theseus").read_text()) == {}


HEAVY = ("torch", "transformers", "matplotlib", "scipy", "onnxruntime", "prefect", "mlflow")


def imported_heavy(code: str, cwd: Path, **env: str) -> tuple[list[str], str]:
    """Run ``code`` in a fresh interpreter; (the heavy libraries it imported, what it printed)."""
    import os
    import subprocess
    import sys

    probe = f"import sys, json\n{code}\nprint(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))"
    done = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=cwd,
        env=os.environ | env,
        capture_output=True,
        text=True,
        check=True,
    )
    *printed, last = done.stdout.strip().splitlines()
    return json.loads(last), "\n".join(printed)


def test_status_imports_no_heavy_library(project: Path) -> None:
    """`dynaflow status` reads declarations, keys and digests: the training and measuring machinery of every
    stage module is imported only when the stage runs (a stage module that imports torch at the top costs
    every status call 1.5 s)."""
    from dynaflow.config import load_params
    from stages import run_stage
    from stages.registry import Layout

    run_stage("data", load_params(project / "params.yaml"), Layout(project))
    code = f"from dynaflow.cli import main\nmain(['status', '--params', {str(project / 'params.yaml')!r}])"
    heavy, printed = imported_heavy(code, project, HF_HUB_OFFLINE="1")
    assert "data         up to date" in printed and "teacher      needs to run" in printed
    assert heavy == []


def test_machine_identity_asks_torch_for_gpus_once_per_boot(tmp_path: Path) -> None:
    import torch

    code = "from dynaflow.evaluation import machine\nprint(json.dumps(machine.machine_identity()))"
    first_heavy, first = imported_heavy(code, tmp_path, XDG_CACHE_HOME=str(tmp_path))
    again_heavy, again = imported_heavy(code, tmp_path, XDG_CACHE_HOME=str(tmp_path))
    other_heavy, other = imported_heavy(code, tmp_path, XDG_CACHE_HOME=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    assert "torch" in first_heavy and again_heavy == [] and "torch" in other_heavy
    assert first == again
    # the same strings torch itself reports (the measurement stages' cache keys hash them)
    assert json.loads(first)["torch"] == torch.__version__
