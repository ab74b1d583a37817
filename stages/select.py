"""Selection stage: for every hardware profile, the best candidate of every method that ran, exported.

It gathers the results of each method's measurement stage that is present and up to date (DynaBERT's
``evaluate``, Theseus's ``theseus_eval``, the next methods' own), puts all candidates of a profile on one
Pareto front, and picks the most accurate one within the profile's budget that also meets the quality
floor: at least ``evaluate.min_gain_over_chance`` above the majority-class / chance score the data stage
recorded, and at most ``evaluate.max_metric_drop`` below the teacher. When no in-budget candidate meets the
floor, nothing is exported for that profile and the log, the report and the metrics say so, naming the best
candidate that was turned down. Winners are exported by :func:`dynaflow.evaluation.export.export_candidate`,
through the candidate list of the stage that measured them.

Outputs (``out``): ``results.json`` (every method's rows, selection, export), ``report.md`` with one table
and one ``pareto_<profile>.png`` per profile, ``exports/<profile>/``; ``metrics/eval_<profile>.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from dynaflow.config import Params
from dynaflow.core.artifacts import atomic_write_json, check_output, staged_output, write_manifest
from dynaflow.core.errors import DynaflowError
from dynaflow.core.tracking import NullTracker
from dynaflow.data.glue import get_task
from dynaflow.data.splits import TOKENIZER_DIR, load_split, read_task_meta
from dynaflow.evaluation.candidates import Candidate
from dynaflow.evaluation.report import (
    REPORT_FILE,
    RESULTS_FILE,
    load_results,
    merge_results,
    plot_points,
    report_key,
    write_report,
)
from dynaflow.evaluation.selection import QualityFloor, fits, latency_key, quality_floor, select
from stages.measure import chosen_on, measure_into
from stages.registry import (
    STAGES,
    Layout,
    Stage,
    StageContext,
    UpstreamMissing,
    check_upstream,
    measurement_stages,
    register,
    rounded,
    stage_key,
)

log = logging.getLogger(__name__)

HW_OUT = "artifacts/evaluation-hw"  # one directory per profile measured by `dynaflow evaluate --profile`


def points_file(profile: str) -> str:
    """A profile's candidates as records (latency, metric, method, ...), for `dvc plots`."""
    return f"points_{profile}.json"


def profile_metrics_file(layout: Layout, profile: str) -> Path:
    return layout.metrics_dir / f"eval_{profile}.json"


def profile_headline_file(layout: Layout, profile: str) -> Path:
    """A profile's row of `dvc metrics show`: what ships, its dev score and latency, among how many."""
    return layout.headline(f"select_{profile}")


def profile_headline(summary: dict[str, Any], metric_name: str, stat: str) -> dict[str, Any]:
    if summary["status"] != "measured":
        return {"selected": "skipped here"}
    chosen = summary.get("selected")
    if not chosen:
        return {"selected": "none", "candidates": summary["candidates"]}
    return {
        "selected": chosen["candidate"],  # method/name
        "score": chosen[metric_name],
        "latency_ms": chosen[f"latency_{stat}_ms"],
        "candidates": summary["candidates"],
    }


def reference_scores(layout: Layout) -> dict[str, float | None]:
    """The teacher's dev score and the majority-class / chance score (the report draws both)."""
    meta = read_task_meta(layout.out("data"))
    teacher_file = layout.out("teacher") / "metrics.json"
    teacher = json.loads(teacher_file.read_text()).get("score") if teacher_file.is_file() else None
    return {"teacher": teacher, "chance": (meta.get("chance") or {}).get("score")}


def floor_for(params: Params, layout: Layout) -> QualityFloor:
    """The quality floor from the data stage's chance score and the teacher's dev score."""
    teacher, chance = reference_scores(layout).values()
    cfg = params.evaluate
    if not cfg.quality_floor:
        return QualityFloor(None, "no quality floor (evaluate.quality_floor: false)")
    return quality_floor(teacher, chance, cfg.max_metric_drop, cfg.min_gain_over_chance)


class CandidateIndex:
    """Finds a measured row's candidate through the stage that measured its method (built once per stage)."""

    def __init__(self, params: Params, layout: Layout, stage_of: dict[str, str]):
        self.params, self.layout, self.stage_of = params, layout, stage_of
        self.built: dict[str, dict[str, Candidate]] = {}

    def __call__(self, row: dict[str, Any]) -> Candidate:
        stage = self.stage_of[row["method"]]
        if stage not in self.built:
            listed = STAGES[stage].candidates(self.params, self.layout)  # type: ignore[misc]
            self.built[stage] = {c.id: c for c in listed}
        wanted = row.get("base", row["candidate"])  # an int8 variant: the float candidate it comes from
        try:
            return self.built[stage][wanted]
        except KeyError:
            raise RuntimeError(f"stage {stage!r} no longer lists candidate {wanted!r} (re-run it)") from None


def select_and_export(
    merged: dict[str, Any],
    params: Params,
    layout: Layout,
    out_dir: Path,
    published_as: Path,
    find: CandidateIndex,
) -> dict[str, Any]:
    """Select per measured profile (budget and quality floor) and export the winners into ``out_dir``."""
    # Imported here, as in every stage module: `dynaflow status` imports them all to read the declarations.
    from dynaflow.evaluation.export import export_candidate, label_names, reference_batch

    cfg = params.evaluate
    data_dir = layout.out("data")
    meta = read_task_meta(data_dir)
    floor = floor_for(params, layout)
    merged["quality"] = floor.reason
    merged["reference"] = reference_scores(layout) | {"floor": floor.floor}
    # The teacher (the reference line, and the floor's anchor) chose its weights too: the report says how.
    merged.setdefault("checkpoints", {})["teacher"] = chosen_on(params.teacher.selection, data_dir)
    batch = reference_batch(data_dir, vocab_size=0)
    least = cfg.int8_min_agreement  # regression tasks: no agreement share, no int8 row is held back
    for entry in merged["profiles"]:
        if entry["status"] != "measured":
            continue
        profile = cfg.profile(entry["profile"]["name"])
        # The budgets in force now (measurements are not keyed on them): the report and card must agree.
        entry["profile"] = profile.model_dump(mode="json")
        for row in entry["rows"]:
            row["fits"] = (
                fits(row, profile.latency_ms, profile.memory_mb, cfg.budget_stat)
                if profile.has_budget
                else None
            )
        # An int8 variant that strays from its float model more than int8_min_agreement allows would fail
        # its export check: it is not a candidate for shipping (it stays in the table and the plot).
        strays = [r for r in entry["rows"] if (a := r.get("int8_agreement")) is not None and a < least]
        for r in strays:
            log.warning("%s: predicts as its float model on %.1f%% of dev, below evaluate.int8_min_agreement "
                        "(%.1f%%): not shipped", r["candidate"], 100 * r["int8_agreement"],
                        100 * cfg.int8_min_agreement)  # fmt: skip
        eligible = [r for r in entry["rows"] if r not in strays]
        selection = select(
            eligible, profile.latency_ms, profile.memory_mb, cfg.budget_stat, profile.name, quality=floor
        )
        entry["selection"] = selection.as_dict()
        if selection.status == "below_quality":
            log.warning("%s", selection.message)
        else:
            log.info("%s", selection.message)
        if selection.row is None or not cfg.export:
            continue
        r = selection.row
        target = Path("exports") / profile.name
        card = {
            "task": meta["task"],
            "metric_name": meta["main_metric"],
            "metric": r["metric"],
            "profile": entry["profile"],
            "threads": entry["threads"],
            "machine": entry["machine"],
            "latency": {k.removeprefix("latency_"): r[k] for k in r if k.startswith("latency_")}
            | {"repeats": r["repeats"]},
            "memory_mb": r["memory_mb"],
            "budget": selection.budget,
            "source": (merged.get("sources") or {}).get(r["method"], "?"),
            "path": str(published_as / target),
            "precision": r.get("precision", "float32"),
        }
        int8 = r.get("precision") == "int8"
        export_candidate(
            find(r),
            out_dir / target,
            tokenizer_dir=data_dir / TOKENIZER_DIR,
            batch=batch,
            onnx=profile.runtime == "onnxruntime",
            labels=label_names(meta),
            card=card,
            opset=cfg.onnx_opset,
            exporter=cfg.onnx_exporter,
            int8_dev=load_split(data_dir, meta["dev_splits"][0]) if int8 else None,
            min_agreement=cfg.int8_min_agreement,
            int8_recipe=r.get("int8_recipe") or "vnni",  # as measured (rows older than the recipe: vnni)
        )
        entry["export"] = str(published_as / target)
    return merged


def selection_metrics(merged: dict[str, Any], stat: str) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """(flat stage metrics, one summary per profile for ``metrics/eval_<profile>.json``)."""
    metric_name = merged.get("main_metric", "score")
    flat: dict[str, Any] = {"methods": len(merged["methods"])}
    per_profile: dict[str, dict[str, Any]] = {}
    for entry in merged["profiles"]:
        name = entry["profile"]["name"]
        if entry["status"] != "measured":
            per_profile[name] = {"status": entry["status"], "note": entry["note"]}
            continue
        sel = entry["selection"] or {}
        summary: dict[str, Any] = {
            "status": "measured",
            "selection_status": sel.get("status"),
            "candidates": len(entry["rows"]),
            "quality": sel.get("quality"),
        }
        flat[f"{name}.candidates"] = len(entry["rows"])
        if sel.get("row"):
            r = sel["row"]
            summary["selected"] = {
                "candidate": r["candidate"],
                "method": r["method"],
                metric_name: r["metric"],
                f"latency_{stat}_ms": r[latency_key(stat)],
                "memory_mb": r["memory_mb"],
                "params": r["params"],
                "export": entry["export"],
            }
            flat[f"{name}.selected.{metric_name}"] = r["metric"]
            flat[f"{name}.selected.latency_{stat}_ms"] = r[latency_key(stat)]
        if sel.get("rejected"):
            summary["rejected_for_quality"] = {
                "candidate": sel["rejected"]["candidate"],
                metric_name: sel["rejected"]["metric"],
            }
        per_profile[name] = summary
    return flat, per_profile


def run(ctx: StageContext) -> dict[str, Any]:
    if not ctx.gathered:
        raise DynaflowError(
            "no up-to-date measured candidates: run a method's measurement stage first ("
            + ", ".join(measurement_stages())
            + "); a measurement made before its code or params changed is stale "
            "(`dynaflow status` shows which)"
        )
    left_out = [s for s in measurement_stages() if s not in ctx.gathered]
    if left_out:  # not run, or trained/measured with other inputs: their candidates would not be comparable
        log.warning("not in this selection (not run, or not up to date): %s", ", ".join(left_out))
    results = load_results([ctx.upstream(s) for s in ctx.gathered])
    stage_of = {m: stage for stage, doc in zip(ctx.gathered, results, strict=True) for m in doc["methods"]}
    merged = merge_results(results)
    merged = select_and_export(
        merged,
        ctx.params,
        ctx.layout,
        ctx.out,
        Path(STAGE.out),
        CandidateIndex(ctx.params, ctx.layout, stage_of),
    )
    atomic_write_json(ctx.out / RESULTS_FILE, merged)
    report = write_report(merged, ctx.out)
    stat = ctx.params.evaluate.budget_stat
    flat, per_profile = selection_metrics(merged, stat)
    metric_name = merged.get("main_metric", "score")
    for name, summary in per_profile.items():
        atomic_write_json(profile_metrics_file(ctx.layout, name), summary)
        headline = rounded(profile_headline(summary, metric_name, stat))
        atomic_write_json(profile_headline_file(ctx.layout, name), headline)
    pair = get_task(ctx.params.data.task).has_text_pair
    for entry in merged["profiles"]:  # every profile's points for `dvc plots` (none where it was skipped)
        name = entry["profile"]["name"]
        points = plot_points(entry, stat) if entry["status"] == "measured" else []
        atomic_write_json(ctx.out / points_file(name), points)
        shipped = (entry.get("selection") or {}).get("row") or {}
        if entry.get("export") and ctx.tracker.run_id:  # shipped: an MLflow model too (Models, registry)
            if shipped.get("precision") == "int8":  # the MLflow model would run the float HF weights
                log.info("%s ships an int8 ONNX model: no MLflow model logged (the export has it)", name)
                continue
            from dynaflow.evaluation.mlflow_model import log_exported_model  # MLflow's import is costly

            log_exported_model(ctx.tracker, ctx.out / "exports" / name, name, pair)
    ctx.tracker.log_metrics(flat)  # the tracker keeps the finite numbers
    ctx.tracker.log_artifact(report, "selection")
    for png in sorted(ctx.out.glob("pareto_*.png")):
        ctx.tracker.log_artifact(png, "selection")
    for card in sorted(ctx.out.glob("exports/*/README.md")):
        ctx.tracker.log_artifact(card, f"selection/exports/{card.parent.name}")
    return flat


STAGE = register(
    Stage(
        name="select",
        out="artifacts/selection",
        sections=("evaluate", "teacher"),  # teacher: how it chose its weights (report)
        upstream=("data", "teacher"),
        run=run,
        flow=None,  # every flow ends with it
        gathers=measurement_stages,
        headline=lambda m: {"candidates": max(v for k, v in m.items() if k.endswith(".candidates"))},
        # one row per profile (Layout(Path()): the paths relative to the project, as dvc.yaml has them)
        extra_metrics=lambda params: [
            profile_headline_file(Layout(Path()), p.name).as_posix() for p in params.evaluate.profiles
        ],
        plots=lambda params: {
            points_file(p.name): {
                "x": "latency_ms", "y": "metric", "template": "scatter",
                "title": f"{p.name}: dev score vs latency {params.evaluate.budget_stat} (ms)",
            }
            for p in params.evaluate.profiles
        },  # fmt: skip
        description="per profile, the best in-budget candidate of every method, above the quality floor",
    )
)


def measure_profile_here(params: Params, root: Path, profile: str, tracker: NullTracker) -> dict[str, Any]:
    """Measure one profile here, every method's candidates, into ``artifacts/evaluation-hw/<profile>``.

    What a Prefect worker on the machine with that hardware runs (``flows/evaluate.py``); it needs the
    trained methods' outputs (shared storage, or ``dvc pull``). Selection and export for that profile follow,
    as in the ``select`` stage; ``dynaflow report`` merges the result with the local ones.
    """
    layout = Layout(Path(root))
    cfg = params.evaluate
    target = cfg.profile(profile)  # unknown name: ConfigError before any work
    ready = []
    for name in measurement_stages():
        try:
            check_upstream(name, layout)
        except UpstreamMissing:
            continue  # that method has not been trained here
        ready.append(name)
    if not ready:
        raise RuntimeError(f"no method's trained outputs are here to measure (stages {measurement_stages()})")
    keys = {name: stage_key(name, params, layout) for name in ready}
    key = hashlib.sha256(
        json.dumps({"profile": profile, "stages": keys}, sort_keys=True).encode()
    ).hexdigest()
    out = layout.root / HW_OUT / profile
    with staged_output(out) as tmp:
        docs, stage_of = [], {}
        for name in ready:
            found = STAGES[name].candidates(params, layout)  # type: ignore[misc]
            if not found:
                raise RuntimeError(f"stage {name!r} lists no candidates to measure")
            method = found[0].method
            source = layout.out(STAGES[name].upstream[-1])
            docs.append(
                measure_into(
                    found, method, source, layout.out("data"), [target], cfg, layout.root, tmp / name
                )
            )
            stage_of[method] = name
        merged = select_and_export(
            merge_results(docs),
            params,
            layout,
            tmp,
            Path(HW_OUT) / profile,
            CandidateIndex(params, layout, stage_of),
        )
        atomic_write_json(tmp / RESULTS_FILE, merged)
        flat, _ = selection_metrics(merged, cfg.budget_stat)
        atomic_write_json(tmp / "metrics.json", flat)
        tracker.log_metrics(flat)
        write_manifest(tmp, key, {"stage": "evaluate-profile", "profile": profile})
    return {"profile": profile, "out": str(out), "cache_key": key, "metrics": flat}


REPORT_OUT = "reports/evaluation"  # the merged report (not a stage output: rebuilt from stored results)


def default_results(root: Path) -> list[Path]:
    """The local selection, then every profile measured elsewhere by ``dynaflow evaluate --profile``."""
    found = [root / STAGE.out] if (root / STAGE.out / RESULTS_FILE).is_file() else []
    return found + sorted(p.parent for p in (root / HW_OUT).glob(f"*/{RESULTS_FILE}"))


def rebuild_report(root: Path, paths: list[Path] | None = None, out: Path | None = None) -> tuple[Path, str]:
    """Merge stored results (default: :func:`default_results`) into one report; (report path, summary).

    A profile measured by one result set keeps that set's selection and export; skipped by the local run
    and measured elsewhere, the other machine's entry is shown.
    """
    paths = paths if paths else default_results(Path(root))
    if not paths:
        raise FileNotFoundError("no evaluation results found; run `dynaflow run` (or pass --results)")
    merged = merge_results(load_results(paths), keep_selection=True)
    out = out or Path(root) / REPORT_OUT
    note = (
        f"report of {len(merged['profiles'])} profile(s) from {len(paths)} result set(s), methods "
        f"{', '.join(merged['methods'])}"
    )
    key = report_key(merged)
    if check_output(out, key) is None:  # same results, same code, files untouched: plotting again is waste
        return out / REPORT_FILE, f"{note} (unchanged, not rebuilt)"
    report = write_report(merged, out)
    atomic_write_json(out / RESULTS_FILE, merged)
    write_manifest(out, key)  # last: a report cut off half-way has no manifest and is rebuilt next time
    return report, note
