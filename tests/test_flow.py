"""The Prefect flow's cache rules and MLflow records, on a tiny project (tiny BERT, tiny SST-2)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def prefect_server() -> Iterator[None]:
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=90):
        yield


@pytest.fixture
def tracking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


def run(project: Path, *overrides: str) -> dict[str, str]:
    from flows.pipeline import pipeline

    results = pipeline(params_path=str(project / "params.yaml"), overrides=list(overrides))
    return {name: r["status"] for name, r in results.items()}


def test_cache_rules(project: Path, tiny_glue: Path, tracking: str) -> None:
    from stages import flow_stages

    everything = flow_stages("dynaflow")  # the DynaBERT flow's stages (not theseus, the other flow's)
    after_teacher = [n for n in everything if n not in ("data", "teacher")]

    def ran(*names: str) -> dict[str, str]:
        return {n: "ran" if n in names else "cached" for n in everything}

    assert run(project) == ran(*everything)
    assert run(project) == ran()

    # A teacher param re-runs the teacher and what depends on it. Going back runs it again: the one output
    # directory now holds the other params' teacher, so Prefect's record for the old key is not trusted.
    assert run(project, "teacher.learning_rate=0.002") == ran("teacher", *after_teacher)
    assert run(project, "teacher.learning_rate=0.002") == ran()
    assert run(project) == ran("teacher", *after_teacher)

    # A deleted or altered artifact is not trusted. Rebuilt with the same inputs it has the same content
    # (training is deterministic on CPU), so the stages after it stay cached.
    (project / "artifacts" / "teacher" / "model.safetensors").unlink()
    assert run(project) == ran("teacher")
    with open(project / "data" / "prepared" / "train.parquet", "ab") as fh:
        fh.write(b"garbage")
    assert run(project) == ran("data")

    # A changed input file (content, same path) re-runs the data stage and everything downstream.
    train = tiny_glue / "SST-2" / "train.tsv"
    train.write_text(train.read_text() + "a great film \t1\n")
    assert run(project) == ran(*everything)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    runs = client.search_runs([client.get_experiment_by_name("dynaflow").experiment_id], max_results=200)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 8 and len(children) == 8 * len(everything)
    ran_teachers = [
        r for r in children if r.data.tags["stage"] == "teacher" and r.data.tags["cached"] == "false"
    ]
    assert len(ran_teachers) == 5
    latest = max(ran_teachers, key=lambda r: r.info.start_time)
    assert latest.data.params["teacher.learning_rate"] == "0.001"
    assert "final.dev.acc" in latest.data.metrics
    assert len(client.get_metric_history(latest.info.run_id, "loss")) >= 1  # the loss curve
    assert all(r.data.tags["cached"] in {"true", "false"} for r in children)
