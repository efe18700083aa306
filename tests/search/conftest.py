"""Search fixtures: a tiny CONCH, synthetic slides, and stores filled with their tiles.

The stores are built here by upserting points with the payload that `conchdb ingest`
writes, so search is tested on its own. Vectors are real: every tile of the synthetic
slides is embedded by the tiny model, so image queries cut from a slide must find their
own tile. `make_tiny_model`'s weights put every output within 1e-4 of one direction;
`spread_model` uses larger weights so that rankings are decided by margins well above
float32 noise.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conchdb.catalog import tiles_layout, tiling_key
from conchdb.model.checkpoint import save_checkpoint
from conchdb.model.conch import ConchModel
from conchdb.model.encoder import Encoder
from conchdb.model.tokenizer import ConchTokenizer
from conchdb.store import CollectionSpec, Point, Store, stable_id
from tests.model.conftest import make_tiny_model

BACKENDS = ["edge", "memory"]
QUIET_LOCAL_MODE = pytest.mark.filterwarnings(
    "ignore:Payload indexes have no effect:UserWarning", "ignore:Local mode performs exact:UserWarning"
)
TILE = 64
SLIDE_W, SLIDE_H = 384, 256
SLIDES = {  # slide id -> manifest columns (what `--where` filters on)
    "case_a/s1.png": {"diagnosis": "adenocarcinoma", "grade": 1, "age": 61.5, "consented": True, "site": "colon"},
    "case_a/s2.png": {"diagnosis": "adenoma", "grade": 2, "age": 47.0, "consented": False, "site": "rectum"},
    "case_b/s3.png": {"diagnosis": "normal", "grade": 3, "age": 70.25, "consented": True},
}
MANIFEST_COLUMNS = {"diagnosis": "string", "grade": "int", "age": "float", "consented": "bool", "site": "string"}
SCHEMA = tiles_layout(MANIFEST_COLUMNS).fields
"""The payload fields ingest declares for a cohort with these manifest columns."""
TILING = tiling_key(0.5, TILE, TILE)


def spread_model(seed: int = 0) -> ConchModel:
    """`make_tiny_model` with its random deviations four times larger, so that outputs differ
    enough between inputs for rankings to be decided by margins, not rounding."""
    model = make_tiny_model(seed)
    with torch.no_grad():
        for param in model.parameters():
            centre = 1.0 if param.ndim == 1 and param.numel() > 1 else 0.0
            param.sub_(centre).mul_(4.0).add_(centre)
        model.logit_scale.fill_(4.0)
    return model


@pytest.fixture(scope="session")
def encoder(tokenizer_path: Path) -> Encoder:
    return Encoder.from_model(spread_model(), ConchTokenizer(tokenizer_path), device="cpu", precision="fp32")


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """`spread_model` as a checkpoint file, for the CLI's --checkpoint."""
    path = tmp_path_factory.mktemp("ckpt") / "spread.bin"
    save_checkpoint(spread_model(), path)
    return path


def make_slide_image(seed: int) -> Image.Image:
    """A plain image with a distinct colour and texture in every 64-px cell."""
    rng = np.random.default_rng(seed)
    pixels = np.empty((SLIDE_H, SLIDE_W, 3), dtype=np.uint8)
    for y in range(0, SLIDE_H, TILE):
        for x in range(0, SLIDE_W, TILE):
            base = rng.integers(40, 220, size=3)
            noise = rng.normal(0, rng.uniform(5, 60), size=(TILE, TILE, 3))
            stripes = (np.sin(np.arange(TILE) / rng.uniform(1, 8))[:, None, None] * rng.uniform(0, 50))
            pixels[y : y + TILE, x : x + TILE] = np.clip(base + noise + stripes, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


@dataclass
class Corpus:
    """The synthetic cohort: slide files, and the points written for their tiles."""

    root: Path
    points: list[Point]

    @property
    def vectors(self) -> np.ndarray:
        return np.stack([p.vector for p in self.points])

    def ids(self) -> list[str]:
        return [p.id for p in self.points]

    def tile(self, index: int) -> Image.Image:
        """The pixels of point `index`, cut from its slide file as ingest cuts tiles."""
        p = self.points[index].payload
        with Image.open(p["path"]) as image:
            return image.convert("RGB").crop((p["x"], p["y"], p["x"] + TILE, p["y"] + TILE))


def build_corpus(root: Path, encoder: Encoder) -> Corpus:
    root.mkdir(parents=True, exist_ok=True)
    points = []
    for n, (slide_id, columns) in enumerate(SLIDES.items()):
        path = root / slide_id
        path.parent.mkdir(parents=True, exist_ok=True)
        make_slide_image(n).save(path)
        pixels = np.asarray(Image.open(path).convert("RGB"))
        coords = [(x, y) for y in range(0, SLIDE_H, TILE) for x in range(0, SLIDE_W, TILE)]
        tiles = np.stack([pixels[y : y + TILE, x : x + TILE] for x, y in coords])
        vectors = encoder.encode_tiles(tiles)
        for i, ((x, y), vector) in enumerate(zip(coords, vectors, strict=True)):
            payload = {
                "slide_id": slide_id, "path": str(path), "cohort": "synthetic", "x": x, "y": y, "size": TILE,
                "mpp": 0.5, "mpp_source": "manifest", "target_mpp": 0.5, "tile_px": TILE,
                "tissue": round(0.3 + 0.7 * ((i * 7) % 10) / 10, 2), "tiling": TILING, "ingest_run": "test",
                **columns,
            }
            points.append(Point(stable_id("test-tile", slide_id, x, y), vector, payload))
    return Corpus(root, points)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory, encoder) -> Corpus:
    return build_corpus(tmp_path_factory.mktemp("cohort"), encoder)


def fill_store(store: Store, name: str, corpus: Corpus, encoder: Encoder, schema: bool = True) -> None:
    """A tiles collection as ingest leaves it, its payload fields indexed (the store reports
    them as `payload_schema`); `schema=False` makes one that declares no fields, hence no schema."""
    metadata = {**encoder.describe(), "tiling": {"target_mpp": 0.5, "tile_px": TILE}}
    fields = dict(SCHEMA) if schema else {}
    store.ensure_collection(CollectionSpec(name, 512, metadata, fields))  # type: ignore[arg-type]
    store.upsert(name, corpus.points)


def open_backend(kind: str, folder: Path) -> Store:
    if kind == "edge":
        from conchdb.store.edge import EdgeStore

        return EdgeStore(folder / "store")
    from qdrant_client import QdrantClient

    from conchdb.store.server import ServerStore

    return ServerStore(client=QdrantClient(":memory:"))


@pytest.fixture(scope="module", params=BACKENDS)
def filled(request, tmp_path_factory, corpus, encoder) -> Iterator[tuple[Store, str]]:
    """A store of each backend holding the corpus, shared by a module's read-only tests."""
    store = open_backend(request.param, tmp_path_factory.mktemp(f"search-{request.param}"))
    name = f"tiles_{uuid.uuid4().hex[:8]}"
    fill_store(store, name, corpus, encoder)
    yield store, name
    store.close()


@pytest.fixture(scope="session")
def store_template(tmp_path_factory, corpus, encoder) -> Path:
    from conchdb.store.edge import EdgeStore

    folder = tmp_path_factory.mktemp("store-template") / "store"
    with EdgeStore(folder) as store:
        fill_store(store, "conch_tiles", corpus, encoder)
    return folder


@pytest.fixture
def store_dir(tmp_path, store_template) -> Path:
    """An embedded store folder holding the corpus (a fresh copy per test), closed so that
    the CLI can open it."""
    folder = tmp_path / "store"
    shutil.copytree(store_template, folder)
    return folder
