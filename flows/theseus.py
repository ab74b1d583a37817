"""BERT-of-Theseus as a second Prefect flow: data → teacher → theseus → theseus_eval → select.

``dynaflow run --flow theseus`` runs the same flow body through :func:`flows.pipeline.run_flow`; this module
is the entry point to deploy it on its own (``flows/theseus.py:theseus``).

It runs the DynaBERT flow's body (:func:`flows.pipeline.pipeline`) with the Theseus stage list, so it has the
same cached stage task, cache rules and MLflow parent and child runs (the parent tagged ``flow=theseus``).
The data and teacher stages are the same stages with the same keys: the two flows share their outputs.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from dynaflow.config import load_params
from dynaflow.methods.theseus.model import check_backbone
from flows.pipeline import pipeline
from stages import flow_stages


@flow(name="theseus", log_prints=True)
def theseus(
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
    until: str | None = None,
    track: bool = True,
) -> dict[str, dict[str, Any]]:
    """Data, teacher and the Theseus successor, each reused while its inputs did not change."""
    check_backbone(load_params(params_path, overrides))  # before training a teacher for nothing
    return pipeline.fn(params_path, overrides, until, track, stage_names=flow_stages("theseus"))
