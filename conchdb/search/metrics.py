"""Classification metrics as plain numpy: confusion matrix, per-class precision/recall/F1,
balanced accuracy, weighted F1, and the majority vote of retrieved labels.

Written here instead of importing scikit-learn, which conchdb does not otherwise need and
which is a large install; the definitions follow scikit-learn's (a class with no true and no
predicted samples is left out of the averages; precision of a class never predicted is 0).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def confusion(truth: Sequence[str], predicted: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """(C, C) counts: row = true class, column = predicted class, in `classes` order."""
    index = {c: i for i, c in enumerate(classes)}
    matrix = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for t, p in zip(truth, predicted, strict=True):
        matrix[index[t], index[p]] += 1
    return matrix


@dataclass(frozen=True)
class ClassMetrics:
    """One class's support (true samples), precision, recall and F1."""

    label: str
    support: int
    precision: float
    recall: float
    f1: float


def per_class(matrix: np.ndarray, classes: Sequence[str]) -> list[ClassMetrics]:
    """Precision, recall and F1 of every class from a confusion matrix (0 where undefined)."""
    out = []
    for i, label in enumerate(classes):
        tp = float(matrix[i, i])
        support = int(matrix[i].sum())
        predicted = float(matrix[:, i].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        out.append(ClassMetrics(label, support, precision, recall, f1))
    return out


def balanced_accuracy(matrix: np.ndarray) -> float:
    """Mean recall over the classes that have true samples."""
    support = matrix.sum(axis=1)
    present = support > 0
    if not present.any():
        return 0.0
    return float(np.mean(np.diag(matrix)[present] / support[present]))


def macro_f1(matrix: np.ndarray, classes: Sequence[str]) -> float:
    """Unweighted mean F1 over the classes that occur (as truth or as prediction)."""
    rows = [m for m, col in zip(per_class(matrix, classes), matrix.sum(axis=0), strict=True) if m.support or col]
    return float(np.mean([m.f1 for m in rows])) if rows else 0.0


def weighted_f1(matrix: np.ndarray, classes: Sequence[str]) -> float:
    """F1 averaged over classes weighted by their support."""
    rows = per_class(matrix, classes)
    total = sum(m.support for m in rows)
    return float(sum(m.f1 * m.support for m in rows) / total) if total else 0.0


def accuracy(truth: Sequence[str], predicted: Sequence[str]) -> float:
    if not truth:
        return 0.0
    return float(np.mean([t == p for t, p in zip(truth, predicted, strict=True)]))


def majority_vote(ranked_labels: Sequence[str]) -> str:
    """The most frequent label among ranked results; a tie goes to the tied label ranked highest."""
    if not ranked_labels:
        raise ValueError("no labels to vote on")
    counts = Counter(ranked_labels)
    top = max(counts.values())
    return next(label for label in ranked_labels if counts[label] == top)
