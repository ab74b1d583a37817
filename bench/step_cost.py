"""What one distillation step costs: the full grid vs the sandwich rule, fp32 vs bf16, the teacher's share.

One step of the depth stage on the default backbone (random token ids, every token real): the teacher's
forward pass (no gradient) plus a forward and backward pass per trained sub-network, the losses of
``dynaflow.methods.dynabert.distill``. Median of ``--repeats`` timed steps after one untimed step.

    python bench/step_cost.py --batch 32 --length 32 --out bench/step_cost.json
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch
from common import run_and_report

from dynaflow.methods.dynabert.distill import DistillStep, SubnetGrid, SubnetSampler
from dynaflow.models.backbone import load_elastic, resolve
from dynaflow.training import precision

GRID = SubnetGrid((1.0, 0.75, 0.5, 0.25), (1.0, 0.75, 0.5))


def time_step(step: DistillStep, batch: dict[str, torch.Tensor], setting: str, repeats: int) -> float:
    cpu = torch.device("cpu")
    times = []
    for i in range(repeats + 1):
        started = time.perf_counter()
        with precision.autocast(setting, cpu):
            step(batch, lambda _: None)
        step.student.zero_grad(set_to_none=True)
        if i:  # the first call warms oneDNN's kernels up
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    student, teacher = load_elastic(resolve("default")), load_elastic(resolve("default"))
    ids = torch.randint(1000, 20000, (args.batch, args.length))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": 0 * ids}
    rows = []
    for rule in ("all", "sandwich"):
        sampler = SubnetSampler(GRID, rule, k=2, seed=0)
        step = DistillStep(student, teacher, sampler, lambda_logit=1, lambda_hidden=1, is_regression=False)
        for setting in ("fp32", "bf16"):
            seconds = time_step(step, batch, setting, args.repeats)
            rows.append({"subnets": rule, "precision": setting, "seconds": seconds,
                         "trained": len(sampler.draw(0))})  # fmt: skip
    with torch.no_grad():  # what a cached teacher saves: its forward pass
        for setting in ("fp32", "bf16"):
            started = time.perf_counter()
            for _ in range(args.repeats):
                with precision.autocast(setting, torch.device("cpu")):
                    teacher(**batch, output_hidden_states=True)
            seconds = (time.perf_counter() - started) / args.repeats
            rows.append({"subnets": "teacher forward only", "precision": setting, "seconds": seconds})
    return {"batch": args.batch, "length": args.length, "threads": torch.get_num_threads(), "rows": rows}


def markdown(result: dict[str, Any]) -> str:
    lines = [
        f"batch {result['batch']} x {result['length']} tokens, {result['threads']} threads",
        "",
        "| step | sub-networks trained | fp32 (s) | bf16 (s) |",
        "|---|---:|---:|---:|",
    ]
    by = {(r["subnets"], r["precision"]): r for r in result["rows"]}
    for name in ("all", "sandwich", "teacher forward only"):
        fp32, bf16 = by[(name, "fp32")], by[(name, "bf16")]
        trained = fp32.get("trained", 0)
        lines.append(f"| {name} | {trained} | {fp32['seconds']:.3f} | {bf16['seconds']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None)
    run_and_report(parser.parse_args(), run, markdown)
