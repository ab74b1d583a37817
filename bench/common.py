"""What every measuring script in bench/ does after parsing its arguments: run, print Markdown, save JSON."""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dynaflow.core.artifacts import atomic_write_json


def project_parser(doc: str | None) -> argparse.ArgumentParser:
    """The arguments of a script that reads a trained project: ``--project`` (required) and ``--out``."""
    from pathlib import Path

    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, required=True, help="a project after `dynaflow run`")
    parser.add_argument("--out", type=Path, help="write the raw result here (JSON)")
    return parser


def run_and_report(
    args: argparse.Namespace,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    markdown: Callable[[dict[str, Any]], str],
) -> None:
    """Measure (offline: no hub), print the Markdown table, write the raw result to ``args.out`` if set."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = run(args)
    print(markdown(result))
    if args.out is not None:
        atomic_write_json(args.out, result)
        print(f"\nwrote {args.out}")


def project_main(
    doc: str | None,
    run: Callable[[argparse.Namespace], dict[str, Any]],
    markdown: Callable[[dict[str, Any]], str],
) -> None:
    """A project script's ``main``: ``--project``, ``--out`` and repeatable ``--set KEY=VALUE`` overrides."""
    import logging

    parser = project_parser(doc)
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="a params.yaml override"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    run_and_report(args, run, markdown)


def front_p90(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Pareto front of measured rows by dev metric against p90 latency, fastest first."""
    front, best = [], float("-inf")
    for r in sorted(rows, key=lambda r: (r["latency_p90_ms"], -r["metric"])):
        if r["metric"] > best:
            front.append(r)
            best = r["metric"]
    return front


def fronts(results: dict[str, Any]) -> dict[str, list[str]]:
    """Each measured profile's p90 front, as candidate ids."""
    return {
        e["profile"]["name"]: [r["candidate"] for r in front_p90(e["rows"])]
        for e in results["profiles"]
        if e["status"] == "measured"
    }


def select_each(results: dict[str, Any], cfg: Any) -> None:
    """Selection (no quality floor) on every measured profile of ``results``, in place."""
    from dynaflow.evaluation.selection import select

    for entry in results["profiles"]:
        if entry["status"] == "measured":
            profile = cfg.profile(entry["profile"]["name"])
            chosen = select(
                entry["rows"], profile.latency_ms, profile.memory_mb, cfg.budget_stat, profile.name
            )
            entry["selection"] = chosen.as_dict()


def trained_once(out: Path, train: Callable[[Path], dict[str, Any]]) -> dict[str, Any]:
    """``out``'s ``metrics.json`` with its ``timing.json``; when absent, ``train(folder)`` writes the model
    into a partial folder first, renamed to ``out`` once done (a killed run leaves no model that looks
    finished). Timing: the wall seconds, and the training seconds when ``train`` returns them."""
    if not (out / "metrics.json").is_file():
        partial = out.with_name(f".{out.name}.partial")
        partial.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        found = train(partial)
        timing = {"wall_seconds": time.perf_counter() - started}
        if "train_seconds" in found:
            timing["train_seconds"] = found["train_seconds"]
        (partial / "timing.json").write_text(json.dumps(timing))
        partial.rename(out)
    return json.loads((out / "metrics.json").read_text()) | json.loads((out / "timing.json").read_text())


def settings_fingerprint(section: Any, seed: int) -> str:
    """A training checkpoint's fingerprint from its params section and seed: a bench run resumes a
    checkpoint only under the same settings (the stages use their cache key for this)."""
    import hashlib

    settings = json.dumps([section.model_dump(mode="json"), seed], sort_keys=True)
    return "bench-" + hashlib.sha256(settings.encode()).hexdigest()[:16]


def teacher_candidate(teacher_dir: Path) -> Any:
    """The fine-tuned teacher as a candidate of its own (the source every gated model starts from)."""
    from transformers import BertConfig, BertForSequenceClassification

    from dynaflow.evaluation.candidates import Candidate
    from dynaflow.models.extract import subnetwork_flops

    config = BertConfig.from_pretrained(teacher_dir)
    arch = {"width": 1.0, "depth": 1.0, "layers": config.num_hidden_layers,
            "heads": config.num_attention_heads, "intermediate": config.intermediate_size}  # fmt: skip
    return Candidate(
        method="teacher", name="teacher", arch=arch, label="teacher",
        build=lambda: BertForSequenceClassification.from_pretrained(teacher_dir).eval(),
        flops=lambda n: float(subnetwork_flops(config, 1.0, 1.0, n)),
    )  # fmt: skip


def baselines(root: Path, params: Any) -> list[Any]:
    """The teacher, and DynaBERT's grid when the project trained one."""
    from stages.evaluate import candidates as dynabert_grid
    from stages.registry import Layout

    layout = Layout(root)
    found = [teacher_candidate(layout.out("teacher"))]
    if (layout.out("depth_kd") / "config.json").is_file():
        found += dynabert_grid(params, layout)
    return found


def measure_together(root: Path, params: Any, candidates: list[Any], source: str) -> dict[str, Any]:
    """Every candidate through one harness call: the same dev batches, timed in the same interleaved
    rounds (no method measured in a quieter minute than another); ``source``: where the bench's models are."""
    import tempfile

    from dynaflow.data.splits import read_task_meta
    from dynaflow.evaluation import machine
    from dynaflow.evaluation.export import reference_batch
    from dynaflow.evaluation.harness import measure, results_document
    from dynaflow.evaluation.scoring import load_dev
    from stages.registry import Layout

    data_dir, cfg = Layout(root).out("data"), params.evaluate
    meta = read_task_meta(data_dir)
    dev = load_dev(data_dir, meta["dev_splits"])
    with tempfile.TemporaryDirectory(prefix="dynaflow-bench-") as work:
        entries = measure(candidates, cfg.profiles, meta["task"], dev, cfg, reference_batch(data_dir, 0),
                          Path(work))  # fmt: skip
    methods = list(dict.fromkeys(c.method for c in candidates))
    sources = {m: source for m in methods}
    return results_document(methods, meta["task"], meta["main_metric"], sources, cfg, machine.machine_info(),
                            entries)  # fmt: skip
