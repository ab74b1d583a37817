"""Run the Theseus stage function on an existing teacher and prepared data, into a throw-away directory.

    OMP_NUM_THREADS=2 HF_HUB_OFFLINE=1 python bench/theseus_stage.py \\
        --teacher /work/bench-run/artifacts/teacher --data /work/bench-run/data/prepared \\
        --set epochs=1 --set finetune_epochs=1 --set batch_size=32

Prints the stage's metrics (dev score of the exported successor, the teacher's, layer and parameter counts)
and the wall time; nothing outside the temporary directory (or ``--out``) is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from pathlib import Path

from dynaflow.config import TheseusConfig, parse_override
from dynaflow.core.tracking import NullTracker
from stages import theseus


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--teacher", type=Path, required=True, help="the predecessor (teacher stage output)")
    parser.add_argument("--data", type=Path, required=True, help="the data stage output")
    parser.add_argument("--out", type=Path, help="output directory (default: a temporary one, removed)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a theseus.* param")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cfg = TheseusConfig(**{".".join(key): value for key, value in map(parse_override, args.set)})

    with tempfile.TemporaryDirectory(prefix="theseus-bench-") as tmp:
        out = args.out or Path(tmp) / "out"
        out.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        metrics = theseus.compress(cfg, args.seed, args.teacher, args.data, out, Path(tmp) / "work", "bench",
                              NullTracker())  # fmt: skip
        wall = time.perf_counter() - started
    print(json.dumps({"params": cfg.model_dump(), **metrics, "wall_seconds": wall}, indent=1))


if __name__ == "__main__":
    main()
