"""Per-hardware evaluation as a Prefect flow: one profile, run by a worker on the machine that has it.

``dynaflow run`` evaluates every profile present on the local machine and skips the others. To measure a
profile on other hardware (a GPU box, an edge CPU), ``prefect.yaml`` declares one deployment per profile,
each on the work pool of its hardware kind; a Prefect worker started on such a machine picks the run up
and executes this flow there, in that machine's checkout of the project (which needs the data stage's and
each method's trained outputs: shared storage, or ``dvc pull``). Every method's candidates are measured,
then selected and exported for that profile. The result lands in ``artifacts/evaluation-hw/<profile>/``
on that machine and, as MLflow artifacts, in the tracking server named by ``MLFLOW_TRACKING_URI``;
``dynaflow report`` merges it into the report.
"""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

from prefect import flow

from dynaflow.config import load_params
from dynaflow.core.tracking import NullTracker, Tracker, start_run


@flow(name="dynaflow-evaluate", log_prints=True)
def evaluate_profile(
    profile: str,
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
    track: bool = True,
) -> dict[str, Any]:
    """Evaluate one hardware profile (a name in ``evaluate.profiles``) on this machine."""
    from stages.select import measure_profile_here

    params = load_params(params_path, overrides)
    params.evaluate.profile(profile)  # an unknown name fails here, before any work
    root = Path(params_path).resolve().parent
    tags = {"driver": "prefect", "stage": "evaluate", "profile": profile, "host": platform.node()}
    tracker: Tracker | NullTracker = start_run(root, f"evaluate-{profile}", tags) if track else NullTracker()
    try:
        result = measure_profile_here(params, root, profile, tracker)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    print(f"profile {profile} evaluated on {platform.node()}: {result['out']}")  # a flow log (log_prints)
    return result
