"""The one measurement protocol every candidate of every method goes through.

For each candidate the model is built once (what would ship), its dev metric computed once on the same dev
data, its parameters, FLOPs and file size counted, and, when an ONNX Runtime profile is measured, it is
exported to ONNX and checked against the candidate's reference logits. Then, per hardware profile present
on this machine (the others are skipped with a note), every candidate's latency (warm-up, interleaved timed
calls, median and p90, threads pinned) and peak memory are measured with the profile's runtime, batch size
and sequence length. The result is one ``results.json`` document per method (:func:`results_document`),
the input of selection and of the report.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dynaflow.config import EvaluateConfig, HardwareProfile
from dynaflow.data.splits import TokenizedSplit
from dynaflow.evaluation import hardware
from dynaflow.evaluation.candidates import Batch, Candidate, counted_flops
from dynaflow.evaluation.export import (
    INT8_FILE,
    INT8_SCORING_BATCH,
    agreement,
    check_close,
    export_onnx,
    model_logits,
    onnx_logits,
    onnx_logits_fn,
    quantize_int8,
)
from dynaflow.evaluation.machine import BUSY_CORES, available_cpus, cpu_flags, has_vnni, machine_info
from dynaflow.evaluation.scoring import evaluate, hf_logits
from dynaflow.evaluation.selection import fits

log = logging.getLogger(__name__)

MEMORY_METHOD = (
    "what building the model (weights copied, or the ONNX Runtime session created) and running one batch "
    "adds to the process's peak resident memory (Linux VmHWM; CUDA: torch.cuda.max_memory_allocated)"
)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


INT8_SUFFIX = "-int8"  # an int8 variant's name: the candidate's, plus this (MLflow-safe in metric keys)


@dataclass
class Prepared:
    """A candidate built, dev-scored and saved: ready to time on every profile.

    ``precision`` int8: the candidate's ONNX model quantised (``onnx_path`` is the int8 file, ``scores`` its
    own dev scores, ``int8`` how it agrees with the float model); it runs on ONNX Runtime CPU profiles only.
    """

    candidate: Candidate
    model: torch.nn.Module
    scores: dict[str, float]
    params: int
    hf_bytes: int  # model.safetensors as saved
    onnx_path: Path | None
    precision: str = "float32"
    int8: dict[str, Any] | None = None

    def runs_on(self, profile: HardwareProfile) -> bool:
        return self.precision == "float32" or int8_profile(profile)

    def row_id(self) -> dict[str, Any]:
        row = self.candidate.row_id() | {"precision": self.precision}
        if self.precision == "int8":
            row |= {
                "candidate": self.candidate.id + INT8_SUFFIX,
                "name": self.candidate.name + INT8_SUFFIX,
                "label": f"{row['label']} int8",
                "base": self.candidate.id,  # the float candidate it is quantised from (export builds that)
            }
            row |= {f"int8_{k}": v for k, v in (self.int8 or {}).items()}
        return row

    def gflops(self, seq_len: int) -> float:
        c = self.candidate
        if c.flops is not None:
            return c.flops(seq_len) / 1e9
        return counted_flops(self.model, self.model.config.vocab_size, seq_len) / 1e9

    def gflops_dev(self, lengths: Sequence[int]) -> float | None:
        """Mean encoder GFLOPs per dev input, each at its own length (analytic counts only: None without)."""
        if self.candidate.flops is None or not lengths:
            return None
        per_length = {n: self.candidate.flops(n) for n in set(lengths)}
        return float(np.mean([per_length[n] for n in lengths])) / 1e9


def int8_profile(profile: HardwareProfile) -> bool:
    """Profiles int8 variants are measured on: dynamic int8 (integer matmuls) is an ONNX Runtime CPU path."""
    return profile.runtime == "onnxruntime" and profile.device == "cpu"


def int8_variant(p: Prepared, task: str, dev: dict[str, TokenizedSplit],
                 float_logits: dict[str, np.ndarray], recipe: str = "vnni") -> Prepared:  # fmt: skip
    """``p``'s ONNX model quantised to dynamic int8 (``recipe``: ``export.INT8_RECIPES``), dev-scored on its
    own predictions, one example at a time (``export.INT8_SCORING_BATCH``: its logits depend on its batch)."""
    assert p.onnx_path is not None
    path = quantize_int8(p.onnx_path, p.onnx_path.with_name(INT8_FILE), recipe)
    logits: dict[str, np.ndarray] = {}
    scores = evaluate(onnx_logits_fn(path, available_cpus()), task, dev, INT8_SCORING_BATCH, logits)
    together = (np.concatenate(list(d.values())) for d in (logits, float_logits))
    check = {"recipe": recipe} | agreement(*together)
    return Prepared(p.candidate, p.model, scores, p.params, p.hf_bytes, path, "int8", check)


def reference_logits(candidate: Candidate, model: torch.nn.Module, batch: Batch) -> Any:
    """What an export of ``candidate`` must reproduce on ``batch``."""
    return candidate.reference(batch) if candidate.reference is not None else model_logits(model, batch)


def check_profiles(profiles: Sequence[HardwareProfile], config: Any, what: str) -> None:
    longest = config.max_position_embeddings
    for p in profiles:
        if p.seq_len > longest:
            raise ValueError(
                f"evaluate.profiles {p.name!r}: seq_len = {p.seq_len} exceeds {what}'s "
                f"max_position_embeddings = {longest}"
            )


def prepare(
    candidates: Sequence[Candidate],
    profiles: Sequence[HardwareProfile],
    task: str,
    dev: dict[str, TokenizedSplit],
    cfg: EvaluateConfig,
    work: Path,
    onnx: bool,
    check_batch: Batch,
    int8: bool = False,
) -> list[Prepared]:
    """Build, score (dev) and save every candidate once; ONNX too when a profile runs it (checked), and
    its int8 variant (``int8``: quantised, dev-scored on its own predictions)."""
    prepared = []
    for c in tqdm(candidates, desc="build, score, export", unit="candidate", dynamic_ncols=True):
        started = time.perf_counter()
        model = c.build().eval()
        check_profiles(profiles, model.config, c.id)  # before the dev pass: a profile it cannot run
        float_logits: dict[str, np.ndarray] = {}
        scores = evaluate(hf_logits(model), task, dev, cfg.eval_batch_size, float_logits)
        where = work / c.id
        model.save_pretrained(where, safe_serialization=True)
        p = Prepared(
            c, model, scores, count_parameters(model), (where / "model.safetensors").stat().st_size, None
        )
        if onnx:
            p.onnx_path = export_onnx(model, where / "model.onnx", cfg.onnx_opset, cfg.onnx_exporter)
            check_close(
                f"ONNX export of {c.id}",
                onnx_logits(p.onnx_path, check_batch),
                reference_logits(c, model, check_batch),
            )
        prepared.append(p)
        if int8 and p.onnx_path is not None:
            prepared.append(int8_variant(p, task, dev, float_logits, cfg.int8_recipe))
            agreement = prepared[-1].int8["agreement"]  # None for regression: no labels to agree on
            agrees = "" if agreement is None else f", agrees with float32 on {agreement:.1%} of dev"
            log.info("%s int8: dev score %.4f%s", c.id, prepared[-1].scores["score"], agrees)
        log.info(
            "%s: dev score %.4f, %.2f M params (%.1f s)",
            c.id,
            scores["score"],
            p.params / 1e6,
            time.perf_counter() - started,
        )
    return prepared


def _runner(profile: HardwareProfile, p: Prepared, inputs: Any, threads: int, fresh: bool) -> Callable:
    """``profile``'s batches on ``p``, one per call in turn (``inputs``: one batch or a list); ``fresh``:
    build everything anew (what memory measures)."""
    batches = inputs if isinstance(inputs, list) else [inputs]
    if profile.runtime == "onnxruntime":
        assert p.onnx_path is not None
        session = hardware.ort_session(p.onnx_path, threads, profile.device)
        return hardware.cycling([hardware.ort_runner(session, b) for b in batches])
    model = p.model
    if fresh or profile.device != "cpu":
        model = copy.deepcopy(model).to(profile.device)
    return hardware.cycling([hardware.torch_runner(model, b, profile.device) for b in batches])


def latency_inputs(
    profile: HardwareProfile, cfg: EvaluateConfig, vocab_size: int, dev: TokenizedSplit | None
) -> list[dict[str, np.ndarray]]:
    """What every candidate is timed on: ``cfg.repeats`` dev batches, each padded to its longest input
    (``latency_inputs: dev``), or one synthetic full-length batch."""
    if cfg.latency_inputs == "dev" and dev is not None:
        return hardware.dev_batches(dev, profile.batch_size, cfg.repeats, profile.seq_len)
    return [hardware.synthetic_inputs(vocab_size, profile.batch_size, profile.seq_len)]


def measure_profile(
    profile: HardwareProfile,
    prepared: Sequence[Prepared],
    cfg: EvaluateConfig,
    vocab_size: int,
    dev: TokenizedSplit | None = None,
) -> tuple[int, list[dict[str, Any]]]:
    """(threads, one row per candidate): latency statistics on ``cfg.latency_inputs`` (``dev``: the first dev
    split) and peak memory on a synthetic full-length batch (the worst case a budget must hold)."""
    threads = hardware.resolve_threads(profile)
    inputs = latency_inputs(profile, cfg, vocab_size, dev)
    longest = hardware.synthetic_inputs(vocab_size, profile.batch_size, profile.seq_len)
    dev_lengths = [len(ids) for ids in dev.input_ids] if dev is not None else []
    sync = torch.cuda.synchronize if profile.device == "cuda" else None
    by_id = {p.row_id()["candidate"]: p for p in prepared if p.runs_on(profile)}
    with hardware.pinned_threads(threads):
        runs = {k: _runner(profile, p, inputs, threads, fresh=False) for k, p in by_id.items()}
        # One ONNX Runtime session per model, each with its own (spinning) thread pool: with several
        # threads, time each model in blocks of consecutive calls instead of strictly alternating.
        block = 1 if profile.runtime == "torch" or threads == 1 else max(1, cfg.repeats // 5)
        stats = hardware.time_interleaved(runs, cfg.warmup, cfg.repeats, sync, block=block)
        del runs
        # ONNX Runtime's CUDA allocations are invisible to torch.cuda: peak memory unknown there.
        measurable = not (profile.device == "cuda" and profile.runtime == "onnxruntime")
        memory = {
            k: hardware.peak_memory_mb(
                lambda p=p: _runner(profile, p, longest, threads, True), profile.device
            )
            if measurable
            else None
            for k, p in by_id.items()
        }
    rows = []
    for k, p in by_id.items():
        s = stats[k]
        file_bytes = p.onnx_path.stat().st_size if profile.runtime == "onnxruntime" and p.onnx_path else None
        row: dict[str, Any] = {
            **p.row_id(),
            "metric": p.scores["score"],
            "metrics": p.scores,
            "params": p.params,
            "gflops_per_seq": p.gflops(profile.seq_len),
            "gflops_per_dev_example": p.gflops_dev(dev_lengths),
            "file_mb": (file_bytes or p.hf_bytes) / 1e6,
            "memory_mb": memory[k],
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


def profile_notes(profiles: Sequence[HardwareProfile]) -> dict[str, str | None]:
    """Why each profile cannot be measured on this machine (None: it can); the skips are logged."""
    notes = {p.name: hardware.unavailable(p) for p in profiles}
    for name, note in notes.items():
        if note:
            log.warning("hardware profile %r skipped: %s", name, note)
    return notes


def measure_entries(
    profiles: Sequence[HardwareProfile],
    notes: dict[str, str | None],
    prepared: Sequence[Prepared],
    cfg: EvaluateConfig,
    vocab_size: int,
    machine: dict[str, Any],
    dev: TokenizedSplit | None = None,
) -> list[dict[str, Any]]:
    """One results entry per profile: measured here, or skipped with its note (device absent). ``dev``: the
    split whose batches latency is timed on (``cfg.latency_inputs: dev``)."""
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
            entry["threads"], entry["rows"] = measure_profile(profile, prepared, cfg, vocab_size, dev)
        entry["foreign_load_cores"] = load.cores
        log.info("profile %r measured in %.1f s", profile.name, time.perf_counter() - started)
        if load.cores is not None and load.cores > BUSY_CORES:
            log.warning(
                "other processes kept %.2f cores busy while profile %r was measured: its latencies are "
                "inflated (measure on an idle machine)",
                load.cores,
                profile.name,
            )
    return entries


def results_document(
    methods: Sequence[str],
    task: str,
    metric_name: str,
    sources: dict[str, str],
    cfg: EvaluateConfig,
    machine: dict[str, Any],
    entries: list[dict[str, Any]],
    checkpoints: dict[str, str] | None = None,
) -> dict[str, Any]:
    """``results.json``: what selection and the report read (and merge with other methods' results).

    ``checkpoints``: method -> on what its training chose the weights measured here (the report says it:
    a dev score that also chose the checkpoint is an optimistic one)."""
    return {
        "version": 2,
        "methods": list(methods),
        "task": task,
        "main_metric": metric_name,
        "sources": sources,  # method -> the output its candidates come from
        "checkpoints": checkpoints or {},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "protocol": {
            "warmup": cfg.warmup,
            "repeats": cfg.repeats,
            "budget_stat": cfg.budget_stat,
            "latency_inputs": cfg.latency_inputs,
            "latency": "inference mode, eval, interleaved rounds, "
            + (
                "the same dev batches for every candidate (profile batch size, each padded to its longest "
                "input)"
                if cfg.latency_inputs == "dev"
                else "synthetic full-length batches"
            )
            + "; float32, and on ONNX Runtime CPU profiles dynamic int8 too (each variant dev-scored on its "
            "own outputs)",
            "memory": MEMORY_METHOD,
        },
        "machine": machine,
        "profiles": entries,
    }


def flat_metrics(entries: Sequence[dict[str, Any]], metric_name: str) -> dict[str, Any]:
    """Counts, each candidate's dev metric (once) and its latency and memory per profile, as flat keys."""
    metrics: dict[str, Any] = {
        "profiles_measured": sum(e["status"] == "measured" for e in entries),
        "profiles_skipped": sum(e["status"] != "measured" for e in entries),
    }
    for entry in entries:  # the dev metric is the same for every profile: the first measured one gives it
        for r in entry["rows"]:
            metrics.setdefault(f"dev.{r['candidate']}.{metric_name}", r["metric"])
    for entry in entries:
        name = entry["profile"]["name"]
        for r in entry["rows"]:
            key = f"{name}.{r['candidate']}"
            metrics[f"{key}.latency_median_ms"] = r["latency_median_ms"]
            metrics[f"{key}.latency_p90_ms"] = r["latency_p90_ms"]
            if r["memory_mb"] is not None:
                metrics[f"{key}.memory_mb"] = r["memory_mb"]
    return metrics


def measure(
    candidates: Sequence[Candidate],
    profiles: Sequence[HardwareProfile],
    task: str,
    dev: dict[str, TokenizedSplit],
    cfg: EvaluateConfig,
    check_batch: Batch,
    work: Path,
) -> list[dict[str, Any]]:
    """Prepare every candidate and measure it on every profile: one results entry per profile."""
    if not candidates:
        raise ValueError("no candidates to measure")
    notes = profile_notes(profiles)
    measured = [p for p in profiles if notes[p.name] is None]
    onnx = any(p.runtime == "onnxruntime" for p in measured)
    int8 = cfg.int8 and any(int8_profile(p) for p in measured)
    if int8 and cfg.int8_recipe == "vnni" and has_vnni(cpu_flags()) is False:
        log.warning("this CPU has no VNNI: int8 models quantised by evaluate.int8_recipe = vnni may saturate "
                    "and lose accuracy here; evaluate.int8_recipe: avx2 is meant for such CPUs")  # fmt: skip
    prepared = prepare(candidates, profiles, task, dev, cfg, work, onnx, check_batch, int8)
    vocab_size = prepared[0].model.config.vocab_size
    first = next(iter(dev.values()))
    return measure_entries(profiles, notes, prepared, cfg, vocab_size, machine_info(), first)
