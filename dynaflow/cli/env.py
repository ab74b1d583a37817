"""Project-local state for Prefect and MLflow, and the housekeeping every command that runs stages does
first, while it holds the project lock."""

from __future__ import annotations

import os
import sys
from pathlib import Path


def project_env(root: Path) -> None:
    """Project-local state for Prefect and MLflow unless the user points them elsewhere."""
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect-home"))
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(root / ".prefect-home" / "results"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server needs ~10-20 s to start on a 2-core machine; the default 20 s is too tight.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    # The stages' own log lines (losses, dev scores, the selection) in the Prefect UI too, not only on
    # the console; outside a flow run (`dynaflow stage`) they have nowhere to go there, silently.
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "dynaflow,stages")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from dynaflow.core.artifacts import remember_digests_in

    remember_digests_in(root / ".dynaflow" / "digests.db")  # `status` and no-change runs re-read nothing


def prepare_project(
    root: Path, names: list[str], track: bool, prefect: bool = False, reset_prefect: bool = False
) -> None:
    """Before any stage of ``names`` runs (under the project lock, so no other run is writing):

    - put back or remove what a killed run left (temporary outputs, a half-replaced output);
    - fail now, not after training, if an output folder cannot be written;
    - check the MLflow store (and Prefect's database, for a flow run), point its artifact locations here if
      the project moved, and close the MLflow runs that a dead process left RUNNING.
    """
    from dynaflow.core import stores
    from stages import Layout
    from stages.registry import check_writable, recover_outputs

    layout = Layout(root)
    for line in recover_outputs(layout):
        print(line, file=sys.stderr)
    check_writable(names, layout)
    if track:
        stores.check_mlflow_store(root)
        moved_from = stores.relocate_mlflow_store(root)
        if moved_from:
            print(
                f"the project moved from {moved_from}: its MLflow artifact locations now point here",
                file=sys.stderr,
            )
        closed = stores.close_stale_runs(root)
        if closed:
            print(f"marked {closed} MLflow run(s) KILLED: left RUNNING by a run that died", file=sys.stderr)
        stores.remember_mlflow_store(root)
    if prefect and not os.environ.get("PREFECT_API_URL"):  # a server of the user's own is not ours to check
        home = Path(os.environ["PREFECT_HOME"])
        if reset_prefect and stores.prefect_db(home).exists():
            moved = stores.reset_prefect_store(home)
            print(f"moved the Prefect database aside to {moved}; a new one is made", file=sys.stderr)
        stores.check_prefect_store(home)
