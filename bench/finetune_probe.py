"""Probe: one epoch of the depth stage's optional final label fine-tuning, applied to a saved DynaBERT.

What ``depth_kd.final_finetune_epochs=N`` adds after the distillation epochs, run on the saved (selected)
weights instead of inside the stage: the same step, data, schedule and seed, but not bit-identical to a
stage run (dropout's random stream differs). Prints the dev grid (%) and the seconds it took.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python bench/finetune_probe.py --project ../bench-run
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from dynaflow.config import load_params
from dynaflow.core.tracking import NullTracker
from dynaflow.data.splits import load_split, read_task_meta
from dynaflow.evaluation.scoring import load_dev
from dynaflow.methods.dynabert.distill import SubnetGrid
from dynaflow.methods.dynabert.grid import evaluate_grid
from dynaflow.models.backbone import load_elastic
from stages.distill import final_finetune


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--project", type=Path, required=True, help="a project whose depth_kd output exists")
    p.add_argument("--epochs", type=int, default=1)
    args = p.parse_args()
    root = args.project
    params = load_params(root / "params.yaml")
    data = root / "data" / "prepared"
    meta = read_task_meta(data)
    train = load_split(root / "data" / "augmented", "train")
    dev = load_dev(data, meta["dev_splits"])
    torch.manual_seed(params.seed)
    student = load_elastic(root / "artifacts" / "dynabert")
    grid = SubnetGrid(tuple(params.widths), tuple(params.depths))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        final_finetune(student, train, grid, meta["is_regression"], params.depth_kd, params.seed, args.epochs,
                       Path(work) / "finetune.pt", "probe", NullTracker())  # fmt: skip
    scores = evaluate_grid(student, meta["task"], dev, list(params.widths), list(params.depths))
    print(json.dumps({k: round(v["score"] * 100, 1) for k, v in scores.items()}))
    print(f"{time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
