"""Same-size controls for DynaBERT: each chosen grid cell distilled alone, measured like every candidate.

Not a flow stage and not in dvc.yaml (a bench, hours on a CPU): ``dynaflow controls`` (and
``bench/controls.py``, one run per budget it is given) calls :func:`run_controls` after the DynaBERT flow.
What a control is and how its budget is counted: :mod:`dynaflow.methods.dynabert.controls`.

Outputs, per budget (``controls.budget``): ``artifacts/controls/<budget>/<cell>/`` (the control model, its
``grid.json`` and ``control.json``; cached by a key over the DynaBERT stages it is compared with, its params
and its code), ``results.json`` (the controls measured on every hardware profile), ``summary.json``, and
``reports/controls/<budget>/``: the selection's report with the controls added as a family of their own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import shutil
import tempfile
from functools import partial
from pathlib import Path
from typing import Any

from dynaflow.config import ConfigError, Params
from dynaflow.core.artifacts import (
    atomic_write_json,
    check_output,
    manifest_digest,
    staged_output,
    write_manifest,
)
from dynaflow.core.errors import DynaflowError
from dynaflow.core.tracking import NullTracker
from dynaflow.data.splits import load_split
from dynaflow.methods.dynabert.controls import METHOD, cell_name, passes_in_dynabert, stage_steps
from stages.measure import chosen_on, measure_into
from stages.registry import CODE_VERSION, Layout, code_digest

log = logging.getLogger(__name__)

OUT = "artifacts/controls"
REPORTS = "reports/controls"
# What a control is compared with and made from: their outputs are in its key.
COMPARED_WITH = ("data", "teacher", "rewire", "augment", "width_kd", "depth_kd")
COUNTED = ("width_kd", "depth_kd")  # the DynaBERT stages whose steps a control's budget counts
# Wall budget: steps timed to convert DynaBERT's seconds into the control's steps. 5 and 10 steps missed the
# controls' real step time by -42% to +23% (BENCHMARKS.md, issue 18): now a 25-step difference.
PILOT_STEPS = 25
CONTROL_FILE = "control.json"


def control_key(params: Params, layout: Layout, cell: tuple[float, float]) -> str:
    ingredients = {
        "code_version": CODE_VERSION,
        "code": code_digest(__name__),
        "cell": list(cell),
        # Not the other cells: a cell trained alone (DynaBERT's whole distillation time at the wall budget)
        # is reused by a later run that lists it among others.
        "params": {s: params.section(s).model_dump(mode="json") for s in ("depth_kd", "width_kd")}
        | {"controls": params.controls.model_dump(mode="json", exclude={"cells"})}
        | {"seed": params.seed, "widths": params.widths, "depths": params.depths},
        "upstream": {u: manifest_digest(layout.out(u)) for u in COMPARED_WITH},
    }
    return hashlib.sha256(json.dumps(ingredients, sort_keys=True).encode()).hexdigest()


def dynabert_seconds(layout: Layout) -> float:
    """How long DynaBERT's two distillation stages trained (their metrics, written when they ran)."""
    total = 0.0
    for stage in COUNTED:
        path = layout.metrics(stage)
        try:
            total += float(json.loads(path.read_text())["train_seconds"])
        except (FileNotFoundError, KeyError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"{path}: no train_seconds ({exc.__class__.__name__}); the wall budget needs the DynaBERT "
                "stages' own timings: run them here (`dynaflow run`), or use controls.budget: passes"
            ) from None
    return total


def train_control(params: Params, layout: Layout, cell: tuple[float, float], tracker: NullTracker) -> dict:
    """Distil ``cell`` alone (cached); returns its ``control.json`` plus the training seconds."""
    from stages.distill import distill

    budget, name = params.controls.budget, cell_name(cell)
    out = layout.root / OUT / budget / name
    key = control_key(params, layout, cell)
    if check_output(out, key) is None:
        log.info("control %s (%s): cached in %s", name, budget, out)
        return json.loads((out / CONTROL_FILE).read_text())
    train_examples = len(load_split(layout.out("augment"), "train"))
    count = partial(passes_in_dynabert, cell, params.widths, params.depths, params.width_kd, params.depth_kd,
                    seed=params.seed)  # fmt: skip
    passes = count(stage_steps(params.width_kd, params.depth_kd, train_examples))
    if not sum(passes.values()):
        raise ConfigError(f"controls.cells: DynaBERT never trained {name} (its sampler never drew it)")
    cfg = params.depth_kd.model_copy(
        update={"subnets": "all", "teacher_width": "full", "teacher_cache": False, "final_finetune_epochs": 0}
    )
    steps_per_epoch = -(-train_examples // cfg.batch_size)

    def train(steps: int, out_dir: Path, work: Path, fingerprint: str) -> dict[str, Any]:
        section = cfg.model_copy(update={"epochs": max(1, math.ceil(steps / steps_per_epoch))})
        return distill(
            "depth", section, [cell[0]], [cell[1]], params.seed, student_dir=layout.out("rewire"),
            teacher_dir=layout.out("teacher"), train_dir=layout.out("augment"), data_dir=layout.out("data"),
            out_dir=out_dir, work_dir=work, fingerprint=fingerprint, tracker=tracker, max_steps=steps,
        )  # fmt: skip

    kept = kept_steps(layout)
    info: dict[str, Any] = {"cell": list(cell), "budget": budget, "passes_in_dynabert": passes,
                            "passes_in_kept_weights": count(kept) if kept else None}  # fmt: skip
    if budget == "passes":
        steps = sum(passes.values())
    else:
        seconds = dynabert_seconds(layout)
        per_step = pilot_seconds_per_step(lambda n, where: train(n, where / "out", where / "work", "pilot"))
        steps = max(1, int(seconds / per_step))
        info |= {"dynabert_seconds": seconds, "pilot_seconds_per_step": per_step}
    log.info("control %s (%s): %d steps (DynaBERT trained it in %s steps)", name, budget, steps, passes)
    work = layout.work(f"controls-{budget}-{name}")
    with staged_output(out) as tmp:
        # The step count is in the fingerprint: a resumed wall-budget run whose pilot counted otherwise
        # starts over instead of continuing another schedule.
        metrics = train(steps, tmp, work, f"{key}:{steps}")
        info |= {k: metrics[k] for k in ("selected_step", "train_seconds")} | {"steps": steps}
        prefix = f"dev.{name}."
        info["dev"] = {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)}
        atomic_write_json(tmp / CONTROL_FILE, info)
        write_manifest(tmp, key, {"control": name, "budget": budget})
    shutil.rmtree(work, ignore_errors=True)  # its checkpoints: the output is in place
    return info


def pilot_seconds_per_step(train: Any) -> float:
    """Seconds per training step of a control: two short runs, ``PILOT_STEPS`` and twice that, differenced,
    so that what each run pays once (loading, the epoch-end evaluation, the checkpoint) cancels out."""
    seconds = []
    for n in (PILOT_STEPS, 2 * PILOT_STEPS):
        with tempfile.TemporaryDirectory(prefix="dynaflow-control-pilot-") as pilot:
            seconds.append(train(n, Path(pilot))["train_seconds"])
    return max(seconds[1] - seconds[0], 1e-6) / PILOT_STEPS


def kept_steps(layout: Layout) -> dict[str, int] | None:
    """The step whose weights each DynaBERT stage kept (its metrics' ``selected_step``; None when they were
    not recorded here): the passes up to them trained the shipped sub-networks."""
    try:
        return {s: int(json.loads(layout.metrics(s).read_text())["selected_step"]) for s in COUNTED}
    except (FileNotFoundError, KeyError, json.JSONDecodeError):
        return None


def earlier_cells(params: Params, layout: Layout, listed: list) -> list[tuple[float, float]]:
    """Grid cells not ``listed`` whose control an earlier run trained under the current key (same
    DynaBERT, params and code): wall-budget cells are trained one run at a time, and each run's results and
    summary should cover every cell trained so far, not the last one alone."""
    where, listed_cells = layout.root / OUT / params.controls.budget, {tuple(c) for c in listed}
    return [
        (w, d)
        for w in params.widths
        for d in params.depths
        if (w, d) not in listed_cells
        and check_output(where / cell_name((w, d)), control_key(params, layout, (w, d))) is None
    ]


def run_controls(params: Params, root: Path, tracker: NullTracker | None = None) -> dict[str, Any]:
    """Train (or reuse) every control of ``params.controls``, measure them and every cell an earlier run
    trained under the same key on every profile, and rebuild the selection's report with them; the summary
    (also ``artifacts/controls/<budget>/summary.json``)."""
    from dynaflow.methods.dynabert.controls import control_candidate
    from dynaflow.models.backbone import load_elastic
    from stages.select import STAGE as SELECT
    from stages.select import rebuild_report

    layout, tracker = Layout(Path(root)), tracker or NullTracker()
    params.check_cells("controls.cells", params.controls.cells)
    for stage in COMPARED_WITH:  # the DynaBERT run the controls are compared with must be here
        if problem := check_output(layout.out(stage)):
            raise DynaflowError(f"same-size controls need stage {stage!r}: {problem}; run `dynaflow run`")
    budget = params.controls.budget
    trained = {cell_name(c): train_control(params, layout, c, tracker) for c in params.controls.cells}
    cells = list(params.controls.cells)
    where = layout.root / OUT / budget
    for cell in earlier_cells(params, layout, cells):  # a run that lists fewer cells replaces no summary
        trained[cell_name(cell)] = json.loads((where / cell_name(cell) / CONTROL_FILE).read_text())
        cells.append(cell)
    candidates = [control_candidate(load_elastic(where / cell_name(c)).eval(), c, budget) for c in cells]
    cfg, data_dir = params.evaluate, layout.out("data")
    results = measure_into(candidates, METHOD, where, data_dir, cfg.profiles, cfg, layout.root, where,
                           chosen_on(params.depth_kd.selection, data_dir))  # fmt: skip
    sources = [layout.root / SELECT.out] if (layout.root / SELECT.out / "results.json").is_file() else []
    report, _ = rebuild_report(layout.root, [*sources, where], layout.root / REPORTS / budget)
    grid = json.loads((layout.out("depth_kd") / "grid.json").read_text())
    summary = {
        "budget": budget,
        "cells": {
            name: info | {"dynabert_dev": grid[name], "dynabert_selection": params.depth_kd.selection}
            for name, info in trained.items()
        },
        "report": str(report.relative_to(layout.root)),
        "results": str((where / "results.json").relative_to(layout.root)),
        "main_metric": results["main_metric"],
    }
    atomic_write_json(where / "summary.json", summary)
    return summary
