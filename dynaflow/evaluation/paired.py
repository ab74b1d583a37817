"""Is one model better than another on the same dev examples? A paired bootstrap of the main-score gap.

Two models scored on the same examples share the examples' difficulty, so their gap is less noisy than two
independent scores' gap, the more so the more examples they agree on (on SST-2 dev one accuracy has a
standard error near 1.2 points; two gated models that disagree on many sentences still gave intervals of
about ±1.5 points, BENCHMARKS.md). Resampling the examples, with
both models' predictions kept together, gives the gap's spread for any task metric (accuracy, MCC, Pearson),
where McNemar's test would cover accuracy alone.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from dynaflow.evaluation.metrics import compute_metrics, main_score


@dataclass(frozen=True)
class PairedGap:
    """``a``'s main score minus ``b``'s, on the same examples; ``low``-``high``: the 95% percentile interval
    over resamples; ``share_not_above``: the share of resamples where ``a`` did not beat ``b`` (a one-sided
    bootstrap p-value for "a is better")."""

    difference: float
    low: float
    high: float
    share_not_above: float
    resamples: int

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def paired_bootstrap(
    task: str,
    predictions_a: np.ndarray,
    predictions_b: np.ndarray,
    labels: np.ndarray,
    resamples: int = 2000,
    seed: int = 0,
) -> PairedGap:
    """The gap between two models' main scores on the same examples, resampled together (seeded)."""
    labels = np.asarray(labels)
    n = len(labels)
    if len(predictions_a) != n or len(predictions_b) != n:
        raise ValueError(
            f"paired bootstrap: {len(predictions_a)} and {len(predictions_b)} predictions for {n} labels; "
            "both models must be scored on the same examples"
        )
    if resamples < 1:
        raise ValueError(f"paired bootstrap: resamples must be at least 1, got {resamples}")

    def score(predictions: np.ndarray, rows: np.ndarray) -> float:
        return main_score(task, compute_metrics(task, predictions[rows], labels[rows]))

    everything = np.arange(n)
    difference = score(predictions_a, everything) - score(predictions_b, everything)
    rng = np.random.default_rng(seed)
    gaps = np.empty(resamples)
    for i in range(resamples):
        rows = rng.integers(0, n, n)
        gaps[i] = score(predictions_a, rows) - score(predictions_b, rows)
    low, high = np.percentile(gaps, [2.5, 97.5])
    return PairedGap(float(difference), float(low), float(high), float(np.mean(gaps <= 0)), resamples)
