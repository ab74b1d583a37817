"""The stage registry and the one runner that both drivers (the Prefect flows, ``dvc repro``) call.

A stage declares what determines its output: the ``params.yaml`` entries it reads, the stages upstream of
it, the files outside the pipeline it reads (GLUE files, a local backbone) and the function that computes
it. Its code is not listed by hand: it is every project module that the stage's module imports, directly
or through others (:func:`code_modules`, from the import graph). :func:`stage_key` hashes all of it,
content not names, so a cache keyed on it re-runs a stage when, and only when, one of them changed.
``dvc.yaml`` is generated from the same registry (``dynaflow dvc-yaml``); a test keeps the file in step.

Every stage runs through one signature: ``run(ctx: StageContext) -> metrics``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dynaflow.config import ConfigError, Params
from dynaflow.core.artifacts import (
    atomic_write_json,
    check_output,
    file_digest,
    manifest_digest,
    staged_output,
    sweep_leftovers,
    unwritable,
    write_manifest,
)
from dynaflow.core.errors import DynaflowError
from dynaflow.core.tracking import NullTracker

CODE_VERSION = "2"  # bump to invalidate every cached stage after a change the source hashes cannot see
PROJECT_PACKAGES = ("dynaflow", "stages")  # what a stage's code may come from (flows and the CLI may not)
PROJECT_ROOT = Path(__file__).resolve().parents[1]  # where the packages' sources live (dvc.yaml's paths)


@dataclass(frozen=True)
class Layout:
    """Where each stage's output, metrics and resumable work live, relative to the project root."""

    root: Path

    def out(self, stage: str) -> Path:
        return self.root / STAGES[stage].out

    @property
    def metrics_dir(self) -> Path:
        """Every stage's metrics file (DVC metrics), beside the outputs."""
        return self.root / "metrics"

    def metrics(self, stage: str) -> Path:
        """The stage's metrics in full (what MLflow and Prefect show)."""
        return self.metrics_dir / f"{stage}.json"

    def headline(self, name: str) -> Path:
        """A few numbers of the stage (see Stage.headline): the DVC metrics, one row of `dvc metrics show`."""
        return self.metrics_dir / "headline" / f"{name}.json"

    def work(self, stage: str) -> Path:
        return self.root / ".dynaflow" / "work" / stage


@dataclass(frozen=True)
class StageContext:
    """What a running stage gets: its params, where things are, its output and work folders, its key."""

    name: str
    params: Params
    layout: Layout
    out: Path  # the temporary output directory (renamed into place when the stage succeeds)
    key: str
    tracker: NullTracker
    gathered: tuple[str, ...] = ()  # the gathered stages (see Stage.gathers) present and up to date

    @property
    def work(self) -> Path:
        """Resumable checkpoints, outside the output (DVC deletes outputs before it runs a stage)."""
        return self.layout.work(self.name)

    def upstream(self, stage: str) -> Path:
        return self.layout.out(stage)


Run = Callable[[StageContext], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    name: str
    out: str  # output directory, relative to the project root
    sections: tuple[str, ...]  # params.yaml entries the stage reads
    upstream: tuple[str, ...]
    run: Run
    external: Callable[[Params], list[Path]] = lambda params: []
    distributed: bool = False  # a training stage: `launch` (params.yaml) can run it data-parallel
    # The Prefect flow that runs it (see flow_stages); None: every flow, after the flow's own stages.
    flow: str | None = "dynaflow"
    # A measurement stage of a compression method: its candidates (see stages.measure) join selection.
    candidates: Callable[[Params, Layout], list[Any]] | None = None
    # Stages whose outputs it reads when they are present and up to date (selection: every measurement).
    gathers: Callable[[], tuple[str, ...]] = field(default=lambda: ())
    # Its row of `dvc metrics show`, from its metrics: a handful of keys from HEADLINE_KEYS, so that every
    # stage's row fits one terminal-wide table (the full metrics stay in metrics/<stage>.json).
    headline: Callable[[dict[str, Any]], dict[str, Any]] = lambda metrics: {}
    extra_metrics: Callable[[Params], list[str]] = lambda params: []  # more DVC metrics files it writes
    # DVC plots it writes: file (inside its output) -> DVC plot properties (x, y, title, template).
    plots: Callable[[Params], dict[str, dict[str, str]]] = lambda params: {}
    # A check of this stage's output that the stages reading it run before they start: why they must
    # not (e.g. a teacher at chance), or None. Its params are a gate, in no cache key.
    gate: Callable[[Params, Layout], str | None] | None = None
    description: str = ""

    @property
    def module(self) -> str:
        """The module whose import closure is the stage's code."""
        return self.run.__module__


STAGES: dict[str, Stage] = {}

# The columns of `dvc metrics show`, shared by every stage's headline (a key of one stage only would widen
# the table by a column for every row): training examples, the chance score, the best and worst dev score
# (one model: its score), training seconds, candidates measured, and a profile's selection and its latency.
HEADLINE_KEYS = ("examples", "chance", "score", "worst", "seconds", "candidates", "selected", "latency_ms")


def extremes(scores: list[float]) -> dict[str, float]:
    """The best and the worst of a family's dev scores, as headline keys (nothing for an empty family)."""
    return {"score": max(scores), "worst": min(scores)} if scores else {}


def rounded(headline: dict[str, Any]) -> dict[str, Any]:
    """Headline values as a person reads them (4 decimals), keys checked against HEADLINE_KEYS."""
    unknown = sorted(set(headline) - set(HEADLINE_KEYS))
    if unknown:
        raise ValueError(f"headline keys {unknown} are not among {HEADLINE_KEYS}")
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in headline.items()}


def register(stage: Stage) -> Stage:
    """Add a stage (a method's training or measurement stage); names are unique, upstream must exist."""
    if stage.name in STAGES:
        raise ValueError(f"stage {stage.name!r} is registered already")
    missing = [u for u in stage.upstream if u not in STAGES]
    if missing:
        raise ValueError(f"stage {stage.name!r}: upstream {missing} not registered (register them first)")
    STAGES[stage.name] = stage
    return stage


def unregister(name: str) -> None:
    """Remove a stage (tests register throw-away methods)."""
    STAGES.pop(name, None)
    _closure.cache_clear()


def measurement_stages() -> tuple[str, ...]:
    """Every stage that measures a method's candidates, in registry order."""
    return tuple(n for n, s in STAGES.items() if s.candidates is not None)


def flows() -> list[str]:
    """Flow names: each method's own, plus ``compare`` (every registered stage)."""
    return sorted({s.flow for s in STAGES.values() if s.flow is not None}) + ["compare"]


def flow_stages(flow: str) -> list[str]:
    """The stages a flow runs, in registry order: its own, the ones every flow runs, and their upstream."""
    if flow == "compare":
        return _finalisers_last(list(STAGES))
    wanted = {n for n, s in STAGES.items() if s.flow == flow}
    if not wanted:
        raise ValueError(f"no stage belongs to flow {flow!r}; flows: {', '.join(flows())}")
    wanted |= {n for n, s in STAGES.items() if s.flow is None}
    wanted |= {up for n in list(wanted) for up in ancestors(n)}
    return _finalisers_last([n for n in STAGES if n in wanted])


def _finalisers_last(names: list[str]) -> list[str]:
    """Registry order, with the stages every flow ends with (selection) after a method registered later."""
    return [n for n in names if STAGES[n].flow is not None] + [n for n in names if STAGES[n].flow is None]


@functools.lru_cache(maxsize=4)
def _import_graph(packages: tuple[str, ...]) -> Any:
    import grimp  # parses the sources (lazy imports included) without importing them

    return grimp.build_graph(*packages, cache_dir=None)


@functools.cache
def _closure(module: str) -> tuple[str, ...]:
    """``module`` and every module of the project (and of its own package) that it imports, transitively."""
    top = module.partition(".")[0]
    # a plug-in outside the project packages (a test's method) brings its own package
    packages = PROJECT_PACKAGES if top in PROJECT_PACKAGES else (*PROJECT_PACKAGES, top)
    graph = _import_graph(packages)
    if module not in graph.modules:
        raise ValueError(f"{module} is not a module of {', '.join(packages)}")
    return tuple(sorted({module} | graph.find_upstream_modules(module)))


def code_modules(name: str) -> tuple[str, ...]:
    """Every project module the stage's code imports, directly or through others, and its own."""
    return _closure(STAGES[name].module)


def code_digest(module: str) -> dict[str, str]:
    """Digest of every project module ``module`` imports and its own: the code part of a cache key."""
    return {m: file_digest(module_file(m)) for m in _closure(module)}


def module_file(module: str) -> Path:
    """A project module's source file (without importing it)."""
    spec = sys.modules.get(module)
    if spec is not None and getattr(spec, "__file__", None):
        return Path(spec.__file__)  # type: ignore[arg-type]
    import importlib.util

    found = importlib.util.find_spec(module)
    if found is None or found.origin is None:
        raise ValueError(f"cannot find the source of {module}")
    return Path(found.origin)


def code_files(name: str) -> list[Path]:
    return [module_file(m) for m in code_modules(name)]


def _dump(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def ancestors(name: str) -> list[str]:
    """Every stage ``name`` reads from, directly or not, in registry order."""
    seen: set[str] = set()
    todo = list(STAGES[name].upstream)
    while todo:
        up = todo.pop()
        if up not in seen:
            seen.add(up)
            todo += STAGES[up].upstream
    return [n for n in STAGES if n in seen]


def gathered(name: str, params: Params, layout: Layout) -> list[str]:
    """The stages ``name`` gathers that are up to date, and so is everything they were made from.

    A measurement of a method trained from an older teacher (or with older params) is left out: its
    candidates would not be comparable with the others.
    """
    found = []
    for other in STAGES[name].gathers():
        try:
            chain = [*ancestors(other), other]
            if all(problem is None for problem in status(chain, params, layout).values()):
                found.append(other)
        except (FileNotFoundError, ValueError):  # an output on the way is missing: it has not run
            continue
    return found


def stage_key(name: str, params: Params, layout: Layout) -> str:
    """Hash of everything that determines the stage's output (upstream outputs must already exist)."""
    return _key_and_gathered(name, params, layout)[0]


def _key_and_gathered(name: str, params: Params, layout: Layout) -> tuple[str, tuple[str, ...]]:
    """(the stage's key, the gathered stages it was computed over): checking them is costly, done once."""
    stage = STAGES[name]
    ingredients = {
        "stage": name,
        "code_version": CODE_VERSION,
        "code": code_digest(stage.module),
        "params": {s: _dump(params.section(s)) for s in stage.sections},
        "upstream": {u: manifest_digest(layout.out(u)) for u in stage.upstream},
        "external": {str(p): file_digest(p) for p in stage.external(params)},
    }
    found = tuple(gathered(name, params, layout)) if stage.gathers() else ()
    if stage.gathers():
        ingredients["gathered"] = {u: manifest_digest(layout.out(u)) for u in found}
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True).encode()).hexdigest(), found


def status(names: list[str], params: Params, layout: Layout) -> dict[str, str | None]:
    """Why each stage must run (None: its output is up to date), in order; a stage after one that must run
    must run too (``after <stage>``), since its input will change."""
    problems: dict[str, str | None] = {}
    for name in names:
        stale_up = [u for u in inputs_of_declared(name) if problems.get(u) is not None]
        if stale_up:
            problems[name] = f"after {stale_up[0]}"
            continue
        missing = [u for u in STAGES[name].upstream if check_output(layout.out(u)) is not None]
        if missing:
            problems[name] = f"waiting for {missing[0]}"
            continue
        problems[name] = check_output(layout.out(name), stage_key(name, params, layout))
    return problems


def inputs_of_declared(name: str) -> tuple[str, ...]:
    """Every stage whose output ``name`` may read: its upstream and all it may gather."""
    return (*STAGES[name].upstream, *STAGES[name].gathers())


class UpstreamRefused(ConfigError):
    """An upstream output is complete but not fit to build on (its stage's gate said why)."""


class UpstreamMissing(DynaflowError):
    """An upstream output is missing, incomplete or altered: its stage must run (again) first."""


def check_upstream(name: str, layout: Layout, params: Params | None = None) -> None:
    for up in STAGES[name].upstream:
        problem = check_output(layout.out(up))
        if problem:
            raise UpstreamMissing(
                f"stage {name!r} needs the output of stage {up!r}, which is not usable: {problem}. "
                f"Run `dynaflow run --until {name}` (or `dvc repro {name}`) to rebuild what is missing"
            )
        gate = STAGES[up].gate
        if params is not None and gate is not None and (why := gate(params, layout)):
            raise UpstreamRefused(f"stage {name!r} will not start: {why}")


def fill_headlines(layout: Layout, names: list[str]) -> None:
    """An empty headline for each of ``names`` that has none (a stage of another flow, not run here): DVC
    declares every stage's headline, and warns about each missing one on every `dvc metrics show`."""
    for name in names:
        if not layout.headline(name).is_file():
            atomic_write_json(layout.headline(name), {})


def recover_outputs(layout: Layout) -> list[str]:
    """Clean up after a killed run: temporary outputs and metrics, half-replaced outputs, checkpoint
    temporaries (see :func:`dynaflow.core.artifacts.sweep_leftovers`). Call under the project lock."""
    folders = {layout.out(n).parent for n in STAGES} | {layout.work(n) for n in STAGES}
    return sweep_leftovers([*folders, layout.metrics_dir])


def check_writable(names: list[str], layout: Layout) -> None:
    """Fail before any work when a stage could not write its output, metrics or checkpoints."""
    problems = []
    for name in names:
        for path in (layout.out(name), layout.metrics(name).parent, layout.work(name)):
            if (where := unwritable(path)) is not None:
                problems.append(f"  stage {name!r}: {where} is not writable")
                break
    if problems:
        raise DynaflowError(
            "output folders this run must write are read-only (the stage would train, then fail to "
            "replace its output):\n" + "\n".join(problems) + "\nmake them writable (chmod -R u+w PATH) "
            "or run as their owner"
        )


def run_stage(
    name: str, params: Params, layout: Layout, tracker: NullTracker | None = None
) -> dict[str, Any]:
    """Run one stage into its output directory atomically; return its summary (paths, key, metrics).

    In a data-parallel run (torchrun) every rank trains, but only rank 0 writes the output, metrics and
    manifest and records to ``tracker``; the other ranks work in a throw-away directory. All return once
    rank 0's output is complete.
    """
    from dynaflow.core import distributed as ddp  # torch: imported when a stage runs, not to read status

    check_upstream(name, layout, params)
    key, found = _key_and_gathered(name, params, layout)
    out = layout.out(name)
    stage = STAGES[name]
    if ddp.init() and not ddp.is_main():
        with tempfile.TemporaryDirectory(prefix=f"dynaflow-{name}-rank{ddp.rank()}-") as scratch:
            stage.run(StageContext(name, params, layout, Path(scratch), key, NullTracker(), found))
        ddp.barrier()
        return summary(name, layout, key)
    tracker = tracker or NullTracker()
    tracker.log_params({s: _dump(params.section(s)) for s in stage.sections})
    # the output relative to the project: the record stays true when the project moves
    tracker.set_tags({"stage": name, "cache_key": key, "output": stage.out})
    with staged_output(out) as tmp:
        metrics = stage.run(StageContext(name, params, layout, tmp, key, tracker, found))
        headline = rounded(stage.headline(metrics))  # a bad headline fails before the output is published
        write_manifest(tmp, key, {"stage": name, "metrics": metrics})
    atomic_write_json(layout.metrics(name), metrics)
    atomic_write_json(layout.headline(name), headline)
    shutil.rmtree(layout.work(name), ignore_errors=True)
    tracker.log_artifact(layout.metrics(name))
    ddp.barrier()
    return summary(name, layout, key)


def summary(name: str, layout: Layout, key: str) -> dict[str, Any]:
    metrics_file = layout.metrics(name)
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    return {
        "stage": name,
        "out": str(layout.out(name)),
        "metrics_file": str(metrics_file),
        "cache_key": key,
        "metrics": metrics,
    }
