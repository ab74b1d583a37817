"""Run the evaluate stage's function on any trained model and data directory, into any output directory.

The same code as ``dynaflow stage evaluate`` (:func:`stages.evaluate.run`), without the stage runner: for
benchmarking a model trained elsewhere without touching its project. Prints each measured profile's table.

With ``--theseus DIR`` the Theseus successor (``theseus`` stage output) is measured right after, by the
``theseus_eval`` stage's function, into ``OUT/theseus``, and the merged report goes to ``OUT/merged``.

Example::

    python bench/evaluate_profiles.py --model ../bench-run/artifacts/dynabert \
        --data ../bench-run/data/prepared --out /tmp/eval --set evaluate.repeats=50 \
        --theseus ../bench-run/artifacts/theseus
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

from dynaflow.config import load_params
from dynaflow.core.tracking import NullTracker
from dynaflow.evaluation.report import profile_table


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

    from dynaflow.cli.evaluation import rebuild_report
    from dynaflow.evaluation.report import equal_depth_table
    from stages import evaluate, theseus_eval

    params = load_params(args.params, args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    evaluate.run(
        params.evaluate, params.widths, params.depths, args.model, args.data, args.out, NullTracker(),
        metrics_dir=args.out / "metrics", only=args.profiles, published_as=args.out,
    )  # fmt: skip
    if args.theseus is not None:
        theseus_eval.run(params.evaluate, args.theseus, args.data, args.out / "theseus", NullTracker())
        report, note = rebuild_report(args.out, [args.out, args.out / "theseus"], args.out / "merged")
        print(f"{note}: {report}")
    merged = args.out / ("merged" if args.theseus is not None else "") / "results.json"
    results = json.loads(merged.read_text())
    for entry in results["profiles"]:
        print(f"\n### {entry['profile']['name']} ({entry['status']})\n")
        if entry["status"] != "measured":
            print(entry["note"])
            continue
        print(entry["selection"]["message"] + "\n")
        print("\n".join(profile_table(entry, results["main_metric"], params.evaluate.budget_stat)))
        if entry.get("comparison_rows"):
            print("\n" + "\n".join(equal_depth_table(entry, results["main_metric"])))
    print(f"\nreport: {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
