"""AdaBERT and its random-search control beside the teacher and DynaBERT (issue 16), on a project where
those ran.

    GLUE_DIR=../shared/data/glue python bench/adabert.py --project PROJECT --out bench/adabert.json \\
        [--train-only] [--all-variants] [--set adabert_search.epochs=... ...]

Runs the four AdaBERT stages' own functions (probes, search, searched student, random control) from the
project's data and teacher (the inputs DynaBERT used: equal terms) into ``PROJECT/artifacts/adabert-bench/``
(a stage already done there is reused), measures the teacher, DynaBERT's grid, the searched student and the
control's choice with the shared harness on every profile of the project's ``evaluate`` section in one call,
and writes the merged report to ``PROJECT/reports/adabert/``. Every random architecture is measured (the
control's candidate is the one best on held-out rows); ``--all-variants`` also measures the searched
student of every other settings variant trained under ``OUT`` (``searched-<key>``). Stage functions, not
the flow: a project made by an older dynaflow is compared as it is instead of being rebuilt.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from common import baselines, fronts, measure_together, project_main, settings_fingerprint, trained_once

from dynaflow.config import load_params
from dynaflow.core.tracking import NullTracker
from stages.registry import STAGES, Layout, StageContext

OUT = "artifacts/adabert-bench"
REPORT = "reports/adabert"
ORDER = ("adabert_probes", "adabert_search", "adabert", "adabert_random")


def stage_keys(params: Any) -> dict[str, str]:
    """Each AdaBERT stage's settings fingerprint, its upstream AdaBERT stages' included: a variant (other
    search settings) trains into folders of its own and reuses the stages it shares (probes, control)."""
    keys: dict[str, str] = {}
    for name in ORDER:
        stage = STAGES[name]
        own = [settings_fingerprint(params.section(s), params.seed) for s in stage.sections if s != "seed"]
        keys[name] = settings_fingerprint_of([*own, *(keys[u] for u in stage.upstream if u in keys)])
    return keys


def settings_fingerprint_of(parts: list[str]) -> str:
    import hashlib

    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:10]


@dataclass(frozen=True)
class BenchLayout(Layout):
    """The project's layout, with the AdaBERT stages' outputs under ``OUT/<stage>-<settings key>``."""

    keys: dict[str, str] = field(default_factory=dict)

    def out(self, stage: str) -> Path:
        return self.root / OUT / f"{stage}-{self.keys[stage]}" if stage in ORDER else super().out(stage)

    def work(self, stage: str) -> Path:
        return self.root / ".dynaflow" / "work" / f"bench-{stage}-{self.keys[stage]}"


def run_stages(layout: BenchLayout, params: Any) -> dict[str, Any]:
    """Each AdaBERT stage in order, unless its output is there; every stage's metrics and wall time."""
    done = {}
    for name in ORDER:
        stage, key = STAGES[name], layout.keys[name]

        def train(folder: Path, name: str = name, stage: Any = stage, key: str = key) -> dict[str, Any]:
            metrics = stage.run(StageContext(name, params, layout, folder, key, NullTracker()))
            (folder / "metrics.json").write_text(json.dumps(metrics, indent=1))
            return metrics

        folder = str(layout.out(name).relative_to(layout.root))
        done[name] = trained_once(layout.out(name), train) | {"folder": folder}
    return done


def run(args: argparse.Namespace) -> dict[str, Any]:
    import dynaflow.methods.adabert.candidates as adabert
    from dynaflow.evaluation.report import write_report
    from dynaflow.methods.adabert import RANDOM
    from stages.adabert import SEARCHED, SUMMARY

    root = args.project.resolve()
    params = load_params(root / "params.yaml", args.set)
    layout = BenchLayout(root, stage_keys(params))
    trained = run_stages(layout, params)
    summary = json.loads((layout.out("adabert_random") / SUMMARY).read_text())
    if args.train_only:
        return {"project": str(root), "overrides": args.set, "trained": trained, "random": summary}
    found = baselines(root, params) + [adabert.student(layout.out("adabert") / SEARCHED)]
    random_dir = layout.out("adabert_random")
    found += [adabert.student(random_dir / name, RANDOM) for name in sorted(summary["architectures"])]
    if args.all_variants:  # every other search run under OUT (other settings), named by its folder
        for folder in sorted((root / OUT).glob("adabert-*")):
            if folder != layout.out("adabert") and (folder / SEARCHED / "metrics.json").is_file():
                variant = adabert.student(folder / SEARCHED)
                found.append(replace(variant, name=folder.name.replace("adabert-", "searched-"),
                                     label=f"{variant.label} ({folder.name[8:12]})"))  # fmt: skip
    results = measure_together(root, params, found, OUT)
    report = write_report(results, root / REPORT)
    return {
        "project": str(root),
        "overrides": args.set,
        "sections": {
            s: params.section(s).model_dump() for s in ("adabert", "adabert_search", "adabert_train")
        },
        "trained": trained,
        "random": summary,
        "results": results,
        "fronts": fronts(results),
        "report": str(report.relative_to(root)),
    }


def markdown(result: dict[str, Any]) -> str:
    trained, summary = result["trained"], result["random"]
    search = trained["adabert_search"]
    lines = [
        f"search: {search['genotype']} ({search['steps']} steps, {search['wall_seconds']:.0f} s wall)",
        "probes (held-out score per teacher layer): "
        + ", ".join(
            f"{v:.3f}" for k, v in sorted(trained["adabert_probes"].items()) if k.startswith("probe.")
        ),
        "",
        "| student | genotype | dev | held-out | params (M) | train s |",
        "|---|---|---|---|---|---|",
    ]
    searched = {
        k.removeprefix("searched."): v for k, v in trained["adabert"].items() if k.startswith("searched.")
    }
    randoms = trained["adabert_random"]
    rows = {"searched": searched} | {
        f"random/{n}": a | {"train_seconds": randoms[f"{n}.train_seconds"]}
        for n, a in summary["architectures"].items()
    }
    for name, m in rows.items():
        held = m.get("heldout_score")
        lines.append(
            f"| {name} | {m['genotype']} | {m['score']:.4f} | {'-' if held is None else f'{held:.4f}'} | "
            f"{m['parameters'] / 1e6:.2f} | {m['train_seconds']:.0f} |"
        )
    lines.append(f"random control: chosen {summary['chosen']}, dev median {summary['dev_median']:.4f}")
    for entry in result.get("results", {}).get("profiles", []):
        if entry["status"] != "measured":
            continue
        lines += [f"\n{entry['profile']['name']} (dev batches of {entry['profile']['batch_size']}):",
                  "| candidate | dev | params (M) | median ms | p90 ms |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for r in sorted(entry["rows"], key=lambda r: r["latency_median_ms"]):
            lines.append(f"| {r['candidate']} | {r['metric']:.4f} | {r['params'] / 1e6:.2f} "
                         f"| {r['latency_median_ms']:.2f} | {r['latency_p90_ms']:.2f} |")  # fmt: skip
        lines.append(f"front (p90): {', '.join(result['fronts'][entry['profile']['name']])}")
    return "\n".join(lines)


if __name__ == "__main__":
    flags = {"--train-only": "train_only", "--all-variants": "all_variants"}
    given = {name: flag in sys.argv for flag, name in flags.items()}
    sys.argv = [a for a in sys.argv if a not in flags]
    project_main(__doc__, lambda args: run(argparse.Namespace(**vars(args), **given)), markdown)
