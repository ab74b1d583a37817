"""MLflow tracking through explicit run ids.

MLflow's fluent API keeps the active run in a thread-local stack, so a run started in a Prefect flow is
invisible inside a task running in a worker thread. ``Tracker`` therefore wraps ``MlflowClient`` with an
explicit run id: one parent run per pipeline run, one child run per stage, safe from any thread.
The default store is ``sqlite:///<project>/mlflow.db``; ``MLFLOW_TRACKING_URI`` overrides it.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any

# Telemetry is on by default since MLflow 3.2 and has been reported to hang offline; must precede import.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

EXPERIMENT = "dynaflow"
# Marks the experiment as model training: without it the MLflow UI opens in its GenAI mode (traces, prompts).
KIND_TAG = "mlflow.experimentKind"
KIND = {KIND_TAG: "custom_model_development"}


def tracking_uri(root: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(root).resolve() / 'mlflow.db'}"


def sqlite_store_path(root: Path) -> Path | None:
    """The database file behind the project's tracking URI, or None when the store is not a SQLite file.

    SQLAlchemy's forms: ``sqlite:////abs/path.db``, ``sqlite:///relative.db`` (from the working directory),
    ``sqlite+driver:///...``; ``sqlite://`` and ``:memory:`` are in memory (None).
    """
    scheme, sep, rest = tracking_uri(root).partition("://")
    if not sep or scheme.split("+")[0].lower() != "sqlite" or not rest.startswith("/"):
        return None
    path = rest[1:].split("?")[0]
    if not path or path == ":memory:":
        return None
    return Path(os.path.abspath(path))


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


class NullTracker:
    """Same interface, records nothing (tests, and ranks other than 0 in data-parallel runs)."""

    run_id: str | None = None

    def log_params(self, params: dict[str, Any]) -> None: ...
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None: ...
    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None: ...
    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None: ...
    def set_tags(self, tags: dict[str, Any]) -> None: ...
    def child(self, name: str, tags: dict[str, Any] | None = None) -> NullTracker:
        return self

    def end(self, status: str = "FINISHED") -> None: ...


class Tracker(NullTracker):
    def __init__(self, client: Any, run_id: str, experiment_id: str):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id

    def log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(params)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
        for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(key, float(value), now, step or 0)
            for key, value in flatten(metrics).items()
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        ]
        for i in range(0, len(items), 1000):  # one request per 1000 metrics (MLflow's cap), not one each
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_artifacts(self, folder: Path, artifact_path: str | None = None) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def set_tags(self, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def child(self, name: str, tags: dict[str, Any] | None = None) -> Tracker:
        # mlflow.parentRunId is what the UI uses to nest runs.
        all_tags = {"mlflow.parentRunId": self.run_id, **(tags or {})}
        run = self.client.create_run(
            self.experiment_id, run_name=name, tags={k: str(v) for k, v in all_tags.items()}
        )
        return Tracker(self.client, run.info.run_id, self.experiment_id)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


def end_status(exc: BaseException) -> str:
    """How a run that stopped on ``exc`` ends in MLflow: KILLED when it was interrupted, else FAILED."""
    return "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED"


def start_run(root: Path, run_name: str, tags: dict[str, Any] | None = None) -> Tracker:
    """Open a top-level run in the project's experiment, creating store and experiment on first use."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(root))
    exp = client.get_experiment_by_name(EXPERIMENT)
    if exp is None:
        artifacts = (Path(root).resolve() / "mlartifacts").as_uri()
        experiment_id = client.create_experiment(EXPERIMENT, artifact_location=artifacts, tags=KIND)
    else:
        experiment_id = exp.experiment_id
        if exp.tags.get(KIND_TAG) != KIND[KIND_TAG]:  # made by an older dynaflow
            client.set_experiment_tag(experiment_id, KIND_TAG, KIND[KIND_TAG])
    run = client.create_run(
        experiment_id, run_name=run_name, tags={k: str(v) for k, v in (tags or {}).items()}
    )
    return Tracker(client, run.info.run_id, experiment_id)


def attach_run(root: Path, run_id: str) -> Tracker:
    """A tracker for an existing run (a stage launched by the flow as a subprocess records into its run)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri(root))
    return Tracker(client, run_id, client.get_run(run_id).info.experiment_id)
