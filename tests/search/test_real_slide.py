"""Image -> image on a real Aperio slide, ingested with `conchdb ingest` and the full synthetic CONCH.

The query tile is cut here with OpenSlide and Pillow alone, as a user would cut one from a
viewer: the stored tile's level-0 square, resized to the tile side. Searching with it must
find that very tile first: ingest and search agree on coordinates, resolution and model.
"""

from __future__ import annotations

import json
import shutil

import openslide
import pytest
from PIL import Image
from typer.testing import CliRunner

from conchdb.cli import app
from conchdb.store.edge import EdgeStore

runner = CliRunner()


@pytest.mark.slow
def test_a_tile_cut_from_the_slide_finds_its_stored_tile_first(
    tmp_path, monkeypatch, slides_dir, synthetic_checkpoint, tokenizer_path
):
    monkeypatch.setenv("CONCHDB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CONCHDB_QDRANT_URL", raising=False)
    cohort = tmp_path / "cohort"
    cohort.mkdir()
    shutil.copy(slides_dir / "cmu_small_region.svs", cohort / "cmu.svs")
    model = ["--checkpoint", str(synthetic_checkpoint), "--tokenizer", str(tokenizer_path), "--device", "cpu",
             "--precision", "fp32", "--store", str(tmp_path / "store")]
    result = runner.invoke(app, ["ingest", str(cohort), "--readers", "1", "--json", *model])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["tiles_written"] >= 4

    with EdgeStore(tmp_path / "store") as store:
        tiles = sorted(store.scroll("conch_tiles"), key=lambda h: (h.payload["y"], h.payload["x"]))
    target = tiles[len(tiles) // 2]
    p = target.payload
    assert p["slide_id"] == "cmu.svs" and p["size"] == 513 and p["tile_px"] == 512  # 512 px at 0.5 of 0.499 µm/px
    with openslide.OpenSlide(str(cohort / "cmu.svs")) as slide:
        region = slide.read_region((p["x"], p["y"]), 0, (p["size"], p["size"])).convert("RGB")
    region.resize((p["tile_px"], p["tile_px"]), Image.Resampling.LANCZOS).save(tmp_path / "T.png")

    result = runner.invoke(app, ["search", "--image", str(tmp_path / "T.png"), "--top-k", "3", "--json", *model])
    assert result.exit_code == 0, result.output
    hits = json.loads(result.stdout)
    assert hits[0]["id"] == target.id
    assert hits[0]["score"] >= 0.999
    assert (hits[0]["x"], hits[0]["y"]) == (p["x"], p["y"])
