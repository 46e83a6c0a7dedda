"""Metrics against hand-computed cases."""
import math

import numpy as np

from lorafind_utils.core.metrics import classification_metrics, mean_reciprocal_rank, ranks_of_truth


def test_hand_computed_case():
    # 3 classes, 4 samples.
    labels = np.array([0, 1, 2, 2])
    scores = np.array([[0.7, 0.2, 0.1],   # true 0 ranked 1st -> correct
                       [0.5, 0.3, 0.2],   # true 1 ranked 2nd
                       [0.1, 0.6, 0.3],   # true 2 ranked 2nd
                       [0.2, 0.1, 0.7]])  # true 2 ranked 1st -> correct
    m = classification_metrics(labels, scores, ["a", "b", "c"], ks=(1, 2))
    assert m["accuracy"] == 0.5
    assert math.isclose(m["mrr"], (1 + 0.5 + 0.5 + 1) / 4)
    assert m["top2_accuracy"] == 1.0
    # predictions: 0, 0, 1, 2. class a: TP1 FP1 FN0; b: TP0 FP1 FN1; c: TP1 FP0 FN1
    f1 = [2 / (2 + 1 + 0), 0 / (0 + 1 + 1), 2 / (2 + 0 + 1)]  # the paper's Eq. (6)
    assert math.isclose(m["macro_f1"], sum(f1) / 3)
    assert math.isclose(m["macro_precision"], (0.5 + 0 + 1) / 3)
    assert math.isclose(m["macro_recall"], (1 + 0 + 0.5) / 3)
    assert m["confusion_matrix"] == [[1, 0, 0], [1, 0, 0], [0, 1, 1]]
    assert m["classes_never_predicted"] == 0


def test_never_predicted_class_is_zero_not_nan():
    labels = np.array([0, 1, 2])
    scores = np.tile([0.9, 0.05, 0.05], (3, 1))  # always predicts class 0: chance-like baseline
    m = classification_metrics(labels, scores, ["a", "b", "c"], ks=(1,))
    assert m["classes_never_predicted"] == 2
    assert math.isclose(m["macro_precision"], (1 / 3) / 3)
    assert not math.isnan(m["macro_f1"])


def test_mrr_never_below_accuracy_on_one_set():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 12, 200)
    scores = rng.random((200, 12))
    m = classification_metrics(labels, scores, [str(i) for i in range(12)])
    assert m["mrr"] >= m["accuracy"]
    assert (ranks_of_truth(labels, scores) >= 1).all()
    assert math.isclose(mean_reciprocal_rank([1], [[0.1, 0.9, 0.0]]), 1.0)
