"""Dynamic int8 quantisation settings against float32 on ONNX Runtime, one thread, batch 1 (issue 18).

    HF_HUB_OFFLINE=1 python bench/int8_levers.py --project PROJECT --out bench/int8_levers.json

For DynaBERT grid points of a trained project (default: the full model and w0.25_d0.75), export ONNX and
quantise it with `onnxruntime.quantization.quantize_dynamic` in several settings (the harness's default,
reduce_range, per-channel + reduce_range), then measure each on all of dev (accuracy) and time 100
interleaved calls of one 64-token sequence on one thread. Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from common import project_parser, run_and_report

SETTINGS = {"int8": {}, "int8_reduce_range": {"reduce_range": True},
            "int8_per_channel_reduce_range": {"reduce_range": True, "per_channel": True}}  # fmt: skip


def run(args: argparse.Namespace) -> dict[str, Any]:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from dynaflow.data.splits import load_split, read_task_meta
    from dynaflow.evaluation.export import export_onnx, onnx_logits_fn
    from dynaflow.evaluation.hardware import ort_runner, ort_session, synthetic_inputs
    from dynaflow.evaluation.machine import machine_info
    from dynaflow.evaluation.scoring import predict
    from dynaflow.methods.dynabert.candidates import subnetwork
    from dynaflow.models.backbone import load_elastic

    logging.disable(logging.WARNING)  # quantize_dynamic's per-call advice
    model = load_elastic(args.project / "artifacts" / "dynabert").eval()
    data = args.project / "data" / "prepared"
    dev = load_split(data, read_task_meta(data)["dev_splits"][0])
    result: dict[str, Any] = {"machine": machine_info(), "calls": args.calls, "points": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for point in args.points:
            width, depth = (float(x) for x in point.split(","))
            c = subnetwork(model, width, depth)
            files = {"float32": export_onnx(c.build(), Path(tmp) / f"{c.name}.onnx")}
            for tag, options in SETTINGS.items():
                files[tag] = Path(tmp) / f"{c.name}.{tag}.onnx"
                quantize_dynamic(
                    str(files["float32"]), str(files[tag]), weight_type=QuantType.QInt8, **options
                )
            inputs = synthetic_inputs(model.config.vocab_size, 1, 64)
            runs = {t: ort_runner(ort_session(p, 1), inputs) for t, p in files.items()}
            for r in runs.values():
                for _ in range(10):
                    r()
            times: dict[str, list[float]] = {t: [] for t in files}
            for _ in range(args.calls):
                for t, r in runs.items():
                    start = time.perf_counter()
                    r()
                    times[t].append(time.perf_counter() - start)
            rows = {}
            for t, p in files.items():
                acc = float(np.mean(predict(onnx_logits_fn(p, 2), dev, 1).argmax(1) == dev.labels))  # batch 1
                median, p90 = float(np.median(times[t])), float(np.percentile(times[t], 90))
                speedup = float(np.median(times["float32"])) / median
                rows[t] = {"acc": acc, "median_ms": 1e3 * median, "p90_ms": 1e3 * p90, "speedup": speedup}
            result["points"][c.name] = rows
    return result


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "| point | setting | dev acc | median (ms) | p90 (ms) | speed-up |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for name, rows in result["points"].items():
        for t, r in rows.items():
            lines.append(f"| {name} | {t} | {r['acc']:.4f} | {r['median_ms']:.2f} | {r['p90_ms']:.2f} | "
                         f"{r['speedup']:.2f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = project_parser(__doc__)
    parser.add_argument("--points", nargs="+", default=["1.0,1.0", "0.25,0.75"], help="width,depth")
    parser.add_argument("--calls", type=int, default=100)
    run_and_report(parser.parse_args(), run, markdown)


if __name__ == "__main__":
    main()
