"""AdaBERT as a Prefect flow of its own: data → teacher → probes → search → retraining (searched and
random control) → measurement → select.

``dynaflow run --flow adabert`` runs the same flow body through :func:`flows.pipeline.run_flow`; this module
is the entry point to deploy it on its own (``flows/adabert.py:adabert``). The data and teacher stages are
the DynaBERT flow's, with the same keys: the flows share their outputs.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.pipeline import pipeline
from stages import flow_stages


@flow(name="adabert", log_prints=True)
def adabert(
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
    until: str | None = None,
    track: bool = True,
) -> dict[str, dict[str, Any]]:
    """Data, teacher, the AdaBERT search, its student and the random control, each reused while its inputs
    did not change."""
    return pipeline.fn(params_path, overrides, until, track, stage_names=flow_stages("adabert"))
