"""The pipeline's stages and the one runner that both drivers (Prefect flow, ``dvc repro``) call.

Each stage declares what determines its output: the ``params.yaml`` entries it reads, the stages upstream
of it, the files outside the pipeline it reads (GLUE files, a local backbone) and the modules whose code
produces it. :func:`stage_key` hashes exactly these, content not names, so a cache keyed on it re-runs a
stage when, and only when, one of them changed. ``dvc.yaml`` declares the same things for DVC; a test
keeps the two in step.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dynaflow import backbone as backbone_mod
from dynaflow import distributed as ddp
from dynaflow.artifacts import (
    atomic_write_json,
    check_output,
    file_digest,
    manifest_digest,
    staged_output,
    write_manifest,
)
from dynaflow.config import Params
from dynaflow.tracking import NullTracker

CODE_VERSION = "1"  # bump to invalidate every cached stage after a change the source hashes cannot see


@dataclass(frozen=True)
class Layout:
    """Where each stage's output, metrics and resumable work live, relative to the project root."""

    root: Path

    def out(self, stage: str) -> Path:
        return self.root / STAGES[stage].out

    def metrics(self, stage: str) -> Path:
        return self.root / "metrics" / f"{stage}.json"

    def work(self, stage: str) -> Path:
        return self.root / ".dynaflow" / "work" / stage


Execute = Callable[[Params, Layout, Path, str, NullTracker], dict[str, Any]]


@dataclass(frozen=True)
class Stage:
    name: str
    out: str  # output directory, relative to the project root
    sections: tuple[str, ...]  # params.yaml entries the stage reads
    upstream: tuple[str, ...]
    modules: tuple[str, ...]  # modules whose source versions the output
    execute: Execute
    external: Callable[[Params], list[Path]] = lambda params: []
    distributed: bool = False  # a training stage: `launch` (params.yaml) can run it data-parallel
    flow: str = "dynaflow"  # the Prefect flow that runs it (see flow_stages); data and teacher serve all

    def source_files(self) -> list[Path]:
        return [Path(importlib.import_module(m).__file__) for m in self.modules]  # type: ignore[arg-type]


def _run_data(params: Params, layout: Layout, out: Path, key: str, tracker: NullTracker) -> dict[str, Any]:
    from stages import data

    return data.run(params.data, params.backbone, params.seed, out, tracker)


def _run_teacher(params: Params, layout: Layout, out: Path, key: str, tracker: NullTracker) -> dict[str, Any]:
    from stages import teacher

    return teacher.run(
        params.teacher,
        params.backbone,
        params.seed,
        layout.out("data"),
        out,
        layout.work("teacher"),
        key,
        tracker,
    )


def _run_rewire(params: Params, layout: Layout, out: Path, key: str, tracker: NullTracker) -> dict[str, Any]:
    from stages import rewire

    return rewire.run(
        params.rewire, params.widths, params.depths, layout.out("teacher"), layout.out("data"), out, tracker
    )


def _run_width_kd(
    params: Params, layout: Layout, out: Path, key: str, tracker: NullTracker
) -> dict[str, Any]:
    from stages import distill

    return distill.run(
        "width", params.width_kd, params.widths, params.depths, params.seed,
        student_dir=layout.out("rewire"), teacher_dir=layout.out("teacher"), train_dir=layout.out("augment"),
        data_dir=layout.out("data"), out_dir=out, work_dir=layout.work("width_kd"), fingerprint=key,
        tracker=tracker,
    )  # fmt: skip


def _run_depth_kd(
    params: Params, layout: Layout, out: Path, key: str, tracker: NullTracker
) -> dict[str, Any]:
    from stages import distill

    return distill.run(
        "depth", params.depth_kd, params.widths, params.depths, params.seed,
        student_dir=layout.out("width_kd"), teacher_dir=layout.out("width_kd"),
        train_dir=layout.out("augment"),
        data_dir=layout.out("data"), out_dir=out, work_dir=layout.work("depth_kd"), fingerprint=key,
        tracker=tracker,
    )  # fmt: skip


def _run_augment(params: Params, layout: Layout, out: Path, key: str, tracker: NullTracker) -> dict[str, Any]:
    from stages import augment

    return augment.run(params.augment, params.seed, layout.out("teacher"), layout.out("data"), out, tracker)


def _run_theseus(params: Params, layout: Layout, out: Path, key: str, tracker: NullTracker) -> dict[str, Any]:
    from stages import theseus

    return theseus.run(
        params.theseus, params.seed, layout.out("teacher"), layout.out("data"), out, layout.work("theseus"),
        key, tracker,
    )  # fmt: skip


def _run_evaluate(
    params: Params, layout: Layout, out: Path, key: str, tracker: NullTracker
) -> dict[str, Any]:
    from stages import evaluate

    return evaluate.run(
        params.evaluate, params.widths, params.depths, model_dir=layout.out("depth_kd"),
        data_dir=layout.out("data"), out_dir=out, tracker=tracker, metrics_dir=layout.root / "metrics",
        published_as=STAGES["evaluate"].out,
    )  # fmt: skip


def _run_theseus_eval(
    params: Params, layout: Layout, out: Path, key: str, tracker: NullTracker
) -> dict[str, Any]:
    from stages import theseus_eval

    return theseus_eval.run(params.evaluate, layout.out("theseus"), layout.out("data"), out, tracker)


def _machine(params: Params) -> list[Path]:
    from dynaflow.hardware import machine_file

    return [machine_file()]  # measured latency belongs to this machine: another one re-runs the stage


def _data_inputs(params: Params) -> list[Path]:
    from stages import data

    return data.input_files(params.data) + backbone_mod.local_files(params.backbone)


_COMMON = ("dynaflow.config", "dynaflow.artifacts", "dynaflow.data")
_EVALUATE = ("stages.evaluate", "dynaflow.hardware", "dynaflow.export", "dynaflow.selection",
             "dynaflow.report", "dynaflow.extract", "dynaflow.modeling", "dynaflow.evaluate",
             "dynaflow.metrics", "dynaflow.plots", *_COMMON)  # fmt: skip
_DISTILL = ("stages.distill", "dynaflow.distill", "dynaflow.train", "dynaflow.distributed",
            "dynaflow.modeling", "dynaflow.evaluate", "dynaflow.metrics", "dynaflow.plots",
            *_COMMON)  # fmt: skip
STAGES: dict[str, Stage] = {
    s.name: s
    for s in [
        Stage(
            name="data",
            out="data/prepared",
            sections=("data", "backbone", "seed"),
            upstream=(),
            modules=("stages.data", "dynaflow.glue", "dynaflow.backbone", *_COMMON),
            execute=_run_data,
            external=_data_inputs,
        ),
        Stage(
            name="teacher",
            out="artifacts/teacher",
            sections=("teacher", "backbone", "seed"),
            upstream=("data",),
            modules=(
                "stages.teacher",
                "dynaflow.train",
                "dynaflow.distributed",
                "dynaflow.evaluate",
                "dynaflow.metrics",
                "dynaflow.backbone",
                *_COMMON,
            ),
            execute=_run_teacher,
            external=lambda p: backbone_mod.local_files(p.backbone),
            distributed=True,
        ),
        Stage(
            name="rewire",
            out="artifacts/rewired",
            sections=("rewire", "widths", "depths"),
            upstream=("data", "teacher"),
            modules=(
                "stages.rewire",
                "dynaflow.importance",
                "dynaflow.modeling",
                "dynaflow.evaluate",
                "dynaflow.metrics",
                *_COMMON,
            ),
            execute=_run_rewire,
        ),
        Stage(
            name="augment",
            out="data/augmented",
            sections=("augment", "seed"),
            upstream=("data", "teacher"),
            modules=("stages.augment", "dynaflow.augment", *_COMMON),
            execute=_run_augment,
        ),
        Stage(
            name="width_kd",
            out="artifacts/dynabert_w",
            sections=("width_kd", "widths", "seed"),
            upstream=("data", "teacher", "rewire", "augment"),
            modules=_DISTILL,
            execute=_run_width_kd,
            distributed=True,
        ),
        Stage(
            name="depth_kd",
            out="artifacts/dynabert",
            sections=("depth_kd", "widths", "depths", "seed"),
            upstream=("data", "augment", "width_kd"),
            modules=_DISTILL,
            execute=_run_depth_kd,
            distributed=True,
        ),
        Stage(
            name="evaluate",
            out="artifacts/evaluation",
            sections=("evaluate", "widths", "depths"),
            upstream=("data", "depth_kd"),
            modules=_EVALUATE,
            execute=_run_evaluate,
            external=_machine,
        ),
        Stage(
            name="theseus",
            out="artifacts/theseus",
            sections=("theseus", "seed"),
            upstream=("data", "teacher"),
            modules=(
                "stages.theseus",
                "dynaflow.theseus",
                "dynaflow.train",
                "dynaflow.evaluate",
                "dynaflow.metrics",
                *_COMMON,
            ),
            execute=_run_theseus,
            flow="theseus",
        ),
        Stage(
            name="theseus_eval",
            out="artifacts/theseus-evaluation",
            sections=("evaluate",),
            upstream=("data", "theseus"),
            modules=("stages.theseus_eval", *_EVALUATE),
            execute=_run_theseus_eval,
            external=_machine,
            flow="theseus",
        ),
    ]
}


def flow_stages(flow: str) -> list[str]:
    """The stages a flow runs, in registry order: those with ``flow == flow`` and everything upstream."""
    wanted = {n for n, s in STAGES.items() if s.flow == flow}
    if not wanted:
        flows = sorted({s.flow for s in STAGES.values()})
        raise ValueError(f"no stage belongs to flow {flow!r}; flows: {', '.join(flows)}")
    todo = list(wanted)
    while todo:
        for up in STAGES[todo.pop()].upstream:
            if up not in wanted:
                wanted.add(up)
                todo.append(up)
    return [n for n in STAGES if n in wanted]


def _dump(value: Any) -> Any:
    return value.model_dump(mode="json") if hasattr(value, "model_dump") else value


def stage_key(name: str, params: Params, layout: Layout) -> str:
    """Hash of everything that determines the stage's output (upstream outputs must already exist)."""
    stage = STAGES[name]
    ingredients = {
        "stage": name,
        "code_version": CODE_VERSION,
        "code": {m: file_digest(f) for m, f in zip(stage.modules, stage.source_files(), strict=True)},
        "params": {s: _dump(params.section(s)) for s in stage.sections},
        "upstream": {u: manifest_digest(layout.out(u)) for u in stage.upstream},
        "external": {str(p): file_digest(p) for p in stage.external(params)},
    }
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True).encode()).hexdigest()


def check_upstream(name: str, layout: Layout) -> None:
    for up in STAGES[name].upstream:
        problem = check_output(layout.out(up))
        if problem:
            raise RuntimeError(f"stage {name!r} needs the output of {up!r}, which is not usable: {problem}")


def run_stage(
    name: str, params: Params, layout: Layout, tracker: NullTracker | None = None
) -> dict[str, Any]:
    """Run one stage into its output directory atomically; return its summary (paths, key, metrics).

    In a data-parallel run (torchrun) every rank trains, but only rank 0 writes the output, metrics and
    manifest and records to ``tracker``; the other ranks work in a throw-away directory. All return once
    rank 0's output is complete.
    """
    check_upstream(name, layout)
    key = stage_key(name, params, layout)
    out = layout.out(name)
    if ddp.init() and not ddp.is_main():
        with tempfile.TemporaryDirectory(prefix=f"dynaflow-{name}-rank{ddp.rank()}-") as scratch:
            STAGES[name].execute(params, layout, Path(scratch), key, NullTracker())
        ddp.barrier()
        return summary(name, layout, key)
    tracker = tracker or NullTracker()
    tracker.log_params({s: _dump(params.section(s)) for s in STAGES[name].sections})
    tracker.set_tags({"stage": name, "cache_key": key, "output": out})
    with staged_output(out) as tmp:
        metrics = STAGES[name].execute(params, layout, tmp, key, tracker)
        write_manifest(tmp, key, {"stage": name, "metrics": metrics})
    atomic_write_json(layout.metrics(name), metrics)
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
