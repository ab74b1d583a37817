"""ONNX Runtime against PyTorch eager on CPU: the full model and the smallest sub-network.

Both runtimes run the same extracted sub-network (the ONNX file is checked against PyTorch's logits, 1e-4)
on the same synthetic batch with the same number of intra-op threads; their calls are interleaved in the
same timed rounds (:func:`dynaflow.evaluation.hardware.time_interleaved`), so machine-load drifts hit
both alike.

Example::

    python bench/ort_vs_torch.py --model artifacts/dynabert --threads 1 all --out bench/ort_vs_torch.json
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from common import run_and_report

from dynaflow.config import HardwareProfile
from dynaflow.evaluation import hardware
from dynaflow.evaluation.export import check_close, export_onnx, onnx_logits
from dynaflow.models.backbone import load_elastic
from dynaflow.models.extract import count_parameters, extract_subnetwork


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="elastic (or plain HF BERT) classifier directory")
    p.add_argument("--threads", nargs="+", default=["1", "all"], help="thread counts: integers or 'all'")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--smallest", nargs=2, type=float, default=(0.25, 0.5), metavar=("WIDTH", "DEPTH"))
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--repeats", type=int, default=300)
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, Any]:
    model = load_elastic(args.model).eval()
    points = {"full (1.0, 1.0)": (1.0, 1.0), f"smallest {tuple(args.smallest)}": tuple(args.smallest)}
    inputs = hardware.synthetic_inputs(model.config.vocab_size, args.batch_size, args.seq_len)
    feed = {k: torch.from_numpy(v) for k, v in inputs.items()}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        subs, files = {}, {}
        for name, (w, d) in points.items():
            subs[name] = extract_subnetwork(model, w, d).eval()
            files[name] = export_onnx(subs[name], Path(tmp) / f"{w}_{d}.onnx")
            with torch.inference_mode():
                check_close(name, onnx_logits(files[name], feed), subs[name](**feed).logits.numpy())
        for spec in args.threads:
            threads = hardware.resolve_threads(
                HardwareProfile(name="x", threads=spec if spec == "all" else int(spec))
            )
            with hardware.pinned_threads(threads):
                runs = {}
                for name in points:
                    runs[(name, "torch")] = hardware.torch_runner(subs[name], inputs)
                    session = hardware.ort_session(files[name], threads)
                    runs[(name, "onnxruntime")] = hardware.ort_runner(session, inputs)
                # Each runtime's idle thread pool spins for a while after a call: with several threads,
                # alternate blocks of consecutive calls rather than single calls.
                block = 1 if threads == 1 else max(1, args.repeats // 10)
                stats = hardware.time_interleaved(runs, args.warmup, args.repeats, block=block)
            for name, (w, d) in points.items():
                t, o = stats[(name, "torch")], stats[(name, "onnxruntime")]
                rows.append({
                    "sub_network": name, "width": w, "depth": d, "params": count_parameters(subs[name]),
                    "threads": threads, "torch": t.as_dict(), "onnxruntime": o.as_dict(),
                    "speedup_median": t.median_ms / o.median_ms,
                })  # fmt: skip
    return {
        "model": str(args.model),
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "machine": hardware.machine_info(),
        "protocol": {"warmup": args.warmup, "repeats": args.repeats, "interleaved": True},
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [
        f"CPU: {m['cpu']}, {m['cpus']} CPUs; torch {m['torch']}, onnxruntime {m['onnxruntime']}; batch "
        f"{result['batch_size']} x {result['seq_len']} tokens; {result['protocol']['repeats']} interleaved "
        "timed calls per runtime after warm-up.",
        "",
        "| sub-network | params (M) | threads | PyTorch eager median / p90 (ms) "
        "| ONNX Runtime median / p90 (ms) | ORT speed-up (median) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        t, o = r["torch"], r["onnxruntime"]
        lines.append(
            f"| {r['sub_network']} | {r['params'] / 1e6:.1f} | {r['threads']} "
            f"| {t['median_ms']:.2f} / {t['p90_ms']:.2f} | {o['median_ms']:.2f} / {o['p90_ms']:.2f} "
            f"| {r['speedup_median']:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    run_and_report(parse_args(argv), run, markdown)


if __name__ == "__main__":
    main()
