"""Slide search end to end on the real Aperio slide: ingest marks mosaics, and a slide file
that is not in the store finds its stored copy first."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conchdb.archive.mosaic import mosaic_size
from conchdb.catalog import MOSAIC_FIELD
from conchdb.cli import app
from conchdb.slides.slide import open_slide
from conchdb.store.edge import EdgeStore

runner = CliRunner()
CMU_MPP = 0.499


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, slides_dir) -> Path:
    """The CMU slide under another name, and two slides of the same tissue made different
    (transposed, colour channels permuted), one patient each."""
    root = tmp_path_factory.mktemp("slide-file") / "cohort"
    root.mkdir()
    shutil.copy(slides_dir / "cmu_small_region.svs", root / "archived_copy.svs")
    with open_slide(slides_dir / "cmu_small_region.svs") as slide:
        rgb = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    dpi = (25400 / CMU_MPP, 25400 / CMU_MPP)
    Image.fromarray(np.ascontiguousarray(rgb.transpose(1, 0, 2)[..., [1, 2, 0]])).save(root / "other_a.png", dpi=dpi)
    Image.fromarray(np.ascontiguousarray(rgb[::-1, :, [2, 0, 1]])).save(root / "other_b.png", dpi=dpi)
    (root / "manifest.csv").write_text(textwrap.dedent("""\
        slide,patient_id,diagnosis
        archived_copy.svs,P1,melanoma
        other_a.png,P1,naevus
        other_b.png,P2,naevus
        """))
    return root


@pytest.fixture(scope="module")
def ingested(cohort, checkpoint, tmp_path_factory) -> Path:
    store = tmp_path_factory.mktemp("slide-file-store") / "store"
    args = ["ingest", str(cohort), "--store", str(store), "--checkpoint", str(checkpoint), "--device", "cpu",
            "--readers", "1", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.strip().splitlines()[-1])["ingested"] == 3
    return store


@pytest.fixture
def env(monkeypatch, tmp_path):
    monkeypatch.setenv("CONCHDB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CONCHDB_QDRANT_URL", raising=False)


def test_ingest_marks_each_slide_mosaic_and_conchdb_mosaic_agrees(ingested, env):
    with EdgeStore(ingested) as store:
        tiles = list(store.scroll("conch_tiles"))
    by_slide: dict[str, list] = {}
    for hit in tiles:
        by_slide.setdefault(hit.payload["slide_id"], []).append(hit)
    assert set(by_slide) == {"archived_copy.svs", "other_a.png", "other_b.png"}
    for slide_tiles in by_slide.values():
        marked = [h for h in slide_tiles if h.payload.get(MOSAIC_FIELD) is True]
        assert len(marked) == mosaic_size(len(slide_tiles))
        assert all(MOSAIC_FIELD not in h.payload for h in slide_tiles if h not in marked)
        assert all(h.payload["diagnosis"] for h in marked)  # the mark kept the manifest fields
    result = runner.invoke(app, ["mosaic", "--store", str(ingested), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["slides"], doc["newly_marked"], doc["unmarked"]) == (3, 0, 0)


def test_a_slide_file_finds_its_stored_copy_first(ingested, env, slides_dir, checkpoint, tmp_path):
    result = runner.invoke(app, [
        "search", "--slide-file", str(slides_dir / "cmu_small_region.svs"), "--store", str(ingested),
        "--checkpoint", str(checkpoint), "--device", "cpu", "--json", "--export", str(tmp_path / "gallery"),
    ])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc[0]["slide_id"] == "archived_copy.svs"
    assert doc[0]["score"] >= 0.99
    assert doc[0]["score"] > doc[1]["score"]
    assert doc[0]["payload"]["diagnosis"] == "melanoma"
    assert {d["slide_id"] for d in doc} == {"archived_copy.svs", "other_a.png", "other_b.png"}
    best = doc[0]["matched_tiles"][0]
    assert (best["x"], best["y"]) == (best["query_x"], best["query_y"])  # the same tile, found in the copy
    index = (tmp_path / "gallery" / "index.html").read_text()
    assert "archived_copy.svs" in index and "cosine" in index
    assert len(list((tmp_path / "gallery").glob("*.jpg"))) >= 6


def test_a_stored_slide_never_finds_its_own_patient(ingested, env):
    result = runner.invoke(app, ["search", "--slide", "archived_copy.svs", "--exclude-same", "patient_id",
                                 "--store", str(ingested), "--json"])
    assert result.exit_code == 0, result.output
    assert [d["slide_id"] for d in json.loads(result.stdout)] == ["other_b.png"]
