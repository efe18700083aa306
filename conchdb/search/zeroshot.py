"""Zero-shot classification of a tile, and MI-Zero for a whole slide, as pure numpy.

A tile's logits are CONCH's logit scale times the cosine between its vector and each
class vector; softmax turns them into probabilities. MI-Zero scores a slide from the
vectors already stored for its tiles: for each class, the mean of the `k` highest tile
logits, then a softmax over classes. Small `k` trusts the few most typical tiles (good for
small lesions), large `k` asks the class to cover much of the slide; the pooled result
is reported for every `k` so the user sees how stable the call is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

DEFAULT_KS = (1, 5, 10, 50, 100)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, stable for large logits."""
    shifted = logits - logits.max(axis=-1, keepdims=True)
    exp = np.exp(shifted)
    return exp / exp.sum(axis=-1, keepdims=True)


@dataclass
class ClassScores:
    """Per-class logits and probabilities, in the classes' given order."""

    labels: list[str]
    logits: np.ndarray
    probabilities: np.ndarray

    def ranked(self) -> list[tuple[str, float, float]]:
        """(label, probability, logit), most probable first."""
        order = np.argsort(-self.probabilities, kind="stable")
        return [(self.labels[i], float(self.probabilities[i]), float(self.logits[i])) for i in order]

    @property
    def prediction(self) -> str:
        return self.labels[int(np.argmax(self.probabilities))]

    def to_dict(self) -> dict:
        return {
            "prediction": self.prediction,
            "classes": [{"label": lab, "probability": p, "logit": lg} for lab, p, lg in self.ranked()],
        }


def classify(
    image_vector: np.ndarray, class_vectors: np.ndarray, logit_scale: float, labels: Sequence[str]
) -> ClassScores:
    """Zero-shot probabilities of one image over the classes."""
    logits = logit_scale * (class_vectors @ np.asarray(image_vector, dtype=np.float32).reshape(-1))
    return ClassScores(list(labels), logits.astype(np.float64), softmax(logits.astype(np.float64)))


@dataclass
class PooledScores:
    """MI-Zero at one `k`: `k_used` is `k` capped at the number of tiles."""

    k: int
    k_used: int
    scores: ClassScores

    def to_dict(self) -> dict:
        return {"k": self.k, "k_used": self.k_used, **self.scores.to_dict()}


def topk_mean(logits: np.ndarray, k: int) -> np.ndarray:
    """Per column, the mean of its `k` largest values (`logits` is tiles × classes)."""
    k = min(k, logits.shape[0])
    top = np.partition(logits, logits.shape[0] - k, axis=0)[logits.shape[0] - k :]
    return top.mean(axis=0)


def mi_zero(
    tile_vectors: np.ndarray,
    class_vectors: np.ndarray,
    logit_scale: float,
    labels: Sequence[str],
    ks: Sequence[int] = DEFAULT_KS,
) -> list[PooledScores]:
    """Slide-level zero-shot scores by top-k mean pooling of tile logits, for each k."""
    tiles = np.asarray(tile_vectors, dtype=np.float64)
    logits = logit_scale * (tiles @ np.asarray(class_vectors, dtype=np.float64).T)
    out = []
    for k in ks:
        pooled = topk_mean(logits, k)
        out.append(PooledScores(k, min(k, len(tiles)), ClassScores(list(labels), pooled, softmax(pooled))))
    return out


def parse_ks(text: str) -> list[int]:
    """`1,5,10` as a list of positive integers (ValueError naming the bad item)."""
    ks = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) < 1:
            raise ValueError(f"{item!r} is not a positive integer")
        ks.append(int(item))
    if not ks:
        raise ValueError("no k given")
    return list(dict.fromkeys(ks))
