"""Issue 17's targets, checked on one or more runs of ``bench/serve.py`` (repeats with other arrival seeds).

    python bench/serve_targets.py bench/serve_bench.json bench/serve_bench_s1.json ... [--out targets.json]

Per run: on the burst and 1.5 C traces, whether any fixed point has both higher attainment and higher
effective accuracy than the SLO-aware policy (it must not), and the fixed point closest to doing so; at 0.5 C
the share of requests the SLO-aware policy served with the most accurate point; the largest scheduler time per
dispatch. Then, over the runs, the range of each margin: a margin of a few requests in one run is a coin toss
unless it keeps its sign in the repeats.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

DOMINANCE_TRACES = ("onoff:0.3c,1.5c,10", "steady:1.5c")
LIGHT_TRACE = "steady:0.5c"
TOP_SHARE = 0.95
OVERHEAD_MS = 0.2


def check_run(result: dict[str, Any]) -> dict[str, Any]:
    """One run's verdict on every target."""
    rows = result["rows"]
    top = result["front"][0]  # the most accurate point served (the full model when it is on the front)
    reference = result.get("reference", "w1.0_d1.0")  # older runs: always the full model
    out: dict[str, Any] = {"seed": seed_of(result["command"]), "reference": reference}
    for trace in DOMINANCE_TRACES:
        of_trace = [r for r in rows if r["trace"] == trace]
        slo = next(r for r in of_trace if r["policy"] == "slo")
        fixed = [r for r in of_trace if r["policy"].startswith("fixed:")]
        dominating = [r["policy"] for r in fixed if r["attainment"] > slo["attainment"]
                      and r["effective_accuracy"] > slo["effective_accuracy"]]  # fmt: skip
        # the nearest rival: the most effectively accurate fixed point at or above slo's attainment
        rivals = [r for r in fixed if r["attainment"] >= slo["attainment"]] or fixed
        rival = max(rivals, key=lambda r: r["effective_accuracy"])
        out[trace] = {"met": not dominating, "dominated_by": dominating, "slo": pair(slo),
                      "rival": rival["policy"], "rival_pair": pair(rival),
                      "effective_margin": slo["effective_accuracy"] - rival["effective_accuracy"],
                      "requests": slo["sent"]}  # fmt: skip
    light = next(r for r in rows if r["trace"] == LIGHT_TRACE and r["policy"] == "slo")
    share = light["mix"].get(top, 0.0)
    out[LIGHT_TRACE] = {"met": share >= TOP_SHARE, "top": top, "top_share": share,
                        "attainment": light["attainment"]}  # fmt: skip
    worst = max((r["overhead_ms"] for r in rows if r.get("overhead_ms") is not None), default=None)
    out["overhead"] = {"met": worst is not None and worst < OVERHEAD_MS, "worst_ms": worst}
    return out


def pair(row: dict[str, Any]) -> list[float]:
    return [row["attainment"], row["effective_accuracy"]]


def seed_of(command: str) -> int:
    words = command.split()
    return int(words[words.index("--seed") + 1]) if "--seed" in words else 0


def markdown(checks: list[dict[str, Any]]) -> str:
    lines = ["| reference, seed | burst: slo (att. / eff.) | nearest fixed | met | 1.5 C: slo "
             "| nearest fixed | met | 0.5 C top share | met | worst dispatch µs |",
             "|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in checks:
        cells = [f"{c['reference']}, {c['seed']}"]
        for trace in DOMINANCE_TRACES:
            t = c[trace]
            rival = f"{t['rival'].removeprefix('fixed:')} {t['rival_pair'][0]:.3f} / {t['rival_pair'][1]:.3f}"
            cells += [f"{t['slo'][0]:.3f} / {t['slo'][1]:.3f}", rival, "yes" if t["met"] else "**no**"]
        light = c[LIGHT_TRACE]
        cells += [f"{light['top_share']:.0%}", "yes" if light["met"] else "**no**"]
        cells.append("-" if c["overhead"]["worst_ms"] is None else f"{c['overhead']['worst_ms'] * 1000:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    for trace in DOMINANCE_TRACES:
        margins = [c[trace]["effective_margin"] * c[trace]["requests"] for c in checks]
        lines.append(f"\n{trace}: slo's correct on-time answers minus the nearest fixed point's, per run: "
                     + ", ".join(f"{m:+.0f}" for m in margins))  # fmt: skip
    met = all(c[t]["met"] for c in checks for t in (*DOMINANCE_TRACES, LIGHT_TRACE, "overhead"))
    lines.append(f"\nEvery target met in every run: {'yes' if met else 'no'}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", type=Path, nargs="+", help="bench/serve.py JSON outputs")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    checks = []
    for path in args.runs:
        try:
            checks.append(check_run(json.loads(path.read_text())))
        except (OSError, ValueError, KeyError, StopIteration) as err:
            raise SystemExit(f"{path}: not a bench/serve.py result ({type(err).__name__}: {err})") from None
    print(markdown(checks))
    if args.out is not None:
        from dynaflow.core.artifacts import atomic_write_json

        atomic_write_json(args.out, {"runs": [str(p) for p in args.runs], "checks": checks})
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
