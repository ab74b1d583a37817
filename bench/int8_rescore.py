"""Every candidate of a trained project scored as float32 and as dynamic int8 (ONNX Runtime), one dev
sentence at a time, as the harness scores int8 variants (issue 18): accuracy and agreement, no timing.

    HF_HUB_OFFLINE=1 python bench/int8_rescore.py --project PROJECT --out int8_rescore.json
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from common import project_parser, run_and_report


def run(args: argparse.Namespace) -> dict[str, Any]:
    from dynaflow.config import load_params
    from dynaflow.data.splits import load_split, read_task_meta
    from dynaflow.evaluation.export import agreement, export_onnx, onnx_logits_fn, quantize_int8
    from dynaflow.evaluation.scoring import predict
    from stages import STAGES, Layout
    from stages.registry import measurement_stages

    logging.disable(logging.WARNING)
    params, layout = load_params(args.project / "params.yaml"), Layout(args.project)
    data = layout.out("data")
    dev = load_split(data, read_task_meta(data)["dev_splits"][0])
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in measurement_stages():
            try:
                found = STAGES[stage].candidates(params, layout)  # type: ignore[misc]
            except (FileNotFoundError, OSError):
                continue  # that method was not trained here
            for c in found:
                f = export_onnx(c.build(), Path(tmp) / c.id / "model.onnx")
                q = quantize_int8(f, Path(tmp) / c.id / "model.int8.onnx")
                lf, lq = (predict(onnx_logits_fn(p, 1), dev, 1) for p in (f, q))
                rows[c.id] = {"float32": float(np.mean(lf.argmax(1) == dev.labels))}
                rows[c.id] |= {"int8": float(np.mean(lq.argmax(1) == dev.labels))} | agreement(lq, lf)
    return {"project": str(args.project), "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| candidate | float32 | int8 | Δ | agreement |", "|---|---:|---:|---:|---:|"]
    for name, r in result["rows"].items():
        lines.append(f"| {name} | {r['float32']:.4f} | {r['int8']:.4f} | {r['int8'] - r['float32']:+.4f} | "
                     f"{r['agreement']:.1%} |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    run_and_report(project_parser(__doc__).parse_args(), run, markdown)


if __name__ == "__main__":
    main()
