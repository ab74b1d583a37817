"""A `dynaflow run` with nothing to do starts no Prefect server and no flow run, and says so."""

from __future__ import annotations

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
