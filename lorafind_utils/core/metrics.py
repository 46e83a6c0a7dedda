"""Classification and retrieval metrics, from scikit-learn where it has them.

All metrics are computed on one set of (labels, scores). Macro precision treats a
class that is never predicted (precision 0/0) as 0 -- scikit-learn's
``zero_division=0`` -- and the number of such classes is reported beside it.
Macro-F1 is the paper's Eq. (6), mean over classes of 2TP / (2TP + FP + FN), which
equals scikit-learn's ``f1_score(average="macro", zero_division=0)``.
"""
from __future__ import annotations

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
)

#: the per-run metrics that stages 03-04 report (fractions)
RUN_METRICS = ("accuracy", "macro_f1", "mrr", "top3_accuracy")


def ranks_of_truth(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """1-based rank of the true class in each row of ``scores`` (ties counted pessimistically)."""
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    true = scores[np.arange(len(labels)), labels]
    return 1 + (scores > true[:, None]).sum(1) + ((scores == true[:, None]).sum(1) - 1)


def mean_reciprocal_rank(labels, scores) -> float:
    """MRR: mean over queries of 1 / rank of the correct class."""
    return float(np.mean(1.0 / ranks_of_truth(labels, scores)))


def classification_metrics(labels, scores, class_names: list[str], ks=(1, 3, 5)) -> dict:
    """Accuracy, macro P/R/F1, top-k, MRR, confusion matrix and per-class report for one set.

    :param labels: true class indices, shape [N].
    :param scores: class scores or probabilities, shape [N, K] (rows need not sum to 1).
    :param class_names: K names, in class-index order.
    """
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    k_all = list(range(len(class_names)))
    pred = scores.argmax(1)
    out = {
        "n": int(len(labels)),
        "accuracy": float(accuracy_score(labels, pred)),
        "macro_precision": float(precision_score(labels, pred, labels=k_all, average="macro", zero_division=0)),
        "macro_recall": float(recall_score(labels, pred, labels=k_all, average="macro", zero_division=0)),
        "macro_f1": float(f1_score(labels, pred, labels=k_all, average="macro", zero_division=0)),
        "classes_never_predicted": int(len(set(k_all) - set(pred.tolist()))),
        "mrr": mean_reciprocal_rank(labels, scores),
    }
    ranks = ranks_of_truth(labels, scores)
    for k in ks:  # from the ranks (as MRR): sklearn refuses k >= the number of classes, and 2 classes
        out[f"top{k}_accuracy"] = float(np.mean(ranks <= k))
    out["confusion_matrix"] = confusion_matrix(labels, pred, labels=k_all).tolist()
    out["per_class"] = classification_report(labels, pred, labels=k_all, target_names=class_names,
                                             output_dict=True, zero_division=0)
    return out
