"""Token gates on DynaBERT sub-networks as a Prefect flow of its own (width x depth x length): the DynaBERT
stages up to depth_kd → gates on the chosen cells → their measurement → select.

``dynaflow run --flow gates_dynabert`` runs the same flow body through :func:`flows.pipeline.run_flow`;
this module is the entry point to deploy it on its own (``flows/gates_dynabert.py:gates_dynabert``). The
DynaBERT stages are the DynaBERT flow's, with the same keys: the flows share their outputs.
"""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.pipeline import pipeline
from stages import flow_stages


@flow(name="gates_dynabert", log_prints=True)
def gates_dynabert(
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
    until: str | None = None,
    track: bool = True,
) -> dict[str, dict[str, Any]]:
    """DynaBERT, the gated cells and their measurement, each reused while its inputs did not change."""
    return pipeline.fn(params_path, overrides, until, track, stage_names=flow_stages("gates_dynabert"))
