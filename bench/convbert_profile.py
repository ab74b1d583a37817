"""Where a ConvBERT student's time goes on `cpu1` (ONNX Runtime, one thread, one 64-token sequence).

    HF_HUB_OFFLINE=1 python bench/convbert_profile.py --project PROJECT --out bench/convbert_profile.json

Exports the teacher-shaped DynaBERT sub-network (w1.0_d1.0) and each ConvBERT student of
``bench/convbert.py`` to ONNX, float32 and dynamic int8, runs each under ONNX Runtime's profiler (one thread,
100 calls after 10 warm-up ones) and sums the time per operator type: which part of ConvBERT's cost does not
shrink. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
from common import project_parser, run_and_report

CALLS, WARMUP, SEQ = 100, 10, 64


def op_times(onnx_path: Path, feed: dict[str, np.ndarray]) -> dict[str, Any]:
    """Mean milliseconds per call, in total and per operator type, over ``CALLS`` profiled calls."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    for _ in range(2):  # the first session warms the caches; only the second one is profiled
        options.enable_profiling = _ == 1
        options.profile_file_prefix = str(onnx_path.with_suffix(""))  # in the temporary directory
        session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
        for _ in range(WARMUP):
            session.run(None, feed)
    for _ in range(CALLS):
        session.run(None, feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = defaultdict(float)
    total = 0.0
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            per_op[e["args"]["op_name"]] += e["dur"] / 1e3 / CALLS
        elif e.get("cat") == "Session" and e["name"] == "model_run":
            total += e["dur"] / 1e3
    runs = sum(1 for e in events if e.get("name") == "model_run")
    ranked = dict(sorted(per_op.items(), key=lambda kv: -kv[1]))
    return {"ms_per_call": total / max(runs, 1), "ops_ms": ranked}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dynaflow.evaluation.export import export_onnx, quantize_int8
    from dynaflow.methods.convbert.candidates import student
    from dynaflow.methods.dynabert import candidates as dynabert
    from dynaflow.models.backbone import load_elastic

    root = args.project.resolve()
    elastic = load_elastic(root / "artifacts" / "dynabert").eval()
    models = {"dynabert/w1.0_d1.0": dynabert.grid(elastic, [1.0], [1.0])[0].build()}
    for d in sorted((root / "artifacts" / "convbert-bench").glob("g*")):
        models[f"convbert/{d.name}"] = student(d).build()
    ids = np.random.default_rng(0).integers(1000, 2000, (1, SEQ))
    feed = {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="convbert-profile-") as tmp:
        for name, model in models.items():
            path = export_onnx(model, Path(tmp) / f"{name.replace('/', '_')}.onnx")
            int8 = quantize_int8(path, path.with_suffix(".int8.onnx"))
            out[name] = {"float32": op_times(path, feed), "int8": op_times(int8, feed)}
    return {"project": str(root), "calls": CALLS, "seq_len": SEQ, "models": out}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| model | precision | ms/call | top operator types (ms per call) |", "|---|---|---:|---|"]
    for name, by_precision in result["models"].items():
        for precision, r in by_precision.items():
            top = ", ".join(f"{op} {ms:.2f}" for op, ms in list(r["ops_ms"].items())[:6])
            lines.append(f"| {name} | {precision} | {r['ms_per_call']:.2f} | {top} |")
    return "\n".join(lines)


def main() -> None:
    args = project_parser(__doc__).parse_args()
    run_and_report(args, run, markdown)


if __name__ == "__main__":
    main()
