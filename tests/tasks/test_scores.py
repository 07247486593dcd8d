"""The GLUE scorers against values worked out by hand (and scipy's, for Spearman)."""

from __future__ import annotations

import numpy as np
import pytest

from bertforge.tasks.scores import accuracy, f1, matthews, mse, pearson, rank, spearman


def test_metrics_against_known_values():
    p, y = np.array([1, 0, 1, 1]), np.array([1, 0, 0, 1])
    assert accuracy(p, y) == 0.75
    assert f1(p, y) == pytest.approx(0.8)  # TP 2, FP 1, FN 0
    assert matthews(p, y) == pytest.approx(2 / np.sqrt(12))  # (TP TN - FP FN) / sqrt(...)
    assert matthews(y, y) == pytest.approx(1.0) and matthews(1 - y, y) == pytest.approx(-1.0)
    assert matthews(np.ones(4, int), y) == 0.0  # a constant prediction: 0, not NaN
    assert matthews(np.array([0, 1, 2, 2]), np.array([0, 1, 2, 2])) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [1, 3, 2]) == pytest.approx(0.5)
    assert pearson([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0
    assert rank([10, 20, 20, 30]).tolist() == [1, 2.5, 2.5, 4]
    assert rank([3, 1, 2, 1]).tolist() == [4, 1.5, 3, 1.5]
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(0.9486832980505138)  # scipy's
    assert spearman([1, 5, 9], [2, 3, 100]) == pytest.approx(1.0)
    assert mse([1, 2], [1, 4]) == 2.0
