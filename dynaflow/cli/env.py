"""Project-local state for Prefect and MLflow, shared by every command that runs stages."""

from __future__ import annotations

import os
from pathlib import Path


def project_env(root: Path) -> None:
    """Project-local state for Prefect and MLflow unless the user points them elsewhere."""
    os.environ.setdefault("PREFECT_HOME", str(root / ".prefect-home"))
    os.environ.setdefault("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(root / ".prefect-home" / "results"))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    # The temporary server needs ~10-20 s to start on a 2-core machine; the default 20 s is too tight.
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
