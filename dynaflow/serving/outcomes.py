"""What a load test (real or simulated) measures, from one record per request sent.

Latency runs from the request's *scheduled* send time, so a generator or server that falls behind shows up as
latency instead of hiding it (coordinated omission). Attainment and effective accuracy count over every
request sent: shed, rejected and failed requests are misses (Model-Switching, HotCloud '20: effective
accuracy = correct answers returned within the deadline / requests).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

STATUSES = ("ok", "shed", "rejected", "error")


@dataclass(frozen=True)
class Outcome:
    sent: float  # scheduled send time, seconds from the start of the run
    status: str  # ok | shed (late, dropped) | rejected (queue full) | error
    latency: float | None = None  # seconds from the scheduled send to the answer (ok only)
    subnet: str | None = None
    correct: bool | None = None  # None where the label is unknown
    server: float | None = None  # seconds the server saw (queue + compute): the rest is HTTP and the client

    def on_time(self, slo: float) -> bool:
        return self.status == "ok" and self.latency is not None and self.latency <= slo


def summarize(outcomes: Sequence[Outcome], slo: float, duration: float | None = None) -> dict[str, Any]:
    """SLO attainment, latency percentiles (ms), goodput, served and effective accuracy, sub-network mix."""
    sent = len(outcomes)
    if duration is None:
        duration = max((o.sent for o in outcomes), default=0.0) or 1.0
    ok = [o for o in outcomes if o.status == "ok"]
    on_time = [o for o in ok if o.on_time(slo)]
    latencies = np.array([o.latency for o in ok], dtype=float) * 1000
    labelled = [o for o in ok if o.correct is not None]
    mix = Counter(o.subnet for o in ok)
    summary: dict[str, Any] = {
        "sent": sent,
        "answered": len(ok),
        **{status: sum(o.status == status for o in outcomes) for status in STATUSES[1:]},
        "attainment": len(on_time) / sent if sent else 0.0,
        "goodput_rps": len(on_time) / duration,
        "throughput_rps": len(ok) / duration,
        "offered_rps": sent / duration,
        "served_accuracy": (sum(bool(o.correct) for o in labelled) / len(labelled)) if labelled else None,
        "effective_accuracy": (sum(bool(o.correct) for o in on_time) / sent) if sent and labelled else None,
        "mix": {name: n / len(ok) for name, n in sorted(mix.items(), key=lambda kv: -kv[1])} if ok else {},
    }
    for q in (50, 95, 99):
        summary[f"p{q}_ms"] = float(np.percentile(latencies, q)) if len(latencies) else None
    # What the scheduler cannot see: HTTP, JSON and tokenisation on both sides, and the generator's own delay.
    outside = [o.latency - o.server for o in ok if o.latency is not None and o.server is not None]
    summary["outside_server_p50_ms"] = float(np.median(outside)) * 1000 if outside else None
    return summary


def mix_over_time(outcomes: Sequence[Outcome], bin_seconds: float = 1.0) -> dict[str, list[float]]:
    """Per sub-network, the share of the answers sent in each ``bin_seconds`` window (for plots)."""
    ok = [o for o in outcomes if o.status == "ok" and o.subnet]
    if not ok:
        return {}
    bins = int(max(o.sent for o in ok) // bin_seconds) + 1
    counts: dict[str, np.ndarray] = {}
    for o in ok:
        counts.setdefault(o.subnet, np.zeros(bins))[int(o.sent // bin_seconds)] += 1
    total = np.maximum(sum(counts.values()), 1)
    return {name: (c / total).round(4).tolist() for name, c in counts.items()}
