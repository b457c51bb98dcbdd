"""Classification metrics from predicted and true class indices: accuracy, macro-F1, per-class
precision/recall/F1 with support, and the confusion matrix (rows: true label, columns: predicted)."""

from __future__ import annotations

import numpy as np


def confusion_matrix(y_true: list[int], y_pred: list[int], n_classes: int) -> np.ndarray:
    m = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(m, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return m


def classification_metrics(
    y_true: list[int], y_pred: list[int], n_classes: int, labels: list[str] | None = None
) -> dict:
    """Precision of a class never predicted, and recall of a class absent from `y_true`, are 0 (as
    scikit-learn's zero_division=0); macro-F1 averages F1 over all classes."""
    m = confusion_matrix(y_true, y_pred, n_classes)
    tp = np.diag(m).astype(float)
    predicted, actual = m.sum(0).astype(float), m.sum(1).astype(float)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    names = labels or [str(i) for i in range(n_classes)]
    return {
        "accuracy": float(tp.sum() / max(1, m.sum())),
        "macro_f1": float(f1.mean()),
        "examples": int(m.sum()),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(actual[i]),
            }
            for i, name in enumerate(names)
        },
        "confusion": {"labels": names, "matrix": m.tolist()},
    }
