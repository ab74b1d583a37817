"""Theseus evaluation stage: the Theseus successor on every hardware profile, as DynaBERT's grid is measured.

Same protocol as the ``evaluate`` stage (dev metric once, then per profile present on this machine latency
median and p90, peak memory, with the profile's runtime, threads, batch and sequence length; absent devices
skipped with a note), on one point: the exported successor, a plain BERT with ``L / r`` layers. Its row
carries ``method: theseus`` and ``depth = successor layers / teacher layers`` so that ``dynaflow report``
can put it beside the DynaBERT sub-networks of equal depth. Nothing is selected or exported here: the
successor already is a standard Hugging Face model (``artifacts/theseus``).

Outputs (``out_dir``): ``results.json`` and a ``report.md`` of this one point; MLflow metrics.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import BertForSequenceClassification

from dynaflow import hardware
from dynaflow.artifacts import atomic_write_json
from dynaflow.config import EvaluateConfig
from dynaflow.data import read_task_meta
from dynaflow.evaluate import evaluate, hf_logits, load_dev
from dynaflow.export import check_close, export_onnx, onnx_logits, reference_batch
from dynaflow.extract import count_parameters
from dynaflow.report import RESULTS_FILE, write_report
from dynaflow.tracking import NullTracker
from stages.evaluate import (
    GridPoint,
    check_profiles,
    flat_metrics,
    log_results,
    measure_entries,
    profile_notes,
    results_document,
)

OUT = "artifacts/theseus-evaluation"  # the stage's output (stages.STAGES["theseus_eval"].out)


def successor_point(model_dir: Path, task: str, dev: dict[str, Any], cfg: EvaluateConfig) -> GridPoint:
    """The successor as one measured point, dev-scored; depth relative to the teacher it was cut from."""
    model = BertForSequenceClassification.from_pretrained(model_dir).eval()
    info = json.loads((Path(model_dir) / "metrics.json").read_text())
    layers = model.config.num_hidden_layers
    return GridPoint(
        width=1.0, depth=layers / info["predecessor_layers"], model=model,
        scores=evaluate(hf_logits(model), task, dev, cfg.eval_batch_size), params=count_parameters(model),
        layers=layers, heads=model.config.num_attention_heads, intermediate=model.config.intermediate_size,
        hf_bytes=(Path(model_dir) / "model.safetensors").stat().st_size, onnx_path=None, method="theseus",
        flops_grid=(1.0, 1.0),  # FLOPs of the successor's own config, all of it
    )  # fmt: skip


def run(
    cfg: EvaluateConfig, model_dir: Path, data_dir: Path, out_dir: Path, tracker: NullTracker
) -> dict[str, Any]:
    out_dir = Path(out_dir)
    meta = read_task_meta(data_dir)
    task, metric_name = meta["task"], meta["main_metric"]
    point = successor_point(model_dir, task, load_dev(data_dir, meta["dev_splits"]), cfg)
    profiles = list(cfg.profiles)
    check_profiles(profiles, point.model)
    notes = profile_notes(profiles)
    machine = hardware.machine_info()
    with tempfile.TemporaryDirectory(prefix="dynaflow-theseus-eval-") as work:
        if any(p.runtime == "onnxruntime" and notes[p.name] is None for p in profiles):
            point.onnx_path = export_onnx(point.model, Path(work) / "model.onnx", cfg.onnx_opset,
                                          cfg.onnx_exporter)  # fmt: skip
            batch = reference_batch(data_dir, point.model.config.vocab_size)
            with torch.inference_mode():
                want = point.model(**batch).logits.numpy()
            check_close("ONNX export of the Theseus successor", onnx_logits(point.onnx_path, batch), want)
        entries = measure_entries(profiles, notes, [point], cfg, point.model.config, machine)
    results = results_document("theseus", task, metric_name, model_dir, cfg, machine, entries)
    atomic_write_json(out_dir / RESULTS_FILE, results)
    report = write_report(results, out_dir)
    metrics = flat_metrics(entries, metric_name)
    metrics |= {"layers": point.layers, "depth": point.depth, "params": point.params}
    log_results(tracker, metrics, out_dir, report)
    return metrics
