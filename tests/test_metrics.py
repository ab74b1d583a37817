"""GLUE metrics against hand-computed values, degenerate inputs and input validation."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from dynaflow.data.glue import TASKS
from dynaflow.evaluation.metrics import compute_metrics, main_score, matthews_corrcoef, pearson, spearman


def test_accuracy_from_class_ids_and_logits():
    labels = [0, 1, 1, 0, 1]
    ids = [0, 1, 0, 0, 0]
    assert compute_metrics(TASKS["sst2"], ids, labels) == {"acc": 0.6}
    logits = np.array([[2.0, -1.0], [0.1, 0.3], [5.0, 4.0], [0.0, -0.5], [1.0, 0.0]])
    assert compute_metrics("sst2", logits, labels) == {"acc": 0.6}
    assert compute_metrics("sst2", np.array(ids, dtype=np.float32), labels)["acc"] == 0.6


def test_mnli_three_class_logits():
    logits = np.array([[3, 1, 0], [0, 2, 1], [0, 1, 4], [5, 0, 0]], dtype=float)  # argmax 0, 1, 2, 0
    assert compute_metrics("mnli", logits, [0, 1, 1, 2]) == {"acc": 0.5}


def test_mcc_known_example():
    # y = [1,1,1,0], p = [1,0,1,1]: TP=2, TN=0, FP=1, FN=1 ->
    # (2*0 - 1*1) / sqrt((2+1)(2+1)(0+1)(0+1)) = -1/3 (the sklearn docstring example).
    m = compute_metrics("cola", [1, 0, 1, 1], [1, 1, 1, 0])
    assert list(m) == ["mcc"]
    assert m["mcc"] == pytest.approx(-1 / 3)


def test_mcc_binary_formula_on_larger_example():
    y = np.array([1, 1, 1, 1, 0, 0, 0, 1, 0, 1])
    p = np.array([1, 1, 0, 1, 0, 1, 0, 1, 0, 0])
    tp, tn, fp, fn = 4, 3, 1, 2
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert compute_metrics("cola", p, y)["mcc"] == pytest.approx(expected)
    assert compute_metrics("cola", y, y)["mcc"] == pytest.approx(1.0)
    assert compute_metrics("cola", 1 - y, y)["mcc"] == pytest.approx(-1.0)


def test_mcc_multiclass_matches_gorodkin():
    # 3 classes; hand-worked: C=[[1,1,0],[0,1,1],[0,0,2]] (rows true), c=4, s=6, t=[2,2,2], p=[1,2,3]
    # -> (4*6 - (2+4+6)) / sqrt((36 - (1+4+9)) * (36 - 12)) = 12 / sqrt(22*24)
    y = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([0, 1, 1, 2, 2, 2])
    assert matthews_corrcoef(p, y) == pytest.approx(12 / math.sqrt(22 * 24))


def test_f1_and_acc_for_mrpc_and_qqp():
    y = [1, 1, 0, 0, 1, 0]
    p = [1, 0, 0, 1, 1, 1]
    # TP=2, FP=2, FN=1 -> F1 = 4/7; acc = 3/6
    for task in ("mrpc", "qqp"):
        m = compute_metrics(task, p, y)
        assert list(m) == ["acc", "f1", "acc_and_f1"]
        assert m["acc"] == pytest.approx(0.5)
        assert m["f1"] == pytest.approx(4 / 7)
        assert m["acc_and_f1"] == pytest.approx((0.5 + 4 / 7) / 2)
        assert main_score(task, m) == pytest.approx(0.5)


def test_pearson_spearman_for_stsb():
    y = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    x = np.array([2.0, 1.0, 4.0, 3.0, 5.0])
    # Pearson: centered x=[-1,-2,1,0,2], y=[-2,-1,0,1,2] -> sum xy = 2+2+0+0+4 = 8; |x|^2=|y|^2=10.
    # Values are distinct integers 1..5 so their ranks are themselves: Spearman = Pearson = 0.8.
    m = compute_metrics("stsb", x, y)
    assert list(m) == ["pearson", "spearmanr", "corr"]
    assert m["pearson"] == pytest.approx(0.8) and m["spearmanr"] == pytest.approx(0.8)
    # Monotone but non-linear: Spearman exactly 1, Pearson strictly below.
    m2 = compute_metrics("stsb", np.exp(y).reshape(-1, 1), y)
    assert m2["spearmanr"] == pytest.approx(1.0) and m2["pearson"] < 0.99
    assert main_score("stsb", m2) == m2["pearson"]


def test_spearman_ties_use_average_ranks():
    # x ranks [1.5,1.5,3,4], y ranks [1,2,3,4]: centered [-1,-1,0.5,1.5] . [-1.5,-.5,.5,1.5] = 4.5;
    # |x|^2 = 1+1+.25+2.25 = 4.5, |y|^2 = 5 -> rho = 4.5/sqrt(22.5)
    assert spearman(np.array([0.0, 0.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0, 4.0])) == pytest.approx(
        4.5 / math.sqrt(22.5)
    )


def test_degenerate_inputs_give_zero_without_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any RuntimeWarning / ConstantInputWarning fails the test
        assert compute_metrics("cola", [1, 1, 1, 1], [1, 0, 1, 0]) == {"mcc": 0.0}
        assert compute_metrics("cola", [1, 0, 1, 0], [1, 1, 1, 1]) == {"mcc": 0.0}
        assert compute_metrics("cola", [1, 1], [1, 1]) == {"mcc": 0.0}
        m = compute_metrics("stsb", [0.1] * 7, [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 5.0])
        assert m == {"pearson": 0.0, "spearmanr": 0.0, "corr": 0.0}
        assert compute_metrics("stsb", [1.0, 2.0], [3.0, 3.0])["pearson"] == 0.0
        # No predicted and no true positives: F1 is 0 (sklearn's zero_division default), acc still 1.
        assert compute_metrics("mrpc", [0, 0, 0], [0, 0, 0]) == {"acc": 1.0, "f1": 0.0, "acc_and_f1": 0.5}


def test_pearson_helper_is_clipped_and_symmetric():
    x = np.array([1e-3, 2e-3, 3e-3])
    assert pearson(x, 7 * x + 1) == 1.0
    assert pearson(x, -x) == -1.0


@pytest.mark.parametrize(
    "task, preds, labels, match",
    [
        ("sst2", [0, 1], [0, 1, 1], "2 predictions for 3 labels"),
        ("sst2", np.zeros((3, 3)), [0, 1, 1], "num_labels=2"),
        ("sst2", [0.2, 0.9], [0, 1], "non-integer"),
        ("sst2", [0, 2], [0, 1], "class ids"),
        ("sst2", [[np.nan, 1.0], [0.0, 1.0]], [0, 1], "NaN"),
        ("stsb", [1.0, np.nan], [1.0, 2.0], "NaN"),
        ("stsb", np.zeros((2, 2)), [1.0, 2.0], "shape"),
        ("sst2", [], [], "empty"),
    ],
)
def test_bad_inputs_raise(task, preds, labels, match):
    with pytest.raises(ValueError, match=match):
        compute_metrics(task, preds, labels)


def test_every_task_returns_its_metric_names():
    rng = np.random.default_rng(0)
    for task in TASKS.values():
        labels = rng.uniform(0, 5, 20) if task.is_regression else rng.integers(0, task.num_labels, 20)
        preds = rng.normal(size=20) if task.is_regression else rng.normal(size=(20, task.num_labels))
        m = compute_metrics(task, preds, labels)
        assert tuple(m) == task.metric_names
        assert all(isinstance(v, float) and math.isfinite(v) for v in m.values())
        assert main_score(task, m) == m[task.main_metric]


def test_main_score_missing_key():
    with pytest.raises(KeyError, match="mcc"):
        main_score("cola", {"acc": 1.0})


def test_paired_bootstrap_sees_a_small_consistent_gain_that_unpaired_noise_would_hide():
    from dynaflow.evaluation.paired import paired_bootstrap

    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, 872)
    b = np.where(rng.random(872) < 0.85, labels, 1 - labels)  # ~85% right
    a = b.copy()
    wrong = np.flatnonzero(b != labels)[:15]  # a fixes 15 of b's errors and breaks none: +1.7 points
    a[wrong] = labels[wrong]
    gap = paired_bootstrap("sst2", a, b, labels, resamples=500)
    assert gap.difference == pytest.approx(15 / 872)
    assert 0 < gap.low <= gap.difference <= gap.high  # one accuracy's standard error is ~1.2 points
    assert gap.share_not_above == 0.0
    same = paired_bootstrap("sst2", b, b, labels, resamples=50)
    assert (same.difference, same.low, same.high, same.share_not_above) == (0.0, 0.0, 0.0, 1.0)


def test_paired_bootstrap_on_a_regression_task_and_its_input_checks():
    from dynaflow.evaluation.paired import paired_bootstrap

    rng = np.random.default_rng(2)
    gold = rng.uniform(0, 5, 300)
    good, noisy = gold + rng.normal(0, 0.5, 300), gold + rng.normal(0, 2.0, 300)
    gap = paired_bootstrap("stsb", noisy, good, gold, resamples=300)
    assert gap.high < 0 and gap.share_not_above == 1.0  # the noisier scorer correlates less
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap("stsb", good[:10], good, gold)
    with pytest.raises(ValueError, match="resamples"):
        paired_bootstrap("stsb", good, good, gold, resamples=0)
