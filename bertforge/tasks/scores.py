"""Downstream metrics in plain numpy: accuracy, F1, Matthews, Pearson, Spearman, MSE.

They follow the definitions GLUE's official scorer uses (scikit-learn's and scipy's),
without depending on either. Degenerate inputs where a correlation is undefined (a
constant prediction or reference) give 0.0 rather than NaN, as scikit-learn's
matthews_corrcoef does, so that metrics.json stays valid JSON and a model that always
predicts one class scores no better than chance.
"""

from __future__ import annotations

import numpy as np


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    return float((predictions == labels).mean()) if len(labels) else 0.0


def f1(predictions: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """F1 of the `positive` class: 2 TP / (2 TP + FP + FN); 0.0 when nothing is positive."""
    p, y = np.asarray(predictions) == positive, np.asarray(labels) == positive
    tp = float(np.sum(p & y))
    denominator = 2 * tp + float(np.sum(p & ~y)) + float(np.sum(~p & y))
    return 2 * tp / denominator if denominator else 0.0


def matthews(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation coefficient, multi-class form (Gorodkin 2004).

    For two classes it is (TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)).
    """
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    classes = np.unique(np.concatenate([predictions, labels]))
    # confusion[i, j]: examples of true class i predicted as class j.
    index = {c: i for i, c in enumerate(classes.tolist())}
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(
        confusion,
        ([index[c] for c in labels.tolist()], [index[c] for c in predictions.tolist()]),
        1,
    )
    n = confusion.sum()
    correct = np.trace(confusion)
    true_per_class, predicted_per_class = confusion.sum(1), confusion.sum(0)
    numerator = correct * n - true_per_class @ predicted_per_class
    denominator = np.sqrt(
        (n * n - predicted_per_class @ predicted_per_class)
        * (n * n - true_per_class @ true_per_class)
    )
    return float(numerator / denominator) if denominator else 0.0


def pearson(x: np.ndarray, y: np.ndarray) -> float:
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denominator) if denominator else 0.0


def mse(predictions: np.ndarray, targets: np.ndarray) -> float:
    d = np.asarray(predictions, dtype=np.float64) - np.asarray(targets, dtype=np.float64)
    return float(d @ d / len(d)) if len(d) else 0.0


def rank(x: np.ndarray) -> np.ndarray:
    """1-based ranks, ties given the average of the ranks they span (scipy's 'average')."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    sorted_x = x[order]
    # Each run of equal values [start, end) gets the mean of ranks start+1 .. end.
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation of the ranks."""
    return pearson(rank(x), rank(y))


# name -> function(predictions, targets); classification metrics take class ids.
METRICS = {
    "accuracy": accuracy,
    "f1": f1,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
    "mse": mse,
}


def compute(
    names: tuple[str, ...] | list[str], predictions: np.ndarray, targets: np.ndarray
) -> dict[str, float]:
    return {name: METRICS[name](predictions, targets) for name in names}
