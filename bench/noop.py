"""How long the commands take when there is nothing to do (issue 21's targets: run <= 10 s, status <= 2 s).

    python bench/noop.py PROJECT [--repeats 5] [--out bench/noop.json]

PROJECT: a project where the default pipeline has run (every stage up to date). Runs `dynaflow status`
and `dynaflow run` REPEATS times each, as a user would (a new process each time), after one untimed call
of each, and records every wall time and the median. Also how long `import stages` takes alone, the floor
under both commands.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def timed(cmd: list[str], cwd: Path) -> tuple[float, int, str]:
    started = time.perf_counter()
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    return time.perf_counter() - started, done.returncode, done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("project", type=Path)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("noop.json"))
    args = parser.parse_args()
    dynaflow = [sys.executable, "-m", "dynaflow.cli"]
    commands = {"status": [*dynaflow, "status"], "run": [*dynaflow, "run"],
                "import stages": [sys.executable, "-c", "import stages"]}  # fmt: skip
    results: dict[str, dict[str, object]] = {}
    for name, cmd in commands.items():
        first, code, out = timed(cmd, args.project)  # untimed: the first call fills file-system caches
        if name == "run" and "everything is up to date" not in out:
            raise SystemExit(f"{args.project}: not every stage is up to date; run the pipeline first\n{out}")
        times = [timed(cmd, args.project)[0] for _ in range(args.repeats)]
        results[name] = {"first_s": round(first, 2), "times_s": [round(t, 2) for t in times],
                         "median_s": round(statistics.median(times), 2)}  # fmt: skip
        median = statistics.median(times)
        print(f"{name:<14} median {median:.2f} s of {args.repeats} ({first:.2f} s untimed first)")
    record = {"command": " ".join(sys.argv), "cpus": os.cpu_count(), "results": results}
    args.out.write_text(json.dumps(record, indent=2) + "\n")


if __name__ == "__main__":
    main()
