"""``dynaflow serve`` and ``dynaflow loadtest``: the elastic server and its open-loop load generator.

* ``serve``: the trained DynaBERT (``artifacts/dynabert``, or ``--model DIR``) behind ``POST /predict``; its
  sub-network is picked per batch by ``serve.policy`` (params.yaml; flags override).
* ``loadtest --trace SPEC``: seeded open-loop arrivals against a running server; writes outcomes, a summary
  and a timeline plot to ``--out`` and records an MLflow run.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dynaflow.cli.env import project_env
from dynaflow.config import load_params

log = logging.getLogger(__name__)

SERVE_FLAGS = ("policy", "slo_ms", "runtime", "threads", "host", "port", "max_batch", "late", "replicas")


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from dynaflow.serving.app import create_app
    from dynaflow.serving.build import build_engine
    from stages import Layout

    overrides = [f"serve.{k}={getattr(args, k)}" for k in SERVE_FLAGS if getattr(args, k) is not None]
    params = load_params(args.params, [*args.set, *overrides])
    root = Path(args.params).resolve().parent
    project_env(root)
    layout = Layout(root)
    model_dir = Path(args.model) if args.model else layout.out("depth_kd")
    cfg, cache = params.serve, root / ".dynaflow" / "serving"
    if cfg.replicas > 1:
        from dynaflow.serving.replicas import ray_serve

        ray_serve()  # not installed: say so now, not after a minute of profiling
    # Built here even with replicas: the serving profile is measured once, before any replica starts.
    engine = build_engine(model_dir, layout.out("data"), cfg, cache)
    front = ", ".join(f"{s.name} ({s.score:.3f})" for s in engine.profile.front())
    slo_ms = engine.settings.slo * 1000
    where = f"{cfg.replicas} Ray Serve replicas" if cfg.replicas > 1 else "one process"
    print(f"serving {model_dir} on http://{cfg.host}:{cfg.port} ({where}, {cfg.runtime}, {cfg.threads} "
          f"thread(s) each); policy {engine.policy.name}, SLO {slo_ms:.1f} ms; front: {front}",
          flush=True)  # fmt: skip
    if cfg.replicas == 1:
        uvicorn.run(create_app(engine), host=cfg.host, port=cfg.port, log_level="warning")
        return 0
    from functools import partial

    from dynaflow.evaluation.machine import available_cpus
    from dynaflow.serving.build import build_app
    from dynaflow.serving.replicas import replicated, run_replicated

    del engine
    app = replicated(partial(build_app, model_dir, layout.out("data"), cfg, cache), cfg.replicas, cfg.threads,
                     cfg.max_queue)  # fmt: skip
    run_replicated(app, cfg.host, cfg.port, cpus=max(available_cpus(), cfg.replicas * cfg.threads))
    return 0


def _server_info(url: str) -> dict[str, Any]:
    import httpx

    from dynaflow.core.errors import DynaflowError
    from dynaflow.serving.loadgen import health_url

    health = health_url(url)
    try:
        return httpx.get(health, timeout=10).json()
    except (httpx.HTTPError, ValueError) as exc:
        raise DynaflowError(
            f"no dynaflow server answers at {health} ({exc}); start one with `dynaflow serve`"
        ) from None


def cmd_loadtest(args: argparse.Namespace) -> int:
    from dynaflow.core.artifacts import atomic_write_json
    from dynaflow.core.errors import DynaflowError
    from dynaflow.core.tracking import NullTracker, start_run
    from dynaflow.serving.loadgen import dev_examples, run_load
    from dynaflow.serving.outcomes import summarize
    from dynaflow.serving.plots import timeline_plot
    from dynaflow.serving.traces import arrivals, parse_trace

    params = load_params(args.params, args.set)
    root = Path(args.params).resolve().parent
    project_env(root)
    if args.duration <= 0:
        raise DynaflowError(f"--duration must be > 0 seconds, got {args.duration:g}")
    info = _server_info(args.url)
    slo = (args.slo_ms or info["slo_ms"]) / 1000
    try:
        segments = parse_trace(args.trace, args.duration, info.get("capacity_rps"))
    except ValueError as exc:
        raise DynaflowError(f"--trace: {exc}") from None
    times = arrivals(segments, args.seed)
    examples = dev_examples(params.data.task, params.data.glue_dir)
    print(f"{len(times)} requests over {args.duration:g} s ({args.trace}) to {args.url}, "
          f"policy {info['policy']}, SLO {slo * 1000:.1f} ms", file=sys.stderr, flush=True)  # fmt: skip
    outcomes = run_load(args.url, times, examples)
    run_info = {"trace": args.trace, "policy": info["policy"], "slo_ms": slo * 1000, "seed": args.seed}
    summary = summarize(outcomes, slo, args.duration) | run_info
    out = Path(args.out)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_json(out / "outcomes.json", [o.__dict__ for o in outcomes])
    timeline_plot(outcomes, slo, f"{info['policy']} under {args.trace}", out / "timeline.png")
    tracker = NullTracker() if args.no_track else start_run(root, f"loadtest {info['policy']} {args.trace}",
                                                             {"kind": "loadtest"})  # fmt: skip
    tracker.log_params({"trace": args.trace, "policy": info["policy"], "slo_ms": slo * 1000,
                        "duration_s": args.duration, "seed": args.seed})  # fmt: skip
    tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float) and v is not None})
    tracker.log_artifacts(out)
    tracker.end()
    keys = ("attainment", "effective_accuracy", "served_accuracy", "p50_ms", "p99_ms", "goodput_rps", "shed",
            "rejected", "error", "mix")  # fmt: skip
    shown = {k: summary[k] for k in keys}
    print(json.dumps(shown, indent=2))
    print(f"wrote {out}/summary.json, outcomes.json, timeline.png", file=sys.stderr)
    return 0


def add_commands(sub: Any, common: Callable[..., None]) -> None:
    p = sub.add_parser(
        "serve", help="serve the trained DynaBERT, its sub-network picked per batch under load"
    )
    common(p)
    p.add_argument("--model", help="a DynaBERT folder with grid.json (default: the depth_kd stage's output)")
    p.add_argument("--policy", help="slo | threshold | fixed:<sub-network> | fixed:full (= serve.policy)")
    p.add_argument("--slo-ms", dest="slo_ms", type=float, help="latency target in ms (= serve.slo_ms)")
    p.add_argument("--runtime", choices=("torch", "onnxruntime"), help="(= serve.runtime)")
    p.add_argument("--threads", type=int, help="inference threads (= serve.threads)")
    p.add_argument("--host", help="address to bind (= serve.host; default 127.0.0.1)")
    p.add_argument("--port", type=int, help="(= serve.port)")
    p.add_argument("--max-batch", dest="max_batch", type=int, help="(= serve.max_batch)")
    p.add_argument("--late", choices=("fastest", "shed"), help="requests past their deadline (= serve.late)")
    p.add_argument("--replicas", type=int, help="N > 1: N replicas on Ray Serve (= serve.replicas)")
    p.set_defaults(func=cmd_serve)

    from dynaflow.serving.traces import TRACE_HELP

    p = sub.add_parser("loadtest", help="open-loop load test of a running `dynaflow serve`")
    common(p)
    p.add_argument("--url", default="http://127.0.0.1:8000/predict")
    p.add_argument("--trace", default="steady:0.5c", help=f"{TRACE_HELP}; capacity from the server")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of arrivals")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo-ms", dest="slo_ms", type=float, help="default: the server's SLO")
    p.add_argument(
        "--out", default="artifacts/loadtest", help="folder for summary.json, outcomes.json, plots"
    )
    p.add_argument("--no-track", action="store_true", help="no MLflow run")
    p.set_defaults(func=cmd_loadtest)
