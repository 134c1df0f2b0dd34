"""Metrics against scikit-learn and scipy on fixed predictions; GSM8K final-number parsing."""

from __future__ import annotations

import numpy as np
import pytest

from lamda_peft.apps import metrics as M

sklearn_metrics = pytest.importorskip("sklearn.metrics")
stats = pytest.importorskip("scipy.stats")


@pytest.mark.parametrize("num_classes", [2, 3, 5])
def test_classification_metrics_match_sklearn(num_classes):
    rng = np.random.default_rng(num_classes)
    true = rng.integers(0, num_classes, 200)
    pred = np.where(rng.random(200) < 0.6, true, rng.integers(0, num_classes, 200))  # better than chance
    got = M.classification_metrics(pred, true, num_classes)
    average = "binary" if num_classes == 2 else "macro"
    assert got["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(true, pred))
    assert got["f1"] == pytest.approx(sklearn_metrics.f1_score(true, pred, average=average))
    assert got["matthews_corr"] == pytest.approx(sklearn_metrics.matthews_corrcoef(true, pred))


def test_degenerate_predictions():
    true, pred = np.array([0, 1, 1, 0]), np.zeros(4, dtype=int)  # one class predicted: MCC and F1 are 0
    assert M.matthews_corr(pred, true, 2) == sklearn_metrics.matthews_corrcoef(true, pred) == 0.0
    assert M.f1(pred, true, 2) == 0.0
    assert M.accuracy(pred, true) == 0.5


def test_regression_metrics_match_scipy_with_ties():
    rng = np.random.default_rng(0)
    true = np.round(rng.uniform(0, 5, 300), 1)  # many ties, as STS-B's scores
    pred = true + rng.normal(0, 1.0, 300)
    pred[:50] = 2.5  # ties in the predictions too
    got = M.regression_metrics(pred, true)
    assert got["pearson"] == pytest.approx(stats.pearsonr(pred, true)[0], abs=1e-12)
    assert got["spearman"] == pytest.approx(stats.spearmanr(pred, true)[0], abs=1e-12)
    assert got["mse"] == pytest.approx(float(np.mean((pred - true) ** 2)))


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
        ("#### 1,000", "1000"),
        ("so the answer is -3.50 dollars", "-3.5"),
        ("She has 5 apples and 7 pears, 12 in total.", "12"),
        ("The answer is 18.0.", "18"),
        ("no number here", None),
    ],
)
def test_final_number(text, expected):
    assert M.final_number(text) == expected


def test_exact_match_and_detection():
    refs = ["x #### 72", "y #### 10", "z #### 5"]
    assert M.has_final_answers(refs) and not M.has_final_answers(["plain answer"])
    assert M.exact_match(["... so 72", "#### 10.00", "I do not know"], refs) == pytest.approx(2 / 3)
