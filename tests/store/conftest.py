"""Store fixtures: every backend the same tests run against, and a small slide-like data set.

`edge` is the embedded store in a temporary folder, `memory` the server store on
`QdrantClient(":memory:")`, and `live` the server store against the Qdrant server named by
CONCHDB_TEST_QDRANT_URL (skipped without it). Collections get unique names so that a live
server shared with other runs is left as it was found.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conchdb.store import CollectionSpec, Point, Store, stable_id

BACKENDS = ["edge", "memory", "live"]
# qdrant-client's local mode warns that it ignores payload indexes and search params; it is
# only the in-process stand-in for a server here, so the tests silence exactly those warnings.
QUIET_LOCAL_MODE = pytest.mark.filterwarnings(
    "ignore:Payload indexes have no effect:UserWarning", "ignore:Local mode performs exact:UserWarning"
)
LIVE_URL = os.environ.get("CONCHDB_TEST_QDRANT_URL")
DIM = 32
N = 240
FIELDS = {"slide_id": "keyword", "site": "keyword", "x": "integer", "tissue": "float", "flag": "bool"}
FINGERPRINT = "sha256:test-model-a"


@dataclass
class Data:
    """The points written to a test collection, and what a numpy search over them should find."""

    ids: list[str]
    vectors: np.ndarray  # unit rows, as the store keeps them
    payloads: list[dict]

    def points(self) -> list[Point]:
        return [Point(i, v, p) for i, v, p in zip(self.ids, self.vectors, self.payloads, strict=True)]

    def scores(self, query: np.ndarray) -> np.ndarray:
        return self.vectors @ (query / np.linalg.norm(query))


def make_data(n: int = N, dim: int = DIM, seed: int = 0) -> Data:
    """Slide-like payloads: 8 slides, integer x, float tissue, bool flag, and a `site` that 15% lack."""
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    sites = ["lung", "breast", "colon"]
    payloads = []
    for i in range(n):
        payload = {
            "slide_id": f"slide-{i % 8}",
            "x": int(i * 16),
            "tissue": round(float(rng.uniform(0.1, 1.0)), 2),
            "flag": bool(i % 3 == 0),
            "note": f"tile {i}",
        }
        if rng.uniform() > 0.15:
            payload["site"] = sites[int(rng.integers(3))]
        payloads.append(payload)
    return Data([stable_id("test-tile", i) for i in range(n)], vectors, payloads)


def spec(name: str, fingerprint: str = FINGERPRINT, dim: int = DIM) -> CollectionSpec:
    return CollectionSpec(
        name=name,
        dim=dim,
        metadata={"model_fingerprint": fingerprint, "tiling": {"target_mpp": 0.5, "tile_px": 512}},
        fields=dict(FIELDS),
    )


def open_backend(kind: str, folder: Path) -> Store:
    if kind == "edge":
        from conchdb.store.edge import EdgeStore

        return EdgeStore(folder / "store")
    from conchdb.store.server import ServerStore

    if kind == "memory":
        from qdrant_client import QdrantClient

        return ServerStore(client=QdrantClient(":memory:"))
    if not LIVE_URL:
        pytest.skip("CONCHDB_TEST_QDRANT_URL is not set: no live Qdrant server to test against")
    return ServerStore(LIVE_URL)


def drop(store: Store, names: list[str]) -> None:
    """Remove test collections from a live server (the other backends vanish with the test)."""
    client = getattr(store, "client", None)
    if client is not None and LIVE_URL and getattr(store, "url", None) == LIVE_URL:
        for name in names:
            client.delete_collection(name)


@pytest.fixture(params=BACKENDS)
def store(request, tmp_path) -> Iterator[Store]:
    """An empty store of each backend, closed after the test."""
    s = open_backend(request.param, tmp_path)
    yield s
    s.close()


@pytest.fixture
def name(store) -> Iterator[str]:
    """A fresh collection name for this test, dropped afterwards from a live server."""
    value = f"test_{uuid.uuid4().hex[:10]}"
    yield value
    drop(store, [value])


@pytest.fixture(scope="module")
def data() -> Data:
    return make_data()


@pytest.fixture(scope="module", params=BACKENDS)
def filled(request, tmp_path_factory, data) -> Iterator[tuple[Store, str]]:
    """A store holding `data` in one collection, shared by the read-only tests of a module."""
    s = open_backend(request.param, tmp_path_factory.mktemp(f"filled-{request.param}"))
    collection = f"test_{uuid.uuid4().hex[:10]}"
    s.ensure_collection(spec(collection))
    s.upsert(collection, data.points())
    yield s, collection
    drop(s, [collection])
    s.close()
