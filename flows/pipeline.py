"""The dynaflow pipeline as one Prefect flow: each stage is a cached task over the same stage code DVC runs.

Caching. Prefect's ``INPUTS`` policy would hash a path argument as text and ``TASK_SOURCE`` only the task's
own body, so neither notices an edited input file or training module. Each task is instead keyed by
:func:`stages.stage_key` (its params sections, the content hashes of its inputs and of its code). A cached
result is trusted only while the stage's output still matches its manifest and key; otherwise the task
runs again with ``refresh_cache`` and overwrites the stale cache entry.

Tracking. One MLflow parent run per flow run and a child run per stage; a stage served from cache gets a
child run tagged ``cached=true`` that points at the output it reused.

Scale-out. With ``launch.nproc_per_node`` (or ``nnodes``) above 1, a training stage's task runs
``dynaflow stage NAME`` under torchrun as a subprocess (the command ``dvc repro`` and a user would run),
recording into the task's MLflow child run, and reads back its manifest; one process stays in-process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import signal
import subprocess
from pathlib import Path
from typing import Any

import yaml
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.context import TaskRunContext
from prefect.exceptions import TerminationSignal
from prefect.runtime import flow_run
from prefect.states import Cancelled, Failed, State
from prefect.utilities.annotations import quote

from dynaflow.config import Params, load_params
from dynaflow.core import distributed as ddp
from dynaflow.core.artifacts import check_output
from dynaflow.core.errors import DynaflowError, Interrupted
from dynaflow.core.tracking import NullTracker, Tracker, start_run
from flows.server import guard_temporary_server
from stages import STAGES, Layout, flow_stages, run_stage, stage_key, summary
from stages.registry import inputs_of_declared
from stages.select import rebuild_report


def _cache_key(ctx: TaskRunContext, parameters: dict[str, Any]) -> str:
    name, key = (getattr(v, "unquote", lambda v=v: v)() for v in (parameters["name"], parameters["key"]))
    return f"{name}-{key}"


@task(cache_key_fn=_cache_key, persist_result=True, result_serializer="json")
def stage_task(
    name: str,
    key: str,
    params: dict[str, Any],
    root: str,
    parent: Any = None,
    params_path: str | None = None,
) -> dict[str, Any]:
    layout = Layout(Path(root))
    if usable(name, layout, key):  # made by `dvc repro` or `dynaflow stage`: same key, files intact
        if parent:
            _record_cached(parent, name, layout, key)
        return summary(name, layout, key) | {"status": "cached"}
    tracker = parent.child(name, {"stage": name, "cached": "false"}) if parent else NullTracker()
    validated = Params.model_validate(params)
    try:
        if STAGES[name].distributed and ddp.processes(validated.launch) > 1 and not ddp.launched():
            path = Path(params_path) if params_path else layout.root / "params.yaml"
            result = run_launched(name, key, params, path, layout, tracker)
        else:
            result = run_stage(name, validated, layout, tracker)
    except DynaflowError as exc:  # expected (bad data, a refused upstream): its message, no traceback
        tracker.end("FAILED")
        _EXPECTED.update((str(exc), repr(str(exc))[1:-1]))  # Prefect logs it as text and as a repr
        return Failed(message=str(exc), data=exc)  # type: ignore[return-value]
    except (KeyboardInterrupt, TerminationSignal):
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end()
    return result | {"status": "ran"}


# Messages of expected errors raised in this process: Prefect's own "failed with state" log lines for
# them are dropped (the CLI prints the message once, last); a bug's traceback is never dropped.
_EXPECTED: set[str] = set()


class _QuietExpected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        return not any(message in text for message in _EXPECTED)


def _quiet_expected_failures() -> None:
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _QuietExpected) for f in logger.filters):
            logger.addFilter(_QuietExpected())


def dependency(state: State) -> State:
    """``state`` as a ``wait_for`` entry, without its result. Prefect finds a task's upstream runs by the
    identity of the objects it is given, its result's parts included, and any object that happened to get
    the id of another task's result drew an edge that is not there; the inputs are quoted for the same
    reason, so the graph shows what each stage reads and nothing else."""
    return state.model_copy(update={"data": object()})


def headline_metrics(layout: Layout, names: list[str], profiles: list[str]) -> dict[str, float]:
    """The pipeline run's metrics: each stage's headline (and each profile's selection), as
    ``<stage>/<key>``: MLflow groups charts by the part before the slash, and a few charts per stage are
    what a person compares across runs. Every metric of a stage is on that stage's nested run."""
    rows = names + ([f"select_{p}" for p in profiles] if "select" in names else [])
    found = {n: json.loads(layout.headline(n).read_text()) for n in rows if layout.headline(n).is_file()}
    return {f"{n}/{k}": v for n, h in found.items() for k, v in h.items() if isinstance(v, int | float)}


def params_digest(dumped: dict[str, Any]) -> str:
    """A short name for a set of params (MLflow run names tell runs with other params apart by it)."""
    return hashlib.sha256(json.dumps(dumped, sort_keys=True).encode()).hexdigest()


def publish(name: str, result: dict[str, Any]) -> None:
    """What a stage computed, as Prefect artifacts on the flow run: its metrics as a table, and for a
    distillation stage its grid (dev score per sub-network)."""
    numbers = {k: v for k, v in result["metrics"].items() if isinstance(v, int | float)}
    rows = [{"metric": k, "value": round(v, 6)} for k, v in numbers.items()]
    if rows:
        create_table_artifact(rows, key=f"{name.replace('_', '-')}-metrics",
                              description=f"{name}: {result['status']}, output {result['out']}")  # fmt: skip
    grid = Path(result["out"]) / "grid.json"
    if grid.is_file():
        scores = json.loads(grid.read_text())
        table = [{"sub-network": k, "dev score": round(v["score"], 4)} for k, v in scores.items()]
        create_table_artifact(table, key=f"{name.replace('_', '-')}-grid",
                              description=f"{name}: dev score of every sub-network")  # fmt: skip


def _yaml_value(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 30).removesuffix("...\n").strip()


def overrides_between(wanted: dict[str, Any], current: dict[str, Any], prefix: str = "") -> list[str]:
    """``--set`` overrides that turn the params ``current`` into ``wanted`` (both validated dumps)."""
    out: list[str] = []
    for key, value in wanted.items():
        now = current.get(key) if isinstance(current, dict) else None
        if isinstance(value, dict):
            out += overrides_between(value, now if isinstance(now, dict) else {}, f"{prefix}{key}.")
        elif now != value or type(now) is not type(value):
            out.append(f"{prefix}{key}={_yaml_value(value)}")
    return out


def launch_command(name: str, params: dict[str, Any], params_path: Path, run_id: str | None) -> list[str]:
    """``dynaflow stage NAME`` under torchrun, with exactly the flow's params (the file plus overrides)."""
    current = load_params(params_path).model_dump(mode="json")
    cli_args = ["stage", name, "--params", str(params_path.resolve())]
    cli_args += [f"--set={o}" for o in overrides_between(params, current)]
    cli_args += ["--run-id", run_id] if run_id else ["--no-track"]
    return ddp.launch_command(Params.model_validate(params).launch, cli_args)


def run_launched(
    name: str,
    key: str,
    params: dict[str, Any],
    params_path: Path,
    layout: Layout,
    tracker: Tracker | NullTracker,
) -> dict[str, Any]:
    """Run a training stage data-parallel in a torchrun subprocess; its rank 0 writes the output."""
    cmd = launch_command(name, params, params_path, tracker.run_id)
    print(f"{name}: launching {ddp.describe(cmd)}", flush=True)  # a task's prints go to the Prefect log
    done = subprocess.run(cmd, cwd=layout.root, env=ddp.launch_env(Params.model_validate(params).launch))
    if done.returncode == 2:  # an expected error: the launched stage has printed its message
        raise DynaflowError(f"stage {name!r} stopped under torchrun: see its message above")
    if done.returncode != 0:
        raise RuntimeError(f"stage {name!r} failed under torchrun (exit {done.returncode})")
    problem = check_output(layout.out(name), key)
    if problem is not None:  # the launched stage computed another key (other code or inputs than the flow's)
        raise RuntimeError(f"stage {name!r} ran under torchrun, but its output is not usable: {problem}")
    return summary(name, layout, key)


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
    stage_names: list[str] | None = None,
) -> dict[str, dict[str, Any]]:
    """Run every stage in order (or up to ``until``), reusing each one whose inputs did not change.

    ``stage_names``: the stages to run, in order; default the DynaBERT ones (``flow_stages("dynaflow")``).
    """
    logger = get_run_logger()
    params = load_params(params_path, overrides)
    layout = Layout(Path(params_path).resolve().parent)
    names = list(stage_names) if stage_names is not None else flow_stages("dynaflow")
    if until is not None:
        names = names[: names.index(until) + 1]
    dumped = params.model_dump(mode="json")
    tags = {"driver": "prefect", "task": params.data.task, "flow": flow_run.flow_name}
    run_name = f"{flow_run.flow_name} {params.data.task} {params_digest(dumped)[:7]}"
    parent: Tracker | NullTracker = start_run(layout.root, run_name, tags) if track else NullTracker()
    if track:
        parent.log_params(dumped)
    results: dict[str, dict[str, Any]] = {}
    states: dict[str, State] = {}
    try:
        for name in names:
            key = stage_key(name, params, layout)
            fresh = not usable(name, layout, key)
            inputs = (name, key, dumped, str(layout.root), parent, str(Path(params_path).resolve()))
            # Prefect 3 files a result under its cache key but leaves the task page's "Cache Key" empty:
            # the run's name and tags carry the stage key instead.
            short = key[:12]
            named = stage_task.with_options(
                name=name, refresh_cache=fresh, task_run_name=f"{name} {short}", tags=[f"cache_key:{short}"]
            )
            state = named(
                *map(quote, inputs), return_state=True,
                wait_for=[dependency(states[u]) for u in inputs_of_declared(name) if u in states],
            )  # fmt: skip
            states[name] = state
            if state.is_failed() and isinstance(exc := state.result(raise_on_failure=False), DynaflowError):
                parent.end("FAILED")
                return Failed(message=str(exc), data=exc)  # type: ignore[return-value]
            result = state.result()
            if state.name == "Cached":
                logger.info("%s: cached (output %s)", name, result["out"])
                _record_cached(parent, name, layout, key)
                result = result | {"status": "cached"}
            results[name] = result
            publish(name, result)
    except (KeyboardInterrupt, TerminationSignal) as exc:
        parent.end("KILLED")
        signum = getattr(exc, "signum", None) or getattr(exc, "signal", signal.SIGINT)
        why = f"interrupted by {signal.Signals(signum).name}: completed stages are kept"
        return Cancelled(message=why, data=Interrupted(signum))  # type: ignore[return-value]
    except BaseException:
        parent.end("FAILED")
        raise
    profiles = [p.name for p in params.evaluate.profiles]
    parent.log_metrics(headline_metrics(layout, list(results), profiles))
    if "select" in results:  # the selection with the profiles measured on other machines merged in
        report, note = rebuild_report(layout.root)
        logger.info("%s: %s", note, report)
        parent.log_artifacts(report.parent, "report")  # the report and its plots
        create_markdown_artifact(report.read_text(), key="evaluation-report", description=note)
    parent.end()
    return results


def run_flow(flow_name: str, **kwargs: Any) -> dict[str, dict[str, Any]]:
    """Run flow ``flow_name`` (see ``stages.flows()``): the pipeline over that flow's stages, under its name.

    ``dynaflow`` is :func:`pipeline` itself; every other flow (``theseus``, ``compare``, a new method's)
    is the same flow body under its own name in Prefect, so each shows up as its own flow.
    """
    _quiet_expected_failures()
    guard_temporary_server()
    if flow_name == "dynaflow":
        state = pipeline(**kwargs, return_state=True)
    else:
        named = pipeline.with_options(name=flow_name)
        state = named(**kwargs, stage_names=flow_stages(flow_name), return_state=True)
    return flow_result(state)


def flow_result(state: State) -> dict[str, dict[str, Any]]:
    """The flow's results; an expected error or an interrupt is raised as itself, for the CLI to report
    in one line (exit 2, or 128 + the signal), a bug as its exception (Prefect has logged its traceback)."""
    if state.is_cancelled():
        data = state.result(raise_on_failure=False)
        raise data if isinstance(data, Interrupted) else Interrupted()
    if state.is_failed():
        raise state.result(raise_on_failure=False)  # type: ignore[misc]
    return state.result()  # type: ignore[return-value]
