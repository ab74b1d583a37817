"""Elastic serving under load (issue 17): every fixed Pareto point, the threshold policy and the SLO-aware
policy, on steady and bursty open-loop traces, server and load generator on separate cores.

    python bench/serve.py PROJECT [--duration 20] [--reference full|top] [--out bench/serve.json] \
        [--plots bench/serve]

PROJECT: a project where the default pipeline has run (``artifacts/dynabert`` holds the trained DynaBERT).

1. Actuators: the serving profile (latency model per sub-network) is measured for both runtimes, one thread
   on core 0; the full model's latency at batch 1, 8 and 32 compares them.
2. SLO = 2 x the reference model's p90 at batch 1 (longest length), on the runtime ``serve.runtime`` names.
   Capacity C = the highest Poisson rate at which the reference model alone answers >= 99% of dev-length
   requests within the SLO in the simulator (:mod:`dynaflow.serving.simulate`, the profile's latencies); also
   reported: the batch-1 rate 1 / latency. The reference is the full model (``--reference full``, issue 17's
   definition) or the most accurate point of the serving front (``top``): when a narrower sub-network is as
   accurate as the full model and faster, the full model is off the front, nobody would serve it, and loads
   and SLO measured on it are easier for every served point than they look.
3. For each policy, one ``dynaflow serve`` process pinned to core 0 takes every trace in turn (steady 0.5 C,
   1.0 C, 1.5 C; on/off bursts 0.3 C <-> 1.5 C every 10 s), from this process pinned to core 1 (open loop,
   latency from the scheduled send, SST-2 dev sentences as inputs). Scheduler overhead: the server's own
   ``dynaflow_dispatch_overhead_seconds`` (sum / count).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

TRACES = ("steady:0.5c", "steady:1.0c", "steady:1.5c", "onoff:0.3c,1.5c,10")
PORT = 8765


def measure_actuators(root: Path, runtimes: list[str]) -> dict[str, Any]:
    """Each runtime's serving profile (measured, or reused from the server's cache) and its full model."""
    from dynaflow.config import load_params
    from dynaflow.serving.build import build_engine
    from stages import Layout

    params, layout = load_params(root / "params.yaml"), Layout(root)
    out = {}
    for runtime in runtimes:
        cfg = params.serve.model_copy(update={"runtime": runtime, "threads": 1})
        engine = build_engine(layout.out("depth_kd"), layout.out("data"), cfg, root / ".dynaflow/serving")
        full = engine.profile.full
        out[runtime] = {
            "profile": engine.profile,
            "full_ms": {b: full.predict(b, 64) * 1000 for b in (1, 8, 32)},
            "full_p90_single_ms": full.p90_single_s * 1000,
            "fit_error_max": max(s.fit_error for s in engine.profile.subnets),
        }
    return out


def dev_lengths(root: Path) -> np.ndarray:
    from dynaflow.data.splits import load_split
    from stages import Layout

    return np.array([len(x) for x in load_split(Layout(root).out("data"), "dev").input_ids])


def simulated_capacity(
    profile: Any, slo: float, lengths: np.ndarray, reference: Any, seconds: float = 120
) -> float:
    """Highest rate (req/s) at which the ``reference`` sub-network alone keeps >= 99% within the SLO in the
    simulator (bisection)."""
    from dynaflow.serving.outcomes import summarize
    from dynaflow.serving.policy import make_policy
    from dynaflow.serving.scheduler import Scheduler
    from dynaflow.serving.simulate import simulate
    from dynaflow.serving.traces import Segment, arrivals

    def attainment(rate: float) -> float:
        times = arrivals([Segment(0, seconds, rate)], seed=0)
        lens = np.random.default_rng(0).choice(lengths, len(times))
        sched = Scheduler(make_policy(f"fixed:{reference.name}", profile, slo, 32), profile, slo)
        outcomes = simulate(sched, times, lens, lambda s, b, n: profile.get(s).predict(b, n))
        return summarize(outcomes, slo, seconds)["attainment"]

    low, high = 1.0, 4 / reference.predict(1, 16)
    for _ in range(20):
        mid = (low + high) / 2
        low, high = (mid, high) if attainment(mid) >= 0.99 else (low, mid)
    return low


def start_server(root: Path, policy: str, slo_ms: float, runtime: str) -> subprocess.Popen:
    cmd = ["taskset", "-c", "0", sys.executable, "-m", "dynaflow.cli", "serve", "--params",
           str(root / "params.yaml"), "--policy", policy, "--slo-ms", f"{slo_ms:.3f}", "--runtime", runtime,
           "--threads", "1", "--port", str(PORT)]  # fmt: skip
    log = root / ".dynaflow" / "serving" / "bench-server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=root, stdout=out, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited:\n{log.read_text()}")
        try:
            httpx.get(f"http://127.0.0.1:{PORT}/healthz", timeout=1)
            return proc
        except httpx.HTTPError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server did not start within 300 s")


def slug(text: str) -> str:
    return text.replace(":", "_").replace(",", "_").replace(".", "")


def overhead_ms(metrics_text: str) -> float | None:
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(metrics_text):
        if family.name == "dynaflow_dispatch_overhead_seconds":
            values = {s.name: s.value for s in family.samples}
            count = values.get("dynaflow_dispatch_overhead_seconds_count", 0)
            return values["dynaflow_dispatch_overhead_seconds_sum"] / count * 1000 if count else None
    return None


def markdown(result: dict[str, Any]) -> str:
    """The tables BENCHMARKS.md shows: actuators, then one table of policies per trace."""
    lines = [
        "| runtime | full model, batch 1 | batch 8 | batch 32 (ms, 64 tokens) | p90 of one | worst fit |",
        "|---|---|---|---|---|---|",
    ]
    for runtime, a in result["actuators"].items():
        ms = a["full_ms"]
        cells = [f"{ms[b]:.2f}" for b in ("1", "8", "32")]
        cells += [f"{a['full_p90_single_ms']:.2f}", f"{a['fit_error_max']:.0%}"]
        lines.append(f"| {runtime} | " + " | ".join(cells) + " |")
    top = result["front"][0]  # the most accurate point served
    header = (
        "| policy | attainment | effective accuracy | served accuracy | p50 / p99 ms | goodput req/s "
        "| top point's share | outside server p50 ms |"
    )
    for trace in TRACES:
        title = (
            f"**{trace}** (C = {result['capacity_rps']:.0f} req/s, SLO {result['slo_ms']:.1f} ms, "
            f"both from {result.get('reference', 'the full model')})"
        )
        lines += ["", title, "", header, "|---|---|---|---|---|---|---|---|"]
        for r in (r for r in result["rows"] if r["trace"] == trace):
            cells = [
                r["policy"],
                f"{r['attainment']:.3f}",
                f"{r['effective_accuracy']:.3f}",
                f"{r['served_accuracy']:.3f}",
                f"{r['p50_ms']:.1f} / {r['p99_ms']:.1f}",
                f"{r['goodput_rps']:.0f}",
                f"{r['mix'].get(top, 0.0):.2f}",
                f"{r['outside_server_p50_ms']:.1f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    overheads = [r["overhead_ms"] for r in result["rows"] if r.get("overhead_ms") is not None]
    if overheads:
        low, high = min(overheads) * 1000, max(overheads) * 1000
        lines += ["", f"Scheduler time per dispatch (mean over each server's run): {low:.0f}–{high:.0f} µs."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("project", type=Path)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of arrivals per trace")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--reference", choices=("full", "top"), default="full",
        help="the model SLO and capacity are measured on: the full one, or the front's most accurate",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=Path("bench/serve.json"))
    parser.add_argument("--plots", type=Path, default=Path("bench/serve"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = args.project.resolve()
    os.sched_setaffinity(0, {0})  # profiles are measured where the server will run

    from dynaflow.config import load_params
    from dynaflow.core.artifacts import atomic_write_json
    from dynaflow.serving.loadgen import dev_examples, run_load
    from dynaflow.serving.outcomes import summarize
    from dynaflow.serving.plots import attainment_plot, timeline_plot
    from dynaflow.serving.traces import arrivals, parse_trace

    params = load_params(root / "params.yaml")
    actuators = measure_actuators(root, ["onnxruntime", "torch"])
    runtime = params.serve.runtime
    profile = actuators[runtime]["profile"]
    points = profile.front()
    reference = profile.full if args.reference == "full" else points[0]
    slo = 2 * reference.p90_single_s
    capacity = simulated_capacity(profile, slo, dev_lengths(root), reference)
    front = [s.name for s in points]
    print(f"runtime {runtime}; reference {reference.name}; SLO {slo * 1000:.2f} ms; capacity {capacity:.1f} "
          f"req/s (batch-1 rate {1 / reference.predict(1, 64):.1f}); front {front}", flush=True)  # fmt: skip

    os.sched_setaffinity(0, {1})  # the load generator, away from the server's core
    examples = dev_examples(params.data.task, params.data.glue_dir)
    policies = ["slo", "threshold", *[f"fixed:{name}" for name in front]]
    rows: list[dict[str, Any]] = []
    for policy in policies:
        server = start_server(root, policy, slo * 1000, runtime)
        try:
            for n, trace in enumerate(TRACES):
                times = arrivals(parse_trace(trace, args.duration, capacity), args.seed + n)
                outcomes = run_load(f"http://127.0.0.1:{PORT}/predict", times, examples)
                summary = summarize(outcomes, slo, args.duration)
                if policy in ("slo", "fixed:" + front[0]):  # the elastic server beside the full model
                    name = f"serve_timeline_{slug(policy)}_{slug(trace)}.png"
                    timeline_plot(outcomes, slo, f"{policy} under {trace}", args.plots / name)
                rows.append({"policy": policy, "trace": trace, **summary})
                shown = {k: summary[k] for k in ("attainment", "effective_accuracy", "p99_ms")}
                print(f"{policy:>22} {trace:>20}: {shown}", flush=True)
                time.sleep(2)  # drain
            rows[-1]["overhead_ms"] = overhead_ms(httpx.get(f"http://127.0.0.1:{PORT}/metrics").text)
        finally:
            server.terminate()
            server.wait(30)
    for trace in TRACES:
        title = f"{trace} (C = {capacity:.0f} req/s, SLO {slo * 1000:.1f} ms, from {reference.name})"
        rows_of = [r for r in rows if r["trace"] == trace]
        attainment_plot(rows_of, title, args.plots / f"serve_attainment_{slug(trace)}.png")
    result = {
        "command": " ".join(sys.argv),
        "machine": profile.machine,
        "runtime": runtime,
        "slo_ms": slo * 1000,
        "reference": reference.name,
        "capacity_rps": capacity,
        "batch1_rps": 1 / reference.predict(1, 64),
        "front": front,
        "actuators": {k: {kk: vv for kk, vv in v.items() if kk != "profile"} for k, v in actuators.items()},
        "profile": profile.to_json(),
        "rows": rows,
    }
    atomic_write_json(args.out, result)
    print(markdown(json.loads(json.dumps(result))))  # as read back: the JSON's keys are strings
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
