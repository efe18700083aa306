"""A slide's mosaic: the few tiles that stand for it, chosen by k-means over its tile vectors.

Slide search compares a query slide with every stored slide tile by tile; doing that with
all of the query's tiles would cost thousands of searches, so the query is represented by
its mosaic (Yottixel's idea): cluster the slide's tile vectors into k groups and keep the
tile nearest each group's centre. Those k tiles cover the kinds of tissue the slide holds,
however much of each there is.

The choice depends only on the vectors and their point ids: tiles are put in id order and
k-means starts from a fixed seed, so a slide gets the same mosaic on every run, whichever
store it was read back from, and whether it was chosen when the ingest completed or later
by `conchdb mosaic`. Two stores (or one store read twice after a rewrite) may hand back a
vector a last bit apart; the choices that such noise could flip are near-ties, so every
nearest-of choice here takes the first (in id order) of those within `TIE` of the nearest,
not the bitwise nearest. Rounding the vectors instead would not help: it only moves the
coin flip to the rounding boundaries. This module is pure numpy (no store, no model), below
both ingest and search: the archive marks the mosaics it chooses (conchdb/archive/marks.py),
and search chooses one for a slide file that is not stored.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

MOSAIC_FRACTION = 0.05
MOSAIC_MIN = 8
MOSAIC_MAX = 64
MOSAIC_SEED = 0
KMEANS_ITERATIONS = 30
TIE = 1e-6
"""Squared distances (between unit vectors: 0 to 4) closer than this count as equal: far above
the 1e-7 a float32 vector's last bits move them, far below what tells tissue apart."""


def first_nearest(distances: np.ndarray, axis: int) -> np.ndarray:
    """Along `axis`, the first index whose distance is within `TIE` of the smallest: `argmin`
    with near-ties broken by position (id order, or centre order), not by float noise."""
    smallest = distances.min(axis=axis, keepdims=True)
    return np.argmax(distances <= smallest + TIE, axis=axis)


def mosaic_size(tiles: int) -> int:
    """k for a slide of `tiles` tiles: 5 % of them, at least 8 and at most 64, and never more than there are."""
    wanted = int(round(MOSAIC_FRACTION * tiles))
    return max(0, min(tiles, max(MOSAIC_MIN, min(MOSAIC_MAX, wanted))))


def _squared_distances(points: np.ndarray, centres: np.ndarray, point_norms: np.ndarray) -> np.ndarray:
    """(n, k) squared Euclidean distances, as one matrix product (clipped at 0 against rounding)."""
    centre_norms = np.einsum("ij,ij->i", centres, centres)
    return np.maximum(point_norms[:, None] - 2.0 * (points @ centres.T) + centre_norms[None, :], 0.0)


def kmeans(
    points: np.ndarray, k: int, *, seed: int = MOSAIC_SEED, iterations: int = KMEANS_ITERATIONS
) -> tuple[np.ndarray, np.ndarray]:
    """Centres (k, d) and each point's cluster (n,): greedy k-means++ seeding, then Lloyd's iterations.

    Written here rather than taken from scipy, whose `kmeans2` computes distances in a
    loop of its own instead of one matrix product (BLAS), many times slower on a slide of
    thousands of tiles. A cluster that loses all its points keeps its centre. Stops when
    no point changes cluster, or after `iterations`.
    """
    data = np.asarray(points, dtype=np.float64)
    n = data.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be between 1 and the number of points ({n})")
    rng = np.random.default_rng(seed)
    norms = np.einsum("ij,ij->i", data, data)
    chosen = [int(rng.integers(n))]
    nearest = _squared_distances(data, data[chosen], norms)[:, 0]
    trials = 2 + int(np.log(k))
    while len(chosen) < k:
        total = nearest.sum()
        if total <= 0:  # every point sits on a centre already: the rest are duplicates
            free = np.setdiff1d(np.arange(n), chosen)
            chosen.append(int(free[0]))
            nearest = np.minimum(nearest, _squared_distances(data, data[chosen[-1:]], norms)[:, 0])
            continue
        # Greedy k-means++: of a few candidates drawn by squared distance, keep the one
        # that leaves the points closest to their centres (one draw alone often puts two
        # seeds into one cluster and leaves another without).
        draws = np.searchsorted(np.cumsum(nearest), rng.uniform(0, total, size=trials), side="right")
        candidates = np.minimum(draws, n - 1)
        options = np.minimum(nearest[:, None], _squared_distances(data, data[candidates], norms))
        best = int(np.argmin(options.sum(axis=0)))
        chosen.append(int(candidates[best]))
        nearest = options[:, best]
    centres = data[chosen].copy()
    labels = np.full(n, -1)
    for _ in range(iterations):
        new = first_nearest(_squared_distances(data, centres, norms), axis=1)
        if np.array_equal(new, labels):
            break
        labels = new
        counts = np.bincount(labels, minlength=k)
        sums = np.zeros_like(centres)
        np.add.at(sums, labels, data)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None]
    return centres, labels


def choose_mosaic(ids: Sequence[str], vectors: np.ndarray) -> list[str]:
    """The ids of a slide's k mosaic tiles, in id order: for each k-means centre in turn, the
    tile nearest to it that no earlier centre took (two centres of one large cluster can
    share their nearest tile; near-ties go to the first in id order); every tile when the slide
    has no more than k."""
    if len(ids) != len(vectors):
        raise ValueError(f"{len(ids)} ids for {len(vectors)} vectors")
    order = sorted(range(len(ids)), key=lambda i: str(ids[i]))
    sorted_ids = [str(ids[i]) for i in order]
    k = mosaic_size(len(sorted_ids))
    if k >= len(sorted_ids):
        return sorted_ids
    data = np.asarray(vectors, dtype=np.float64)[order]
    lengths = np.linalg.norm(data, axis=1, keepdims=True)
    data = data / np.where(lengths > 0, lengths, 1.0)
    centres, _ = kmeans(data, k)
    distances = _squared_distances(data, centres, np.einsum("ij,ij->i", data, data))
    taken: list[int] = []
    for j in range(k):
        column = distances[:, j].copy()
        column[taken] = np.inf
        taken.append(int(first_nearest(column, axis=0)))
    return [sorted_ids[i] for i in sorted(taken)]
