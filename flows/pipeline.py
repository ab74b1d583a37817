"""The dynaflow pipeline as one Prefect flow: each stage is a cached task over the same stage code DVC runs.

Caching. Prefect's ``INPUTS`` policy would hash a path argument as text and ``TASK_SOURCE`` only the task's
own body, so neither notices an edited input file or training module. Each task is instead keyed by
:func:`stages.stage_key` (its params sections, the content hashes of its inputs and of its code). A cached
result is trusted only while the stage's output still matches its manifest and key; otherwise the task
runs again with ``refresh_cache`` and overwrites the stale cache entry.

Tracking. One MLflow parent run per flow run and a child run per stage; a stage served from cache gets a
child run tagged ``cached=true`` that points at the output it reused.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.context import TaskRunContext

from dynaflow.artifacts import check_output
from dynaflow.config import Params, load_params
from dynaflow.tracking import NullTracker, Tracker, start_run
from stages import STAGES, Layout, run_stage, stage_key, summary


def _cache_key(ctx: TaskRunContext, parameters: dict[str, Any]) -> str:
    return f"{parameters['name']}-{parameters['key']}"


@task(cache_key_fn=_cache_key, persist_result=True, result_serializer="json")
def stage_task(name: str, key: str, params: dict[str, Any], root: str, parent: Any = None) -> dict[str, Any]:
    layout = Layout(Path(root))
    if usable(name, layout, key):  # made by `dvc repro` or `dynaflow stage`: same key, files intact
        if parent:
            _record_cached(parent, name, layout, key)
        return summary(name, layout, key) | {"status": "cached"}
    tracker = parent.child(name, {"stage": name, "cached": "false"}) if parent else NullTracker()
    try:
        result = run_stage(name, Params.model_validate(params), layout, tracker)
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    return result | {"status": "ran"}


def _record_cached(parent: Tracker | NullTracker, name: str, layout: Layout, key: str) -> None:
    """A child run that says the stage was served from cache and points at the output it reused."""
    child = parent.child(
        name, {"stage": name, "cached": "true", "cache_key": key, "output": layout.out(name)}
    )
    child.log_metrics(summary(name, layout, key)["metrics"])
    child.end()


def usable(name: str, layout: Layout, key: str) -> bool:
    """A stage's output can be reused: complete, unaltered, made with this key, metrics present."""
    return check_output(layout.out(name), key) is None and layout.metrics(name).is_file()


@flow(name="dynaflow", log_prints=True)
def pipeline(
    params_path: str = "params.yaml",
    overrides: list[str] | None = None,
    until: str | None = None,
    track: bool = True,
) -> dict[str, dict[str, Any]]:
    """Run every stage in order (or up to ``until``), reusing each one whose inputs did not change."""
    logger = get_run_logger()
    params = load_params(params_path, overrides)
    layout = Layout(Path(params_path).resolve().parent)
    names = list(STAGES)
    if until is not None:
        names = names[: names.index(until) + 1]
    parent: Tracker | NullTracker = (
        start_run(layout.root, "pipeline", {"driver": "prefect", "task": params.data.task})
        if track
        else NullTracker()
    )
    if track:
        parent.log_params(params.model_dump(mode="json"))
    results: dict[str, dict[str, Any]] = {}
    try:
        for name in names:
            key = stage_key(name, params, layout)
            fresh = not usable(name, layout, key)
            state = stage_task.with_options(name=name, refresh_cache=fresh)(
                name, key, params.model_dump(mode="json"), str(layout.root), parent, return_state=True
            )
            result = state.result()
            if state.name == "Cached":
                logger.info("%s: cached (output %s)", name, result["out"])
                _record_cached(parent, name, layout, key)
                result = result | {"status": "cached"}
            results[name] = result
    except BaseException:
        parent.end("FAILED")
        raise
    parent.log_metrics({f"{n}.{k}": v for n, r in results.items() for k, v in r["metrics"].items()})
    parent.end()
    return results
