"""Steering a query: by example (tiles marked relevant or not) and by concept (more or less
of something named in words).

Both are arithmetic on unit vectors in CONCH's joint space, done before the one nearest-
neighbour search, so filters, grouping, paging and both store backends work unchanged:

- by concept, q' = normalize(q + Σ wᵢ·tᵢ − Σ wⱼ·tⱼ), where t is a text's unit vector and
  w its weight. Every stored tile x then scores x·q' = (x·q + Σ wᵢ x·tᵢ − Σ wⱼ x·tⱼ) / ‖…‖:
  its old score plus w times its similarity to the concept, over one common norm, so the
  ranking moves toward tiles that are like the concept by exactly the stated amount.
- by example, Rocchio's update (Rocchio 1971, the relevance feedback of text retrieval):
  q' = normalize(α·q + β·mean(liked) − γ·mean(unliked)). It was chosen over Qdrant's
  recommend query by measuring both on a planted-class archive (`benchmarks/refine.py`,
  figures in the README).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from conchdb.errors import QueryError

DEFAULT_CONCEPT_WEIGHT = 0.5
MAX_CONCEPT_WEIGHT = 5.0
MAX_CONCEPTS = 16
MAX_EXAMPLES = 64
ROCCHIO_ALPHA = 1.0
ROCCHIO_BETA = 1.5
ROCCHIO_GAMMA = 1.0


@dataclass(frozen=True)
class Concept:
    """A text to move the query toward (`more`) or away from (`less`), by `weight`."""

    text: str
    weight: float = DEFAULT_CONCEPT_WEIGHT

    def to_dict(self) -> dict[str, object]:
        return {"text": self.text, "weight": self.weight}


def concept(text: str, weight: float | None = None, *, parameter: str = "more") -> Concept:
    """A checked concept: a non-blank text and a weight in (0, MAX_CONCEPT_WEIGHT]."""
    clean = text.strip() if isinstance(text, str) else ""
    if not clean:
        raise QueryError("a concept's text is empty", fix="give a description, e.g. necrosis:0.5",
                         parameter=parameter)
    value = DEFAULT_CONCEPT_WEIGHT if weight is None else weight
    if not 0 < value <= MAX_CONCEPT_WEIGHT or not np.isfinite(value):
        raise QueryError(
            f"concept {clean!r} has weight {value}", parameter=parameter,
            fix=f"give a weight above 0 and at most {MAX_CONCEPT_WEIGHT} (e.g. {clean}:0.5); "
            "use --less for the opposite direction",
        )
    return Concept(clean, float(value))


def parse_concept(spec: str, *, parameter: str = "more") -> Concept:
    """`TEXT` or `TEXT:WEIGHT` (the last colon splits, so a text may hold colons when a
    weight follows); a tail that is not a number is part of the text."""
    text, sep, tail = spec.rpartition(":")
    if sep:
        try:
            return concept(text, float(tail), parameter=parameter)
        except ValueError:
            pass
    return concept(spec, parameter=parameter)


def check_concepts(more: Sequence[Concept], less: Sequence[Concept]) -> None:
    if len(more) + len(less) > MAX_CONCEPTS:
        raise QueryError(f"{len(more) + len(less)} concepts given", fix=f"give at most {MAX_CONCEPTS}",
                         parameter="more")


def unit(vector: np.ndarray, *, parameter: str = "query") -> np.ndarray:
    """`vector` scaled to length 1; a (near) zero vector has no direction and is refused."""
    v = np.asarray(vector, dtype=np.float32)
    norm = float(np.linalg.norm(v))
    if norm < 1e-6:
        raise QueryError(
            "the steered query cancels out (its vector has no direction left)",
            fix="lower the weights of --less / --unlike, or add what you want with --more / --like",
            parameter=parameter,
        )
    return (v / norm).astype(np.float32)


def add_concepts(
    query: np.ndarray, more: Sequence[tuple[np.ndarray, float]], less: Sequence[tuple[np.ndarray, float]]
) -> np.ndarray:
    """normalize(q + Σ w·t − Σ w·t) over the concepts' unit vectors t and weights w."""
    out = np.asarray(query, dtype=np.float64).copy()
    for sign, items in ((1.0, more), (-1.0, less)):
        for vector, weight in items:
            t = np.asarray(vector, dtype=np.float64)
            out += sign * weight * t / np.linalg.norm(t)
    return unit(out, parameter="more")


def rocchio(
    query: np.ndarray,
    liked: np.ndarray,
    unliked: np.ndarray,
    *,
    alpha: float = ROCCHIO_ALPHA,
    beta: float = ROCCHIO_BETA,
    gamma: float = ROCCHIO_GAMMA,
) -> np.ndarray:
    """normalize(α·q + β·mean(liked) − γ·mean(unliked)); an empty side adds nothing."""
    out = alpha * np.asarray(query, dtype=np.float64)
    if len(liked):
        out += beta * np.asarray(liked, dtype=np.float64).mean(axis=0)
    if len(unliked):
        out -= gamma * np.asarray(unliked, dtype=np.float64).mean(axis=0)
    return unit(out, parameter="like")


def check_examples(like: Sequence[str], unlike: Sequence[str]) -> None:
    """At most MAX_EXAMPLES marks, and no tile both liked and not."""
    if len(like) + len(unlike) > MAX_EXAMPLES:
        raise QueryError(f"{len(like) + len(unlike)} tiles marked", fix=f"mark at most {MAX_EXAMPLES}",
                         parameter="like")
    both = sorted(set(like) & set(unlike))
    if both:
        raise QueryError(f"tile {both[0]} is marked both relevant and not relevant",
                         fix="mark each tile once, with --like or with --unlike", parameter="unlike")
