"""A collection's noise floor: how close unrelated tissue is, measured on the store itself.

CONCH cosines are not calibrated: in one collection two tiles of unrelated slides may score
0.3, in another 0.6 (stain, scanner and tissue mix all shift the whole distribution). A
hit's score therefore says nothing alone; compared with what random pairs of tiles from
different slides reach, it does. The floor is the `QUANTILE` of the cosine between such
pairs, drawn with a fixed seed from a bounded sample of tiles, so two runs over the same
collection record the same value and a million-tile collection costs a few milliseconds.
A hit below it is no closer to the query than tissue chosen at random is to other tissue:
search marks it weak instead of presenting it as a match.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from conchdb.store import Store

NOISE_FLOOR_FIELD = "noise_floor"
QUANTILE = 0.99
SAMPLE_TILES = 4000
"""Tiles read (the first in id order: ids are uuid5 hashes, so this is an unbiased sample)."""
PAIRS = 20_000
SEED = 0


@dataclass(frozen=True)
class NoiseFloor:
    """The recorded floor: its value, and how it was measured (so it can be judged)."""

    value: float
    quantile: float
    pairs: int
    tiles: int
    slides: int
    measured_at: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_metadata(cls, metadata: dict[str, Any] | None) -> NoiseFloor | None:
        """The floor a collection's metadata records, or None (none measured, or unreadable)."""
        data = (metadata or {}).get(NOISE_FLOOR_FIELD)
        if not isinstance(data, dict) or not isinstance(data.get("value"), (int, float)):
            return None
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except (KeyError, TypeError):
            return cls(float(data["value"]), float(data.get("quantile", QUANTILE)), 0, 0, 0, "")


def measure_noise_floor(
    vectors: np.ndarray, slides: list[Any], *, quantile: float = QUANTILE, pairs: int = PAIRS, seed: int = SEED
) -> NoiseFloor | None:
    """The `quantile` of the cosine between random pairs of rows from different slides;
    None when fewer than two slides are present (there is no unrelated pair to measure)."""
    keys = np.unique(np.asarray([str(s) for s in slides]), return_inverse=True)[1]
    if len(vectors) < 2 or keys.max(initial=0) < 1:
        return None
    rng = np.random.default_rng(seed)
    a = rng.integers(len(vectors), size=pairs * 2)
    b = rng.integers(len(vectors), size=pairs * 2)
    keep = keys[a] != keys[b]
    a, b = a[keep][:pairs], b[keep][:pairs]
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    cosines = np.einsum("ij,ij->i", unit[a], unit[b])
    return NoiseFloor(
        value=round(float(np.quantile(cosines, quantile)), 6), quantile=quantile, pairs=int(len(a)),
        tiles=int(len(vectors)), slides=int(keys.max() + 1), measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


def sample_tiles(store: Store, collection: str, *, sample: int = SAMPLE_TILES) -> list[Any]:
    """The first `sample` tiles in id order, with vectors: a hash-random, repeatable sample."""
    return [t for t in itertools.islice(store.scroll(collection, with_vectors=True), sample) if t.vector is not None]


def measure_text_floor(texts: np.ndarray, tiles: np.ndarray, *, slides: int = 0,
                       quantile: float = QUANTILE) -> NoiseFloor | None:
    """The floor for text queries: the `quantile` of the cosine between a set of unrelated texts
    (e.g. a vocabulary of histology terms) and a sample of the collection's tiles.

    A text and an image of the same thing are far less alike in CONCH than two images are, so
    the tile-to-tile floor would mark every text hit weak; a text query is instead compared
    with what arbitrary histology phrases score on arbitrary tissue of this collection."""
    if not len(texts) or not len(tiles):
        return None
    cosines = (np.asarray(texts, dtype=np.float32) @ np.asarray(tiles, dtype=np.float32).T).ravel()
    return NoiseFloor(
        value=round(float(np.quantile(cosines, quantile)), 6), quantile=quantile, pairs=int(cosines.size),
        tiles=int(len(tiles)), slides=slides, measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    )


def record_noise_floor(store: Store, collection: str, *, sample: int = SAMPLE_TILES) -> NoiseFloor | None:
    """Measure the collection's floor on a sample of its tiles and record it in its metadata
    (left as it was when the collection holds fewer than two slides)."""
    if store.collection_metadata(collection) is None:
        return None
    tiles = sample_tiles(store, collection, sample=sample)
    if not tiles:
        return None
    floor = measure_noise_floor(np.stack([t.vector for t in tiles]), [t.payload.get("slide_id") for t in tiles])
    if floor is not None:
        store.update_metadata(collection, **{NOISE_FLOOR_FIELD: floor.to_dict()})
    return floor
