"""Mosaic choice: k from the number of tiles, deterministic, one tile per cluster."""

from __future__ import annotations

import numpy as np
import pytest

from conchdb.archive.mosaic import MOSAIC_MAX, MOSAIC_MIN, choose_mosaic, kmeans, mosaic_size


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def clustered(n_clusters: int, per: int, seed: int = 0) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Tiles around `n_clusters` far-apart directions: ids, vectors, cluster of each tile."""
    rng = np.random.default_rng(seed)
    centres = unit(rng.normal(size=(n_clusters, 64)))
    which = np.repeat(np.arange(n_clusters), per)
    vectors = unit(centres[which] + 0.05 * rng.normal(size=(len(which), 64))).astype(np.float32)
    ids = [f"tile-{seed}-{i:05d}" for i in range(len(which))]
    return ids, vectors, which


@pytest.mark.parametrize(
    ("tiles", "k"),
    [(0, 0), (3, 3), (8, 8), (100, 8), (160, 8), (170, 8), (180, 9), (400, 20), (1280, 64), (50_000, 64)],
)
def test_k_is_five_percent_bounded_to_8_and_64_and_never_more_than_the_tiles(tiles, k):
    assert mosaic_size(tiles) == k
    assert mosaic_size(tiles) <= max(tiles, 0)
    assert mosaic_size(10**6) == MOSAIC_MAX and mosaic_size(20) == MOSAIC_MIN


def test_a_slide_with_fewer_tiles_than_k_uses_all_of_them():
    ids, vectors, _ = clustered(2, 3)
    assert choose_mosaic(ids, vectors) == sorted(ids)


def test_the_mosaic_is_deterministic_and_independent_of_the_order_tiles_come_in():
    ids, vectors, _ = clustered(12, 30)
    first = choose_mosaic(ids, vectors)
    assert choose_mosaic(ids, vectors) == first
    order = np.random.default_rng(1).permutation(len(ids))
    assert choose_mosaic([ids[i] for i in order], vectors[order]) == first
    assert len(first) == mosaic_size(len(ids)) == 18


def test_every_planted_kind_of_tissue_gets_a_mosaic_tile():
    ids, vectors, which = clustered(8, 40)  # 320 tiles: k = 16 over 8 far-apart clusters
    chosen = set(choose_mosaic(ids, vectors))
    clusters = {int(which[ids.index(i)]) for i in chosen}
    assert clusters == set(range(8))


def test_kmeans_separates_clear_clusters_and_refuses_a_bad_k():
    _, vectors, which = clustered(4, 25)
    _, labels = kmeans(vectors, 4)
    for c in range(4):
        assert len(set(labels[which == c].tolist())) == 1
    assert len(set(labels.tolist())) == 4
    with pytest.raises(ValueError, match="between 1 and"):
        kmeans(vectors, 0)
    with pytest.raises(ValueError, match="between 1 and"):
        kmeans(vectors, len(vectors) + 1)


def test_duplicate_tiles_do_not_break_the_choice():
    vectors = np.tile(unit(np.ones((1, 16))), (200, 1)).astype(np.float32)
    ids = [f"t{i:04d}" for i in range(200)]
    chosen = choose_mosaic(ids, vectors)
    assert len(chosen) == len(set(chosen)) == mosaic_size(200)
    assert chosen == choose_mosaic(ids, vectors)
