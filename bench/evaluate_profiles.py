"""Run the evaluate stage's function on any trained model and data directory, into any output directory.

The same code as ``dynaflow stage evaluate`` (:func:`stages.evaluate.run`), without the stage runner: for
benchmarking a model trained elsewhere without touching its project. Prints each measured profile's table.

Example::

    python bench/evaluate_profiles.py --model ../bench-run/artifacts/dynabert \
        --data ../bench-run/data/prepared --out /tmp/eval --set evaluate.repeats=50
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from dynaflow.config import load_params
from dynaflow.report import profile_table
from dynaflow.tracking import NullTracker


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, type=Path, help="trained elastic model (depth_kd output)")
    p.add_argument("--data", required=True, type=Path, help="data stage output (data/prepared)")
    p.add_argument("--out", required=True, type=Path, help="output directory (created)")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override")
    p.add_argument("--profiles", nargs="+", help="only these profiles (default: all)")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    from stages import evaluate

    params = load_params(args.params, args.set)
    args.out.mkdir(parents=True, exist_ok=True)
    evaluate.run(
        params.evaluate, params.widths, params.depths, args.model, args.data, args.out, NullTracker(),
        metrics_dir=args.out / "metrics", only=args.profiles, published_as=args.out,
    )  # fmt: skip
    import json

    results = json.loads((args.out / "results.json").read_text())
    for entry in results["profiles"]:
        print(f"\n### {entry['profile']['name']} ({entry['status']})\n")
        if entry["status"] != "measured":
            print(entry["note"])
            continue
        print(entry["selection"]["message"] + "\n")
        print("\n".join(profile_table(entry, results["main_metric"], params.evaluate.budget_stat)))
    print(f"\nreport: {args.out / 'report.md'}")


if __name__ == "__main__":
    main()
