"""Region queries (`--image PATH+x,y,w,h`) read a slide at the pixel size it was stored with.

A TIFF without a pixel size in its file is ingested with the size from the manifest; a
region of it must then be readable as a query, at that size, and a slide that the store
does not hold takes the size from the caller.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conchdb.archive.records import recorded_mpp
from conchdb.cli import app
from conchdb.errors import QueryError, SlideError
from conchdb.model.checkpoint import save_checkpoint
from conchdb.search import Searcher
from conchdb.slides import TileReader, TilingParams, open_slide, plan_tiles, write_pyramid_tiff
from conchdb.store.edge import EdgeStore
from tests.model.conftest import make_tiny_model
from tests.search.conftest import QUIET_LOCAL_MODE, fill_store, open_backend
from tests.slides.conftest import tissue_blob

pytestmark = QUIET_LOCAL_MODE

runner = CliRunner()
MPP = 0.5
TILE_PX = 128


def _textured(rgb: np.ndarray) -> np.ndarray:
    """Stripes whose direction and frequency change across the slide, so that no two tiles
    look alike (a query must find its own tile, not any of its neighbours)."""
    yy, xx = np.mgrid[: rgb.shape[0], : rgb.shape[1]].astype(np.float64)
    stripes = 40 * np.sin(xx * yy / 4000.0) + 30 * np.cos((xx - yy) * (1 + xx / 200.0) / 30.0)
    shifted = rgb.astype(np.float64) - stripes[..., None] * np.array([0.2, 1.0, 0.5])
    return shifted.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def stored(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A cohort of one pyramidal TIFF with no pixel size in the file (the manifest gives it),
    ingested with a tiny CONCH: (slide, store folder, checkpoint)."""
    root = tmp_path_factory.mktemp("region_mpp")
    checkpoint = root / "tiny.bin"
    save_checkpoint(make_tiny_model(0), checkpoint)
    cohort = root / "cohort"
    cohort.mkdir()
    rgb = _textured(tissue_blob(size=768, radius=300, seed=3))
    slide = write_pyramid_tiff(cohort / "nompp.tif", [rgb, rgb[::2, ::2]], mpp=None)
    (cohort / "manifest.csv").write_text(f"slide,mpp\nnompp.tif,{MPP}\n")
    store = root / "store"
    result = runner.invoke(app, [
        "ingest", str(cohort), "--store", str(store), "--checkpoint", str(checkpoint), "--device", "cpu",
        "--tile-px", str(TILE_PX), "--readers", "0", "--batch-size", "16", "--json",
    ])
    assert result.exit_code == 0, result.output
    return slide, store, checkpoint


def _tiles(store_path: Path) -> list[dict]:
    store = EdgeStore(store_path)
    try:
        return [h.payload for h in store.scroll("conch_tiles")]
    finally:
        store.close()


def test_the_file_itself_has_no_pixel_size(stored):
    slide, store, _ = stored
    with pytest.raises(SlideError, match="no usable pixel size"):
        open_slide(slide)
    assert {(p["mpp"], p["mpp_source"]) for p in _tiles(store)} == {(MPP, "manifest")}


def _middle_tile(store: Path) -> dict:
    tiles = sorted(_tiles(store), key=lambda p: (p["y"], p["x"]))
    return tiles[len(tiles) // 2]


def test_a_region_query_on_the_stored_slide_runs(stored):
    # before the fix: "no usable pixel size", exit 2
    slide, store, checkpoint = stored
    tile = _middle_tile(store)
    spec = f"{tile['path']}+{tile['x']},{tile['y']},{tile['size']},{tile['size']}"
    result = runner.invoke(app, ["search", "--image", spec, "--store", str(store), "--checkpoint", str(checkpoint),
                                 "--device", "cpu", "--top-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    hits = {(h["payload"]["x"], h["payload"]["y"]): h["score"] for h in json.loads(result.stdout)}
    assert hits.get((tile["x"], tile["y"]), 0.0) > 0.9999, "the tile itself is among the nearest"


def test_the_region_holds_the_pixels_its_tile_was_embedded_from(stored):
    slide, store, _ = stored
    tile = _middle_tile(store)
    with open_slide(slide, MPP) as opened:
        _, grid = plan_tiles(opened, TilingParams(target_mpp=MPP, tile_px=TILE_PX))
    index = [(t.x, t.y) for t in grid.tiles].index((tile["x"], tile["y"]))
    batches = TileReader(slide, grid, workers=0, mpp_override=MPP)
    embedded = next(b for b in batches if b.start <= index < b.start + len(b))
    opened_store = EdgeStore(store)
    try:
        query = Searcher(None, opened_store, "conch_tiles").load_image(
            f"{tile['path']}+{tile['x']},{tile['y']},{tile['size']},{tile['size']}"
        )
    finally:
        opened_store.close()
    assert np.array_equal(np.asarray(query), embedded.tiles[index - embedded.start])


def test_a_slide_not_in_the_store_takes_the_pixel_size_from_the_caller(stored, tmp_path):
    slide, store, _ = stored
    elsewhere = shutil.copy(slide, tmp_path / "copy.tif")
    opened = EdgeStore(store)
    try:
        searcher = Searcher(None, opened, "conch_tiles")
        assert searcher.recorded_mpp(elsewhere) is None
        with pytest.raises(SlideError, match="no usable pixel size"):
            searcher.load_image(f"{elsewhere}+0,0,256,256")
        image = searcher.load_image(f"{elsewhere}+0,0,256,256", slide_mpp=0.25)
        assert image.size == (128, 128), "256 level-0 px at 0.25 µm/px are 128 px at the tiles' 0.5 µm/px"
        stored_copy = searcher.load_image(f"{slide}+0,0,256,256")
        assert stored_copy.size == (256, 256) and searcher.recorded_mpp(slide) == MPP
    finally:
        opened.close()


def test_recorded_mpp_matches_the_file_however_its_path_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a").mkdir()
    records = [{"path": "a/s.tif", "mpp": 0.25}, {"path": str(tmp_path / "b.tif"), "mpp": 0.5}, {"path": "c.tif"}]
    assert recorded_mpp(tmp_path / "a" / "s.tif", records) == 0.25
    assert recorded_mpp("./a/../a/s.tif", records) == 0.25
    assert recorded_mpp("b.tif", records) == 0.5
    assert recorded_mpp("c.tif", records) is None, "a record without a pixel size gives none"
    assert recorded_mpp("d.tif", records) is None
    with pytest.raises(QueryError, match="several pixel sizes"):
        recorded_mpp("b.tif", [*records, {"path": "b.tif", "mpp": 0.26}])


@pytest.fixture
def memory_corpus(corpus, encoder, tmp_path):
    """The search corpus in a store that has tiles but no slide records."""
    store = open_backend("edge", tmp_path)
    fill_store(store, "tiles", corpus, encoder)
    yield Searcher(None, store, "tiles"), corpus
    store.close()


def test_without_slide_records_a_stored_tile_gives_the_pixel_size(memory_corpus):
    searcher, corpus = memory_corpus
    payload = corpus.points[0].payload
    assert searcher.recorded_mpp(payload["path"]) == payload["mpp"]
    assert searcher.recorded_mpp(Path(payload["path"]).with_name("not-stored.png")) is None
    assert np.asarray(searcher.load_image(f"{payload['path']}+0,0,8,8")).shape == (8, 8, 3)
