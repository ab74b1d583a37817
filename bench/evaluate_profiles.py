"""Measure a trained DynaBERT (and a Theseus successor) on the hardware profiles, into any directory.

The same harness as the measurement stages (:func:`stages.measure.measure_into`) and the same selection
as the ``select`` stage (without the quality floor, which needs the project's teacher), without the stage
runner: for benchmarking a model trained elsewhere without touching its project. Prints each measured
profile's table; writes ``OUT/results.json`` and ``OUT/report.md``.

Example::

    python bench/evaluate_profiles.py --model ../bench-run/artifacts/dynabert \
        --data ../bench-run/data/prepared --out /tmp/eval --set evaluate.repeats=50 \
        --theseus ../bench-run/artifacts/theseus
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from common import select_each

from dynaflow.config import load_params
from dynaflow.core.artifacts import atomic_write_json
from dynaflow.evaluation.report import equal_layers_table, merge_results, profile_table, write_report


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="trained elastic model (depth_kd output)")
    p.add_argument("--data", required=True, type=Path, help="data stage output (data/prepared)")
    p.add_argument("--out", required=True, type=Path, help="output directory (created)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    p.add_argument("--profiles", nargs="+", help="only these profiles (default: all)")
    p.add_argument("--theseus", type=Path, help="also measure this Theseus successor (theseus output)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from dynaflow.methods.dynabert import candidates as dynabert
    from dynaflow.methods.theseus import candidates as theseus
    from dynaflow.models.backbone import load_elastic
    from stages.measure import measure_into

    params = load_params(args.params, args.set)
    cfg = params.evaluate
    profiles = [cfg.profile(n) for n in args.profiles] if args.profiles else list(cfg.profiles)
    args.out.mkdir(parents=True, exist_ok=True)
    grid = dynabert.grid(load_elastic(args.model).eval(), params.widths, params.depths)
    docs = [
        measure_into(
            grid, dynabert.METHOD, args.model, args.data, profiles, cfg, args.out, args.out / "dynabert"
        )
    ]
    if args.theseus is not None:
        successor = [theseus.successor(args.theseus)]
        docs.append(measure_into(successor, theseus.METHOD, args.theseus, args.data, profiles, cfg, args.out,
                                 args.out / "theseus"))  # fmt: skip
    results = merge_results(docs)
    select_each(results, cfg)
    atomic_write_json(args.out / "results.json", results)
    report = write_report(results, args.out)
    for entry in results["profiles"]:
        print(f"\n### {entry['profile']['name']} ({entry['status']})\n")
        if entry["status"] != "measured":
            print(entry["note"])
            continue
        print(entry["selection"]["message"] + "\n")
        print("\n".join(profile_table(entry, results["main_metric"], cfg.budget_stat)))
        print("\n" + "\n".join(equal_layers_table(entry, results["main_metric"])))
    print(f"\nreport: {report}")


if __name__ == "__main__":
    main()
