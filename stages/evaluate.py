"""Evaluation stage: every extracted sub-network of the trained DynaBERT, on every hardware profile.

For each grid point (``widths`` × ``depths``) the sub-network is physically extracted (what would ship) and
its dev metric computed once; parameters, FLOPs and file size are counted. Then, per hardware profile
present on this machine (the others are skipped with a note), every sub-network's latency (warm-up,
interleaved timed calls, median and p90, threads pinned) and peak memory are measured with the profile's
runtime, batch size and sequence length. For a profile with a budget the most accurate sub-network within
it is selected and exported (Hugging Face directory, plus ONNX for an ONNX Runtime profile), each export
checked against the elastic model first.

Outputs (``out_dir``): ``results.json`` (everything, the input of ``dynaflow report``), ``report.md`` with
one table and one ``pareto_<profile>.png`` per profile, ``exports/<profile>/``. Also
``metrics/eval_<profile>.json`` per profile (DVC metrics) and MLflow metrics and artifacts.
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dynaflow import hardware
from dynaflow.artifacts import atomic_write_json, staged_output, write_manifest
from dynaflow.backbone import load_elastic
from dynaflow.config import EvaluateConfig, HardwareProfile, Params
from dynaflow.data import TOKENIZER_DIR, read_task_meta
from dynaflow.evaluate import evaluate, hf_logits, load_dev
from dynaflow.export import (
    check_close,
    elastic_logits,
    export_onnx,
    label_names,
    onnx_logits,
    reference_batch,
    write_export,
)
from dynaflow.extract import count_parameters, extract_subnetwork, subnetwork_flops
from dynaflow.modeling import ElasticBertForSequenceClassification
from dynaflow.report import BUSY_CORES, RESULTS_FILE, write_report
from dynaflow.selection import fits, latency_key, point_name, select
from dynaflow.tracking import NullTracker

log = logging.getLogger(__name__)

OUT = "artifacts/evaluation"  # the stage's output (stages.STAGES["evaluate"].out)
HW_OUT = "artifacts/evaluation-hw"  # one directory per profile measured by `dynaflow evaluate --profile`
MEMORY_METHOD = (
    "what building the model (weights copied, or the ONNX Runtime session created) and running one batch "
    "adds to the process's peak resident memory (Linux VmHWM; CUDA: torch.cuda.max_memory_allocated)"
)


def metrics_file(metrics_dir: Path, profile: str) -> Path:
    return Path(metrics_dir) / f"eval_{profile}.json"


@dataclass
class GridPoint:
    width: float
    depth: float
    model: torch.nn.Module  # the extracted sub-network (or another method's model), CPU, eval mode
    scores: dict[str, float]
    params: int
    layers: int
    heads: int
    intermediate: int
    hf_bytes: int  # model.safetensors of the extracted sub-network
    onnx_path: Path | None
    method: str = "dynabert"  # another compression method's model measured beside the grid (theseus)
    flops_grid: tuple[float, float] | None = None  # multipliers FLOPs are counted at (default: width, depth)

    @property
    def key(self) -> str:
        return point_name(self.row_id())

    def row_id(self) -> dict[str, Any]:
        return {"width": self.width, "depth": self.depth, "method": self.method, "layers": self.layers}

    def gflops(self, config: Any, seq_len: int) -> float:
        width, depth = self.flops_grid or (self.width, self.depth)
        return subnetwork_flops(config, width, depth, seq_len) / 1e9


def check_profiles(profiles: Sequence[HardwareProfile], model: torch.nn.Module) -> None:
    longest = model.config.max_position_embeddings
    for p in profiles:
        if p.seq_len > longest:
            raise ValueError(
                f"evaluate.profiles {p.name!r}: seq_len = {p.seq_len} exceeds the model's "
                f"max_position_embeddings = {longest}"
            )


def build_grid(
    model: ElasticBertForSequenceClassification,
    widths: Sequence[float],
    depths: Sequence[float],
    task: str,
    dev: dict[str, Any],
    cfg: EvaluateConfig,
    work: Path,
    onnx: bool,
    check_batch: dict[str, torch.Tensor],
) -> list[GridPoint]:
    """Extract, score (dev) and save every sub-network once; ONNX too when a profile runs it (checked)."""
    grid = []
    for depth in depths:
        for width in widths:
            started = time.perf_counter()
            sub = extract_subnetwork(model, width, depth).eval()
            scores = evaluate(hf_logits(sub), task, dev, cfg.eval_batch_size)
            shape = model.subnet_shape(width, depth)
            point = GridPoint(
                width, depth, sub, scores, count_parameters(sub), len(shape.layers), shape.heads[0],
                shape.intermediate[0], 0, None,
            )  # fmt: skip
            where = work / point.key
            sub.save_pretrained(where, safe_serialization=True)
            point.hf_bytes = (where / "model.safetensors").stat().st_size
            if onnx:
                point.onnx_path = export_onnx(sub, where / "model.onnx", cfg.onnx_opset, cfg.onnx_exporter)
                check_close(
                    f"ONNX export of {point.key}",
                    onnx_logits(point.onnx_path, check_batch),
                    elastic_logits(model, width, depth, check_batch),
                )
            grid.append(point)
            log.info("%s: dev score %.4f, %.2f M params (%.1f s)", point.key, scores["score"],
                     point.params / 1e6, time.perf_counter() - started)  # fmt: skip
    return grid


def _runner(profile: HardwareProfile, point: GridPoint, inputs: Any, threads: int, fresh: bool) -> Callable:
    """One batch of ``profile`` on ``point``; ``fresh``: build everything anew (what memory measures)."""
    if profile.runtime == "onnxruntime":
        assert point.onnx_path is not None
        return hardware.ort_runner(hardware.ort_session(point.onnx_path, threads, profile.device), inputs)
    model = point.model
    if fresh or profile.device != "cpu":
        model = copy.deepcopy(model).to(profile.device)
    return hardware.torch_runner(model, inputs, profile.device)


def measure_profile(
    profile: HardwareProfile, grid: Sequence[GridPoint], cfg: EvaluateConfig, config: Any
) -> tuple[int, list[dict[str, Any]]]:
    """(threads, one row per grid point): latency statistics and peak memory on this machine."""
    threads = hardware.resolve_threads(profile)
    inputs = hardware.synthetic_inputs(config.vocab_size, profile.batch_size, profile.seq_len)
    sync = torch.cuda.synchronize if profile.device == "cuda" else None
    with hardware.pinned_threads(threads):
        runs = {p.key: _runner(profile, p, inputs, threads, fresh=False) for p in grid}
        # One ONNX Runtime session per model, each with its own (spinning) thread pool: with several
        # threads, time each model in blocks of consecutive calls instead of strictly alternating.
        block = 1 if profile.runtime == "torch" or threads == 1 else max(1, cfg.repeats // 5)
        stats = hardware.time_interleaved(runs, cfg.warmup, cfg.repeats, sync, block=block)
        del runs
        # ONNX Runtime's CUDA allocations are invisible to torch.cuda: peak memory unknown there.
        measurable = not (profile.device == "cuda" and profile.runtime == "onnxruntime")
        memory = {
            p.key: hardware.peak_memory_mb(
                lambda p=p: _runner(profile, p, inputs, threads, True), profile.device
            )
            if measurable
            else None
            for p in grid
        }
    rows = []
    for p in grid:
        s = stats[p.key]
        file_bytes = (
            p.onnx_path.stat().st_size if profile.runtime == "onnxruntime" and p.onnx_path else p.hf_bytes
        )
        row: dict[str, Any] = {
            **p.row_id(),
            "heads": p.heads,
            "intermediate": p.intermediate,
            "metric": p.scores["score"],
            "metrics": p.scores,
            "params": p.params,
            "gflops_per_seq": p.gflops(config, profile.seq_len),
            "file_mb": file_bytes / 1e6,
            "memory_mb": memory[p.key],
            "latency_median_ms": s.median_ms,
            "latency_p90_ms": s.p90_ms,
            "latency_mean_ms": s.mean_ms,
            "latency_min_ms": s.min_ms,
            "latency_max_ms": s.max_ms,
            "repeats": s.repeats,
            "sequences_per_s": profile.batch_size / (s.median_ms / 1e3) if s.median_ms > 0 else None,
        }
        row["fits"] = (
            fits(row, profile.latency_ms, profile.memory_mb, cfg.budget_stat) if profile.has_budget else None
        )
        rows.append(row)
    return threads, rows


def _profile_metrics(entry: dict[str, Any], stat: str) -> dict[str, Any]:
    """``metrics/eval_<profile>.json``: status, selection and the per-sub-network numbers."""
    if entry["status"] != "measured":
        return {"status": entry["status"], "note": entry["note"]}
    out: dict[str, Any] = {"status": "measured", "threads": entry["threads"]}
    if entry.get("foreign_load_cores") is not None:
        out["foreign_load_cores"] = entry["foreign_load_cores"]
    sel = entry["selection"]
    if sel["row"] is not None:
        r = sel["row"]
        out["selected"] = {
            "width": r["width"], "depth": r["depth"], "metric": r["metric"], "params": r["params"],
            f"latency_{stat}_ms": r[latency_key(stat)], "memory_mb": r["memory_mb"],
        }  # fmt: skip
    out["selection_status"] = sel["status"]
    out["grid"] = {
        point_name(r): {
            k: r[k]
            for k in (
                "metric",
                "latency_median_ms",
                "latency_p90_ms",
                "memory_mb",
                "params",
                "gflops_per_seq",
                "file_mb",
            )
        }  # fmt: skip
        for r in entry["rows"]
    }
    return out


def measure_entries(
    profiles: Sequence[HardwareProfile],
    notes: dict[str, str | None],
    grid: Sequence[GridPoint],
    cfg: EvaluateConfig,
    config: Any,
    machine: dict[str, Any],
) -> list[dict[str, Any]]:
    """One results entry per profile: measured here, or skipped with its note (device absent)."""
    entries: list[dict[str, Any]] = []
    for profile in profiles:
        entry: dict[str, Any] = {
            "profile": profile.model_dump(mode="json"),
            "machine": machine,
            "status": "skipped" if notes[profile.name] else "measured",
            "note": notes[profile.name],
            "threads": None,
            "rows": [],
            "selection": None,
            "export": None,
        }
        entries.append(entry)
        if notes[profile.name]:
            continue
        started = time.perf_counter()
        with hardware.ForeignLoad() as load:
            entry["threads"], entry["rows"] = measure_profile(profile, grid, cfg, config)
        entry["foreign_load_cores"] = load.cores
        log.info("profile %r measured in %.1f s", profile.name, time.perf_counter() - started)
        if load.cores is not None and load.cores > BUSY_CORES:
            log.warning(
                "other processes kept %.2f cores busy while profile %r was measured: its latencies are "
                "inflated (measure on an idle machine)", load.cores, profile.name,
            )  # fmt: skip
    return entries


def profile_notes(profiles: Sequence[HardwareProfile]) -> dict[str, str | None]:
    """Why each profile cannot be measured on this machine (None: it can); the skips are logged."""
    notes = {p.name: hardware.unavailable(p) for p in profiles}
    for name, note in notes.items():
        if note:
            log.warning("hardware profile %r skipped: %s", name, note)
    return notes


def results_document(
    method: str,
    task: str,
    metric_name: str,
    model_dir: Path,
    cfg: EvaluateConfig,
    machine: dict[str, Any],
    entries: list[dict[str, Any]],
) -> dict[str, Any]:
    """``results.json``: what ``dynaflow report`` renders (and merges with other methods' results)."""
    return {
        "version": 1,
        "method": method,
        "task": task,
        "main_metric": metric_name,
        "model": str(model_dir),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "protocol": {
            "warmup": cfg.warmup,
            "repeats": cfg.repeats,
            "budget_stat": cfg.budget_stat,
            "latency": "inference mode, eval, float32, synthetic full-length batches, interleaved rounds",
            "memory": MEMORY_METHOD,
        },
        "machine": machine,
        "profiles": entries,
    }


def flat_metrics(entries: Sequence[dict[str, Any]], metric_name: str) -> dict[str, Any]:
    """Counts, each point's dev metric (once) and its latency and memory per profile, as flat keys."""
    metrics: dict[str, Any] = {
        "profiles_measured": sum(e["status"] == "measured" for e in entries),
        "profiles_skipped": sum(e["status"] != "measured" for e in entries),
    }
    for entry in entries:  # the dev metric is the same for every profile: the first measured one gives it
        for r in entry["rows"]:
            metrics.setdefault(f"grid.{point_name(r)}.{metric_name}", r["metric"])
    for entry in entries:
        name = entry["profile"]["name"]
        for r in entry["rows"]:
            key = f"{name}.{point_name(r)}"
            metrics[f"{key}.latency_median_ms"] = r["latency_median_ms"]
            metrics[f"{key}.latency_p90_ms"] = r["latency_p90_ms"]
            if r["memory_mb"] is not None:
                metrics[f"{key}.memory_mb"] = r["memory_mb"]
    return metrics


def log_results(tracker: NullTracker, metrics: dict[str, Any], out_dir: Path, report: Path) -> None:
    tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)})
    tracker.log_artifact(out_dir / RESULTS_FILE, "evaluation")
    tracker.log_artifact(report, "evaluation")
    for png in sorted(out_dir.glob("pareto_*.png")):
        tracker.log_artifact(png, "evaluation")


def run(
    cfg: EvaluateConfig,
    widths: Sequence[float],
    depths: Sequence[float],
    model_dir: Path,
    data_dir: Path,
    out_dir: Path,
    tracker: NullTracker,
    metrics_dir: Path | None = None,
    only: Sequence[str] | None = None,
    published_as: Path | str = OUT,
) -> dict[str, Any]:
    """Evaluate, select and export into ``out_dir``; return the stage's flat metrics.

    ``only``: profile names to evaluate (default: all in ``cfg``). ``metrics_dir``: where the per-profile
    metrics files go (None: not written). ``published_as``: where ``out_dir`` ends up (shown in the report
    and model cards).
    """
    out_dir, published_as = Path(out_dir), Path(published_as)
    meta = read_task_meta(data_dir)
    task, metric_name = meta["task"], meta["main_metric"]
    dev = load_dev(data_dir, meta["dev_splits"])
    model = load_elastic(model_dir).eval()
    profiles = list(cfg.profiles) if only is None else [cfg.profile(n) for n in only]
    check_profiles(profiles, model)
    notes = profile_notes(profiles)
    measured = [p for p in profiles if notes[p.name] is None]
    machine = hardware.machine_info()
    check_batch = reference_batch(data_dir, model.config.vocab_size)

    with tempfile.TemporaryDirectory(prefix="dynaflow-eval-") as work:
        grid = build_grid(
            model, widths, depths, task, dev, cfg, Path(work),
            onnx=any(p.runtime == "onnxruntime" for p in measured), check_batch=check_batch,
        )  # fmt: skip
        entries = measure_entries(profiles, notes, grid, cfg, model.config, machine)
        for profile, entry in zip(profiles, entries, strict=True):
            if entry["status"] != "measured":
                continue
            selection = select(
                entry["rows"], profile.latency_ms, profile.memory_mb, cfg.budget_stat, profile.name
            )
            entry["selection"] = selection.as_dict()
            log.info("%s", selection.message)
            if selection.row is not None and cfg.export:
                r = selection.row
                point = next(p for p in grid if (p.width, p.depth) == (r["width"], r["depth"]))
                target = Path("exports") / profile.name
                write_export(
                    model, r["width"], r["depth"], out_dir / target,
                    tokenizer_dir=Path(data_dir) / TOKENIZER_DIR, batch=check_batch,
                    onnx=profile.runtime == "onnxruntime", labels=label_names(meta),
                    onnx_file=point.onnx_path, opset=cfg.onnx_opset, exporter=cfg.onnx_exporter,
                    card={
                        "task": task, "metric_name": metric_name, "metric": r["metric"],
                        "profile": entry["profile"], "threads": entry["threads"],
                        "latency": {k.removeprefix("latency_"): r[k] for k in r if k.startswith("latency_")}
                        | {"repeats": r["repeats"]},
                        "memory_mb": r["memory_mb"], "budget": selection.budget, "machine": machine,
                        "source": str(model_dir), "path": str(published_as / target),
                    },
                )  # fmt: skip
                entry["export"] = str(published_as / target)
        del grid

    results = results_document("dynabert", task, metric_name, model_dir, cfg, machine, entries)
    results |= {"widths": list(widths), "depths": list(depths)}
    atomic_write_json(out_dir / RESULTS_FILE, results)
    report = write_report(results, out_dir)

    stat = cfg.budget_stat
    metrics = flat_metrics(entries, metric_name)
    for entry in entries:
        name = entry["profile"]["name"]
        sel = entry["selection"] or {}
        if sel.get("row"):
            r = sel["row"]
            metrics |= {
                f"{name}.selected.width": r["width"],
                f"{name}.selected.depth": r["depth"],
                f"{name}.selected.{metric_name}": r["metric"],
                f"{name}.selected.latency_{stat}_ms": r[latency_key(stat)],
            }
    log_results(tracker, metrics, out_dir, report)
    for card in sorted(out_dir.glob("exports/*/README.md")):
        tracker.log_artifact(card, f"evaluation/exports/{card.parent.name}")
    if metrics_dir is not None:
        for entry in entries:
            atomic_write_json(
                metrics_file(metrics_dir, entry["profile"]["name"]), _profile_metrics(entry, stat)
            )
    return metrics


def run_profile(params: Params, root: Path, profile: str, tracker: NullTracker) -> dict[str, Any]:
    """Evaluate one profile on this machine into ``artifacts/evaluation-hw/<profile>/`` (atomically).

    What a Prefect worker on the machine with that hardware runs (``flows/evaluate.py``); it needs the data
    and depth_kd outputs (shared storage, or ``dvc pull``). ``dynaflow report`` merges the result with the
    local evaluation.
    """
    from stages import STAGES, Layout, check_upstream, stage_key

    layout = Layout(Path(root))
    params.evaluate.profile(profile)  # unknown name: ConfigError before any work
    check_upstream("evaluate", layout)
    key = stage_key("evaluate", params, layout)  # inputs, params, code and this machine
    out = layout.root / HW_OUT / profile
    with staged_output(out) as tmp:
        metrics = run(
            params.evaluate, params.widths, params.depths, layout.out(STAGES["evaluate"].upstream[-1]),
            layout.out("data"), tmp, tracker, metrics_dir=None, only=[profile],
            published_as=Path(HW_OUT) / profile,
        )  # fmt: skip
        atomic_write_json(tmp / "metrics.json", metrics)
        write_manifest(
            tmp, key, {"stage": "evaluate", "profile": profile, "machine": hardware.machine_info()}
        )
    return {"profile": profile, "out": str(out), "cache_key": key, "metrics": metrics}
