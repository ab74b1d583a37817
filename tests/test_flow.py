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
    experiment = client.get_experiment_by_name("dynaflow")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # not the GenAI view
    runs = client.search_runs([experiment.experiment_id], max_results=200)
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
    assert {r.info.run_name.split()[:2] == ["dynaflow", "sst2"] for r in parents} == {True}
    assert len({r.info.run_name for r in parents}) == 2  # two sets of params ran: default, lr 0.002
    # the pipeline run charts each stage's headline; the stage's own run has all its metrics
    assert {"teacher/score", "select_cpu1/candidates"} <= set(
        max(parents, key=lambda r: r.info.start_time).data.metrics
    )
    assert "loss_curve.json" in {a.path for a in client.list_artifacts(latest.info.run_id)}
    prefect_records(everything, project)


def prefect_records(everything: list[str], project: Path) -> None:
    """The last flow run's graph has each stage's real inputs only; its task runs are named after their
    stage and cache key; its artifacts hold metrics and grids."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from dynaflow.core.artifacts import read_manifest
    from stages.registry import Layout, inputs_of_declared

    async def read() -> tuple[list, list]:
        async with get_client() as client:
            flow_run = (await client.read_flow_runs(limit=1, sort="START_TIME_DESC"))[0]
            only = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
            return await client.read_task_runs(flow_run_filter=only), await client.read_artifacts(
                flow_run_filter=only
            )

    task_runs, artifacts = asyncio.run(read())
    by_id = {t.id: t.name.split()[0] for t in task_runs}
    for t in task_runs:
        stage, short = t.name.split()
        assert short == read_manifest(Layout(project).out(stage))["cache_key"][:12], t.name
        assert f"cache_key:{short}" in t.tags
        upstream = {by_id[i.id] for inputs in t.task_inputs.values() for i in inputs if i.id in by_id}
        assert upstream == {u for u in inputs_of_declared(stage) if u in everything}, stage
    keys = {a.key for a in artifacts}
    assert {"data-metrics", "teacher-metrics", "width-kd-grid", "depth-kd-grid"} <= keys, keys
