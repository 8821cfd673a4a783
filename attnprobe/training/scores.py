"""Classification scores for refine's evaluations: accuracy, F1 and Matthews correlation from a confusion matrix.

Computed with numpy (no scikit-learn dependency); ``MetricsFn`` is the ``compute_metrics`` the Trainer calls.
Masked-LM perplexity is masked_lm.py's.
"""

from __future__ import annotations

import math

import numpy as np


def confusion_matrix(labels: np.ndarray, preds: np.ndarray, num_labels: int) -> np.ndarray:
    """``C[t, p]`` = number of examples of true class ``t`` predicted as ``p``; ``(C, C)`` int64."""
    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    flat = labels * num_labels + preds
    return np.bincount(flat, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def f1(matrix: np.ndarray) -> float:
    """F1 of class 1 for two classes; otherwise the macro mean over the classes that occur in the labels
    or the predictions (as scikit-learn does). A class with no true and no predicted example scores 0.

    >>> f1(np.array([[3, 1], [2, 4]]))  # TP 4, FP 1, FN 2
    0.7272727272727273
    """
    tp = np.diag(matrix).astype(np.float64)
    fp = matrix.sum(0) - tp
    fn = matrix.sum(1) - tp
    denom = 2 * tp + fp + fn
    per_class = np.where(denom > 0, 2 * tp / np.where(denom > 0, denom, 1), 0.0)
    if matrix.shape[0] == 2:
        return float(per_class[1])
    present = (matrix.sum(0) + matrix.sum(1)) > 0
    return float(per_class[present].mean()) if present.any() else 0.0


def matthews_corrcoef(matrix: np.ndarray) -> float:
    """Matthews correlation (Gorodkin's multi-class form), 0 when a marginal is constant.

    ``(c * s - sum_k p_k t_k) / sqrt((s^2 - sum_k p_k^2) (s^2 - sum_k t_k^2))`` with ``c`` correct,
    ``s`` total, ``t_k`` true and ``p_k`` predicted counts of class k.

    >>> round(matthews_corrcoef(np.array([[3, 1], [2, 4]])), 6)
    0.408248
    """
    m = matrix.astype(np.float64)
    t = m.sum(1)
    p = m.sum(0)
    c = np.trace(m)
    s = m.sum()
    cov = c * s - (p * t).sum()
    denom = (s * s - (p * p).sum()) * (s * s - (t * t).sum())
    return float(cov / math.sqrt(denom)) if denom > 0 else 0.0


def classification_scores(labels, preds, num_labels: int) -> dict[str, float]:
    """``{"accuracy", "f1", "mcc"}`` of integer predictions against integer labels."""
    labels = np.asarray(labels, dtype=np.int64)
    preds = np.asarray(preds, dtype=np.int64)
    matrix = confusion_matrix(labels, preds, num_labels)
    accuracy = float((labels == preds).mean()) if len(labels) else float("nan")
    return {"accuracy": accuracy, "f1": f1(matrix), "mcc": matthews_corrcoef(matrix)}


class MetricsFn:
    """``compute_metrics`` for the Trainer; keeps the logits of the latest evaluation (the final model's)."""

    def __init__(self, num_labels: int):
        self.num_labels = num_labels
        self.last_logits: np.ndarray | None = None

    def __call__(self, prediction) -> dict[str, float]:
        logits = prediction.predictions
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        logits = np.asarray(logits)
        self.last_logits = logits
        return classification_scores(prediction.label_ids, logits.argmax(-1), self.num_labels)
