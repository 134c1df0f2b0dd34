"""Task metrics in plain numpy (no scikit-learn needed at run time; the tests check them against sklearn/scipy).

- classification: accuracy, F1 (binary: of class 1; more classes: macro average), Matthews correlation (multiclass
  form, Gorodkin 2004)
- regression: Pearson and Spearman correlation (ties get average ranks), mean squared error
- GSM8K: the final number of an answer (the ``#### N`` line, else the last number in the text) and exact match
"""

from __future__ import annotations

import re
from typing import Optional, Sequence

import numpy as np


def accuracy(pred: Sequence[int], true: Sequence[int]) -> float:
    pred, true = np.asarray(pred), np.asarray(true)
    return float((pred == true).mean())


def f1(pred: Sequence[int], true: Sequence[int], num_classes: int) -> float:
    """F1 of class 1 when there are two classes (GLUE's MRPC convention), macro-averaged F1 otherwise."""
    pred, true = np.asarray(pred), np.asarray(true)
    classes = [1] if num_classes == 2 else range(num_classes)
    scores = []
    for c in classes:
        tp = np.sum((pred == c) & (true == c))
        fp = np.sum((pred == c) & (true != c))
        fn = np.sum((pred != c) & (true == c))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def matthews_corr(pred: Sequence[int], true: Sequence[int], num_classes: int) -> float:
    """MCC from the confusion matrix C: (c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t)); 0 when undefined."""
    confusion = np.zeros((num_classes, num_classes), dtype=np.float64)
    np.add.at(confusion, (np.asarray(true), np.asarray(pred)), 1)
    t, p = confusion.sum(axis=1), confusion.sum(axis=0)  # true and predicted counts per class
    c, s = np.trace(confusion), confusion.sum()
    denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return 0.0 if denominator == 0 else float((c * s - t @ p) / denominator)


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return 0.0 if denominator == 0 else float(x @ y / denominator)


def _ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks (as scipy.stats.rankdata)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    return pearson(_ranks(np.asarray(x, dtype=np.float64)), _ranks(np.asarray(y, dtype=np.float64)))


def classification_metrics(pred: Sequence[int], true: Sequence[int], num_classes: int) -> dict[str, float]:
    return {
        "accuracy": accuracy(pred, true),
        "f1": f1(pred, true, num_classes),
        "matthews_corr": matthews_corr(pred, true, num_classes),
    }


def regression_metrics(pred: Sequence[float], true: Sequence[float]) -> dict[str, float]:
    diff = np.asarray(pred, dtype=np.float64) - np.asarray(true, dtype=np.float64)
    return {"pearson": pearson(pred, true), "spearman": spearman(pred, true), "mse": float(np.mean(diff * diff))}


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> Optional[str]:
    """The answer of a GSM8K-style solution: the number after ``####`` if present, else the last number in the text.

    Normalized for comparison: commas and a trailing ``.0...`` removed (``1,000.00`` -> ``1000``).
    """
    marked = text.split("####")[-1] if "####" in text else text
    numbers = _NUMBER.findall(marked)
    if not numbers:
        return None
    number = (numbers[0] if "####" in text else numbers[-1]).replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    return number


def has_final_answers(answers: Sequence[str]) -> bool:
    """True when every reference answer carries a GSM8K ``#### N`` line."""
    return bool(answers) and all("####" in str(a) and final_number(str(a)) is not None for a in answers)


def exact_match(generated: Sequence[str], references: Sequence[str]) -> float:
    """Fraction of generations whose final number equals the reference's final number."""
    hits = [final_number(g) is not None and final_number(g) == final_number(r) for g, r in zip(generated, references)]
    return float(np.mean(hits)) if hits else 0.0
