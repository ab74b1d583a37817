"""GLUE metrics (accuracy, F1, Matthews correlation, Pearson/Spearman) with numpy/scipy only.

Keys match HF's legacy ``glue_compute_metrics`` / DynaBERT: "acc", "f1", "acc_and_f1", "mcc",
"pearson", "spearmanr", "corr". Degenerate inputs (constant predictions or labels) give 0.0 instead
of NaN plus a warning, so a collapsed sub-network scores 0 rather than poisoning model selection.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from numpy.typing import ArrayLike

from dynaflow.data.glue import TaskSpec, get_task

__all__ = [
    "accuracy",
    "binary_f1",
    "compute_metrics",
    "main_score",
    "matthews_corrcoef",
    "pearson",
    "spearman",
]


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return float(np.mean(preds == labels))


def binary_f1(preds: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """F1 of the positive class; 0.0 when there are no true or predicted positives (as sklearn)."""
    tp = int(np.sum((preds == positive) & (labels == positive)))
    fp = int(np.sum((preds == positive) & (labels != positive)))
    fn = int(np.sum((preds != positive) & (labels == positive)))
    denom = 2 * tp + fp + fn
    return 2.0 * tp / denom if denom else 0.0


def matthews_corrcoef(preds: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class MCC (Gorodkin's R_K, as sklearn); 0.0 when either side is constant."""
    classes, inv = np.unique(np.concatenate([labels, preds]), return_inverse=True)
    k, n = len(classes), len(labels)
    conf = np.zeros((k, k), dtype=np.float64)
    np.add.at(conf, (inv[:n], inv[n:]), 1.0)  # rows: true class, cols: predicted class
    t = conf.sum(axis=1)
    p = conf.sum(axis=0)
    c = np.trace(conf)
    s = float(n)
    cov_yp = c * s - float(t @ p)
    cov_pp = s * s - float(p @ p)
    cov_yy = s * s - float(t @ t)
    denom = cov_pp * cov_yy
    return float(cov_yp / np.sqrt(denom)) if denom > 0 else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson r; 0.0 when either input is constant (scipy would warn and return NaN)."""
    # Test constancy exactly: x - x.mean() of a constant array can be ~1e-17 noise, not 0.
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return 0.0
    xc = x - x.mean()
    yc = y - y.mean()
    denom = np.sqrt(float(xc @ xc) * float(yc @ yc))
    if denom == 0.0:  # underflow on tiny spreads
        return 0.0
    # Clip float round-off (e.g. 1.0000000000000002) so r stays a valid correlation.
    return float(np.clip((xc @ yc) / denom, -1.0, 1.0))


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman rho = Pearson on average ranks (ties share their mean rank, as scipy.stats.spearmanr)."""
    from scipy.stats import rankdata  # imported here: scipy costs half a second at start-up

    return pearson(rankdata(x).astype(np.float64), rankdata(y).astype(np.float64))


def _as_class_ids(task: TaskSpec, predictions: ArrayLike, n: int) -> np.ndarray:
    """Accept logits/probabilities of shape (n, num_labels) or class ids of shape (n,)."""
    arr = np.asarray(predictions)
    if arr.ndim == 2:
        if arr.shape[1] != task.num_labels:
            raise ValueError(
                f"{task.name}: logits have {arr.shape[1]} columns, expected num_labels={task.num_labels}"
            )
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{task.name}: logits contain NaN or inf (diverged model?)")
        arr = np.argmax(arr, axis=1)
    elif arr.ndim == 1:
        if arr.dtype.kind == "f":
            if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
                raise ValueError(
                    f"{task.name}: 1-D predictions must be class ids; got non-integer floats "
                    "(pass logits of shape (n, num_labels) instead)"
                )
        elif arr.dtype.kind not in "iub":
            raise ValueError(f"{task.name}: predictions must be numeric, got dtype {arr.dtype}")
    else:
        raise ValueError(
            f"{task.name}: predictions must be 1-D class ids or 2-D logits, got shape {arr.shape}"
        )
    ids = arr.astype(np.int64)
    if len(ids) != n:
        raise ValueError(f"{task.name}: {len(ids)} predictions for {n} labels")
    if ids.size and (ids.min() < 0 or ids.max() >= task.num_labels):
        raise ValueError(f"{task.name}: class ids must be in 0..{task.num_labels - 1}")
    return ids


def _as_scores(task: TaskSpec, predictions: ArrayLike, n: int) -> np.ndarray:
    arr = np.asarray(predictions, dtype=np.float64)
    if arr.ndim == 2 and arr.shape[1] == 1:  # regression head output (n, 1)
        arr = arr[:, 0]
    if arr.ndim != 1:
        raise ValueError(
            f"{task.name}: regression predictions must have shape (n,) or (n, 1), got {arr.shape}"
        )
    if len(arr) != n:
        raise ValueError(f"{task.name}: {len(arr)} predictions for {n} labels")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{task.name}: predictions contain NaN or inf (diverged model?)")
    return arr


def compute_metrics(task: TaskSpec | str, predictions: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """All of ``task.metric_names`` for one evaluation split.

    ``predictions``: logits (n, num_labels) or class ids (n,) for classification; raw scores
    (n,) or (n, 1) for STS-B. ``labels``: class ids, or gold scores for STS-B.
    """
    spec = get_task(task)
    if spec.is_regression:
        y = np.asarray(labels, dtype=np.float64).reshape(-1)
        if y.size == 0:
            raise ValueError(f"{spec.name}: cannot compute metrics on an empty split")
        x = _as_scores(spec, predictions, len(y))
        p, s = pearson(x, y), spearman(x, y)
        out = {"pearson": p, "spearmanr": s, "corr": (p + s) / 2.0}
    else:
        y = np.asarray(labels).reshape(-1).astype(np.int64)
        if y.size == 0:
            raise ValueError(f"{spec.name}: cannot compute metrics on an empty split")
        x = _as_class_ids(spec, predictions, len(y))
        if spec.name == "cola":
            out = {"mcc": matthews_corrcoef(x, y)}
        elif "f1" in spec.metric_names:
            acc, f1 = accuracy(x, y), binary_f1(x, y)
            out = {"acc": acc, "f1": f1, "acc_and_f1": (acc + f1) / 2.0}
        else:
            out = {"acc": accuracy(x, y)}
    # Keep the registry and this function in lock-step: the pipeline selects on task.main_metric.
    assert set(out) == set(spec.metric_names), (out.keys(), spec.metric_names)
    return {k: out[k] for k in spec.metric_names}


def main_score(task: TaskSpec | str, metrics: Mapping[str, float]) -> float:
    """The selection metric (``task.main_metric``) out of a ``compute_metrics`` result."""
    spec = get_task(task)
    try:
        return float(metrics[spec.main_metric])
    except KeyError:
        raise KeyError(
            f"{spec.name}: metrics {sorted(metrics)} lack the main metric {spec.main_metric!r}"
        ) from None
