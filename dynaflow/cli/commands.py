"""``dynaflow`` command line: run the pipeline, run one stage (what DVC calls), show what is up to date."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Iterable
from contextlib import nullcontext
from pathlib import Path

from dynaflow.cli.env import prepare_project, project_env
from dynaflow.config import ConfigError, Params, load_params
from dynaflow.core.errors import DynaflowError, Interrupted
from dynaflow.core.lock import project_lock
from dynaflow.models.backbone import check_backbone

DEBUG_ENV = "DYNAFLOW_DEBUG"
# The DynaBERT flow's stages, for --help (importing the registry would cost seconds); a test keeps it true.
DYNABERT_STAGES = ("data", "teacher", "rewire", "augment", "width_kd", "depth_kd", "evaluate", "select")

EPILOG = """examples:
  dynaflow run                              # the whole pipeline through Prefect, cached per stage
  dynaflow run --set teacher.epochs=3       # override any params.yaml key for this run
  dynaflow run --flow theseus               # BERT-of-Theseus: data, teacher, a successor of L/r layers
  dynaflow run --flow convbert              # ConvBERT students cut from the rewired teacher, distilled
  dynaflow run --flow gates                 # token gates (one per gates.lambdas) and PoWER-BERT, measured
  dynaflow run --flow gates_dynabert        # token gates on DynaBERT sub-networks (width x depth x length)
  dynaflow run --flow adabert               # AdaBERT: architecture search, its student, a random control
  dynaflow run --flow compare               # every method, every candidate on one front per profile
  dynaflow stage teacher                    # one stage, no Prefect (this is what `dvc repro` calls)
  dynaflow stage teacher --nproc 4          # data-parallel: 4 processes under torchrun (DDP, gloo/NCCL)
  dynaflow status                           # which stage outputs are up to date
  dynaflow export --width 0.5 --depth 0.5 --onnx   # any sub-network by hand -> exports/w0.5_d0.5/
  dynaflow report                           # rebuild the evaluation report from stored results
  dynaflow evaluate --profile gpu           # one hardware profile, on the machine that has it
  dynaflow controls --budget passes         # DynaBERT cells distilled alone (same-size controls)
  dynaflow dvc-yaml --check                 # is dvc.yaml in step with the stage registry?
  dynaflow serve                            # elastic server: sub-network picked per batch for the SLO
  dynaflow loadtest --trace onoff:0.3c,1.5c,10   # open-loop load test of a running server
"""


def _launch_overrides(args: argparse.Namespace) -> None:
    """``--nproc N``, ``--node-rank K``: shorthands for ``--set launch.nproc_per_node=N``, ``node_rank=K``."""
    if args.nproc is not None:
        args.set = [*args.set, f"launch.nproc_per_node={args.nproc}"]
    if args.node_rank is not None:
        args.set = [*args.set, f"launch.node_rank={args.node_rank}"]


def relaunch_command(args: argparse.Namespace, launch: object) -> list[str]:
    """``dynaflow stage ...`` again, as every process of a torchrun launch runs it."""
    from dynaflow.core.distributed import launch_command

    cli_args = ["-v"] if args.verbose else []
    cli_args += ["stage", args.name, "--params", str(Path(args.params).resolve())]
    cli_args += [f"--set={s}" for s in args.set]
    cli_args += ["--no-track"] if args.no_track else []
    cli_args += ["--run-id", args.run_id] if args.run_id else []
    return launch_command(launch, cli_args)


def stages_of(flow: str) -> list[str]:
    """The flow's stages; an unknown flow is a usage error naming the registered ones."""
    from stages import flow_stages

    try:
        return flow_stages(flow)
    except ValueError as exc:
        raise ConfigError(f"--flow {flow!r}: {exc}") from None


def cmd_run(args: argparse.Namespace) -> int:
    _launch_overrides(args)
    root = Path(args.params).resolve().parent
    # Fail on bad params before paying for Prefect's start-up.
    params = load_params(args.params, args.set)
    names = stages_of(args.flow)
    if args.until is not None and args.until not in names:
        raise ConfigError(
            f"--until {args.until!r}: not a stage of flow {args.flow!r}; stages: {', '.join(names)}"
        )
    if "theseus" in names:
        from dynaflow.methods.theseus.model import check_backbone as check_theseus_backbone

        check_theseus_backbone(params)
    check_backbone(params)
    project_env(root)
    names = names if args.until is None else names[: names.index(args.until) + 1]
    prepare_project(root, names, not args.no_track, prefect=True, reset_prefect=args.reset_prefect_db)
    started = time.perf_counter()
    plan = print_plan(params, root, names)
    anything_to_run = any(problem is not None for problem in plan.values())
    if anything_to_run or os.environ.get("PREFECT_API_URL"):
        from flows.pipeline import run_flow

        results = run_flow(args.flow, params_path=args.params, overrides=args.set, until=args.until,
                           track=not args.no_track)  # fmt: skip
    else:  # nothing to run: no temporary Prefect server, no flow run (a server of the user's own gets one)
        results = cached_results(params, root, names)
        print("\neverything is up to date: no stage ran (no Prefect flow run was started)")
    print(f"\npipeline finished in {time.perf_counter() - started:.1f} s")
    if anything_to_run and args.set:  # --nproc and --node-rank are --set overrides too
        print("dvc.lock not updated: this run's --set overrides are not what params.yaml says")
    elif anything_to_run:
        from stages.dvcfile import record_in_dvc

        print(record_in_dvc(root, list(results), params))
    from stages.registry import STAGES, Layout, fill_headlines

    fill_headlines(Layout(root), list(STAGES))
    width = name_width(results)
    for name, result in results.items():
        print(f"  {name:<{width}} {result['status']:<7} output  {result['out']}")
        print(f"  {'':<{width + 8}} metrics {result['metrics_file']}")
    if "select" in results:
        print_selection(Path(results["select"]["out"]))
    return 0


def name_width(names: Iterable[str]) -> int:
    """The column a stage name is padded to: 12, or the longest name (``convbert_eval``)."""
    return max(12, *map(len, names))


def print_plan(params: Params, root: Path, names: list[str]) -> dict[str, str | None]:
    """Before anything runs: which stages will run (and why) and which come from the cache."""
    from stages import Layout
    from stages.registry import status

    print("plan:", flush=True)
    plan = status(names, params, Layout(root))
    width = name_width(plan)
    for name, problem in plan.items():
        print(f"  {name:<{width}} {'cached' if problem is None else 'runs    (' + problem + ')'}", flush=True)
    return plan


def cached_results(params: Params, root: Path, names: list[str]) -> dict[str, dict]:
    """What the flow would return when every stage is up to date (and the merged report, refreshed)."""
    from stages import Layout, stage_key, summary
    from stages.select import rebuild_report

    layout = Layout(root)
    results = {n: summary(n, layout, stage_key(n, params, layout)) | {"status": "cached"} for n in names}
    if "select" in results:
        report, note = rebuild_report(root)
        print(f"{note}: {report}")
    return results


def print_selection(out: Path) -> None:
    """Each profile's selection, as the select stage decided it; a profile that ships nothing stands out."""
    results = json.loads((out / "results.json").read_text())
    print("\nselection per hardware profile:")
    for entry in results["profiles"]:
        name, sel = entry["profile"]["name"], entry.get("selection") or {}
        if entry["status"] != "measured":
            print(f"  {name}: skipped here ({entry['note']})")
        elif sel.get("status") == "below_quality":
            print(f"  WARNING {sel['message']}", file=sys.stderr)
        else:
            print(
                f"  {sel.get('message', 'nothing selected')}"
                + (f" -> {entry['export']}" if entry.get("export") else "")
            )


def cmd_stage(args: argparse.Namespace) -> int:
    from dynaflow.core import distributed as ddp
    from dynaflow.core.tracking import NullTracker, attach_run, end_status, start_run
    from stages import STAGES, Layout, run_stage

    if args.name not in STAGES:
        raise ConfigError(f"unknown stage {args.name!r}; stages: {', '.join(STAGES)}")
    _launch_overrides(args)
    params = load_params(args.params, args.set)
    check_backbone(params)
    root = Path(args.params).resolve().parent
    project_env(root)
    if not ddp.launched():  # housekeeping once, by the process that holds the lock (not each rank)
        prepare_project(root, [args.name], track=not args.no_track and not args.run_id)
    if STAGES[args.name].distributed and ddp.processes(params.launch) > 1 and not ddp.launched():
        cmd = relaunch_command(args, params.launch)  # this same command, once per process, under torchrun
        print(f"launching: {ddp.describe(cmd)}", file=sys.stderr, flush=True)
        return subprocess.call(cmd, env=ddp.launch_env(params.launch))
    ddp.init()
    main = ddp.is_main()
    if not main:  # rank 0 speaks for all: no info logs, no progress bars from the others
        logging.getLogger().setLevel(logging.WARNING)
        os.environ["TQDM_DISABLE"] = "1"
    owned = main and not args.no_track and not args.run_id  # an attached run is ended by whoever made it
    if not main or args.no_track:
        tracker = NullTracker()
    elif args.run_id:
        tracker = attach_run(root, args.run_id)
    else:
        tracker = start_run(root, args.name, {"driver": "cli", "stage": args.name})
    try:
        result = run_stage(args.name, params, Layout(root), tracker)
    except BaseException as exc:
        if owned:
            tracker.end(end_status(exc))
        raise
    finally:
        ddp.shutdown()
    if owned:
        tracker.end()
    if main:
        print(json.dumps(result, indent=2))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from stages import Layout
    from stages.registry import status

    params = load_params(args.params, args.set)
    layout = Layout(Path(args.params).resolve().parent)
    project_env(layout.root)
    problems = status(stages_of(args.flow), params, layout)
    width = name_width(problems)
    for name, problem in problems.items():
        print(f"{name:<{width}} {'up to date' if problem is None else 'needs to run: ' + problem}")
    return 1 if any(p is not None for p in problems.values()) else 0


def cmd_dvc_yaml(args: argparse.Namespace) -> int:
    from stages.dvcfile import differences, render

    params = load_params(args.params, args.set)
    path = Path(args.params).resolve().parent / "dvc.yaml"
    if args.check:
        problems = differences(path, params)
        for line in problems:
            print(f"{path}: {line}", file=sys.stderr)
        if problems:
            print("regenerate it with `dynaflow dvc-yaml`", file=sys.stderr)
        return 1 if problems else 0
    from dynaflow.core.artifacts import atomic_write_bytes

    atomic_write_bytes(path, render(params).encode())
    print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynaflow",
        description="DynaBERT as a cached, tracked pipeline (Prefect, DVC, MLflow).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument(
        "--debug", action="store_true", help=f"show the traceback of an expected error too (or {DEBUG_ENV}=1)"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser, writes: bool = False) -> None:
        p.add_argument("--params", default="params.yaml", help="params file; its folder is the project root")
        if writes:  # one writer per project: the others wait for the lock, or fail at once with --no-wait
            p.add_argument(
                "--no-wait",
                action="store_true",
                help="if another dynaflow run holds the project lock, fail at once instead of waiting",
            )
            p.set_defaults(locks=True)
        p.add_argument(
            "--set",
            action="append",
            default=[],
            metavar="KEY=VALUE",
            help="override a params key for this run, e.g. teacher.epochs=2 (repeatable)",
        )

    def launch_options(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--nproc",
            type=int,
            metavar="N",
            help="train with N data-parallel processes per machine under torchrun "
            "(= --set launch.nproc_per_node=N; training stages only)",
        )
        p.add_argument(
            "--node-rank",
            type=int,
            metavar="K",
            help="this machine's index in a several-machine launch (= --set launch.node_rank=K)",
        )

    def flow_option(p: argparse.ArgumentParser) -> None:
        p.add_argument(  # checked against the registry when the command runs: --help stays fast
            "--flow",
            default="dynaflow",
            help="dynaflow: the DynaBERT stages (default); theseus: data, teacher, BERT-of-Theseus; "
            "convbert: data, teacher, rewire, ConvBERT students; gates: data, teacher, token gates and "
            "PoWER-BERT; gates_dynabert: the DynaBERT stages, then token gates on chosen sub-networks; "
            "adabert: data, teacher, AdaBERT search, student and random control; "
            "compare: every registered method, "
            "selected together. Each flow ends with the select stage",
        )

    p = sub.add_parser("run", help="run the pipeline as a Prefect flow, reusing up-to-date stages")
    common(p, writes=True)
    flow_option(p)
    p.add_argument(
        "--until",
        metavar="STAGE",
        help=f"stop after this stage; the dynaflow flow's stages: {', '.join(DYNABERT_STAGES)} "
        "(`dynaflow status --flow NAME` lists another flow's)",
    )
    p.add_argument("--no-track", action="store_true", help="do not record the run in MLflow")
    p.add_argument(
        "--reset-prefect-db",
        action="store_true",
        help="move a damaged Prefect database ($PREFECT_HOME/prefect.db: run history only) aside first",
    )
    launch_options(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("stage", help="run one stage now, without Prefect (what dvc.yaml calls)")
    common(p, writes=True)
    p.add_argument("name", help="stage name: data, teacher, ...")
    p.add_argument("--no-track", action="store_true", help="do not record the run in MLflow")
    p.add_argument("--run-id", help="record into this existing MLflow run (the flow's launched stages)")
    launch_options(p)
    p.set_defaults(func=cmd_stage)

    p = sub.add_parser("status", help="show which stage outputs are up to date (exit 1 if any is not)")
    common(p)
    flow_option(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("dvc-yaml", help="write dvc.yaml from the stage registry (--check: compare only)")
    common(p)
    p.add_argument("--check", action="store_true", help="name what differs and exit 1, write nothing")
    p.set_defaults(func=cmd_dvc_yaml)

    from dynaflow.cli import evaluation  # export, report, evaluate (one hardware profile)

    evaluation.add_commands(sub, common)
    from dynaflow.cli import serving  # serve, loadtest

    serving.add_commands(sub, common)
    return parser


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s"
    )
    for noisy in ("httpx", "httpcore", "alembic", "mlflow.store.db.utils"):  # per-request / migration chatter
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # Ctrl-C and SIGTERM stop a run the same way, even where a non-interactive shell started it with
    # SIGINT ignored (a background job): the run's own temporary Prefect server no longer gets them.
    main_thread = threading.current_thread() is threading.main_thread()  # signals can be set only there
    signals = (signal.SIGINT, signal.SIGTERM) if main_thread else ()
    handlers = {sig: signal.signal(sig, _raise_interrupted) for sig in signals}
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    root = Path(args.params).resolve().parent
    lock = project_lock(root, wait=not args.no_wait) if getattr(args, "locks", False) else nullcontext()
    try:
        with lock:
            code = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return code
    except DynaflowError as exc:
        if debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        code = exc.exit_code if isinstance(exc, Interrupted) else 130
        print("interrupted: completed stages and the last checkpoint are kept; run again to resume",
              file=sys.stderr)  # fmt: skip
        return code
    except BrokenPipeError:  # `dynaflow status | head -1`: the reader is gone, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:  # main() called in-process (tests, a notebook) leaves the caller's handlers as they were
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


if __name__ == "__main__":
    raise SystemExit(main())
