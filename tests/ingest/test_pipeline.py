"""`conchdb ingest` end to end on real slides, with a tiny CONCH (same classes, 512-d)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conchdb.catalog import DICOM_FIELDS, MOSAIC_FIELD, SLIDE_FIELDS, TILE_FIELDS, TILE_INDEXED, slides_collection
from conchdb.cli import app
from conchdb.ingest.pipeline import IngestOptions, Progress, ingest
from conchdb.model.checkpoint import save_checkpoint
from conchdb.model.encoder import Encoder
from conchdb.slides.pyramid import write_pyramid_tiff
from conchdb.slides.slide import open_slide
from conchdb.store import Condition, Filter
from conchdb.store.edge import EdgeStore
from tests.model.conftest import make_tiny_model

runner = CliRunner()
COLLECTION = "conch_tiles"
MANIFEST_COLUMNS = {"patient_id", "diagnosis", "site", "grade", "frozen"}  # the cohort fixture's manifest


@pytest.fixture(scope="module")
def pyramid_tiff(slides_dir, tmp_path_factory) -> Path:
    """A two-level pyramidal TIFF (0.499 and 0.998 µm/px) made from the real Aperio region."""
    with open_slide(slides_dir / "cmu_small_region.svs") as slide:
        w, h = slide.dimensions
        rgb = np.asarray(slide.read_region((0, 0), 0, (w, h)).convert("RGB"))
    path = tmp_path_factory.mktemp("tif") / "cmu_pyramid.tif"
    write_pyramid_tiff(path, [rgb, rgb[::2, ::2]], mpp=0.499)
    return path


@pytest.fixture
def cohort(tmp_path, slides_dir, pyramid_tiff) -> Path:
    root = tmp_path / "cohortA"
    (root / "batch2").mkdir(parents=True)
    shutil.copy(slides_dir / "cmu_small_region.svs", root / "cmu_small_region.svs")
    shutil.copy(pyramid_tiff, root / "batch2" / "cmu_pyramid.tif")
    shutil.copy(slides_dir / "boxes.png", root / "boxes.png")
    shutil.copy(slides_dir / "unreadable.svs", root / "unreadable.svs")
    shutil.copy(slides_dir / "unopenable.tiff", root / "unopenable.tiff")
    (root / "README.txt").write_text("not a slide\n")
    (root / "manifest.csv").write_text(textwrap.dedent("""\
        slide,patient_id,diagnosis,site,grade,frozen
        cmu_small_region.svs,P001,melanoma,skin,2,false
        batch2/cmu_pyramid.tif,P001,melanoma,skin,3,true
        boxes.png,P002,normal,colon,1,false
        """))
    return root


def _ingest(root: Path, store: Path, ckpt: Path, *extra: str):
    args = ["ingest", str(root), "--store", str(store), "--checkpoint", str(ckpt), "--device", "cpu",
            "--batch-size", "4", "--json", *extra]
    result = runner.invoke(app, args)
    assert "Traceback" not in result.output
    return result.exit_code, json.loads(result.stdout.strip().splitlines()[-1])


def _catalogued(payload: dict, fields: dict) -> bool:
    """The payload holds the catalog's fields and the manifest's columns, and nothing else; a
    plain image without a pixel size (the whole-image tile of boxes.png) has no `mpp`, and
    only a slide's mosaic tiles carry the mosaic mark (true)."""
    if payload.get(MOSAIC_FIELD, True) is not True:
        return False
    return set(fields) - {"mpp", MOSAIC_FIELD} | MANIFEST_COLUMNS <= set(payload) <= set(fields) | MANIFEST_COLUMNS


def _points(store_path: Path) -> dict[str, tuple[dict, np.ndarray]]:
    store = EdgeStore(store_path)
    try:
        return {h.id: (h.payload, h.vector) for h in store.scroll(COLLECTION, with_vectors=True)}
    finally:
        store.close()


def test_cohort_ingest_rerun_fix_and_force(cohort, tmp_path, tiny_ckpt):
    store = tmp_path / "store"
    code, doc = _ingest(cohort, store, tiny_ckpt)
    assert code == 3
    assert doc["ingested"] == 3 and doc["not_slides"] == 1  # README.txt; the manifest is not counted
    failed = {Path(f["slide"]).name: f["error"] for f in doc["failed"]}
    assert set(failed) == {"unreadable.svs", "unopenable.tiff"}
    assert "Bogus marker length" in failed["unreadable.svs"]
    assert "Unsupported TIFF compression" in failed["unopenable.tiff"]

    first = _points(store)
    assert len(first) == doc["tiles_written"] > 3
    by_slide: dict[str, list[dict]] = {}
    for payload, vector in first.values():
        assert _catalogued(payload, TILE_FIELDS), "the catalog names every field a tile carries"
        by_slide.setdefault(payload["slide_id"], []).append(payload)
        assert vector.shape == (512,) and abs(np.linalg.norm(vector) - 1) < 1e-4
    assert set(by_slide) == {"cmu_small_region.svs", "batch2/cmu_pyramid.tif", "boxes.png"}
    assert len(by_slide["boxes.png"]) == 1  # a plain image without a pixel size is one whole tile
    tile = by_slide["cmu_small_region.svs"][0]
    assert tile["patient_id"] == "P001" and tile["diagnosis"] == "melanoma" and tile["site"] == "skin"
    assert tile["grade"] == 2 and tile["frozen"] is False
    assert tile["mpp"] == pytest.approx(0.499) and tile["mpp_source"]
    assert tile["target_mpp"] == 0.5 and tile["tile_px"] == 512 and tile["cohort"] == "cohortA"
    assert tile["size"] == round(512 * 0.5 / 0.499) and 0.25 <= tile["tissue"] <= 1
    assert by_slide["batch2/cmu_pyramid.tif"][0]["grade"] == 3
    # The same tissue at the same physical resolution tiles the same way in both files.
    grid = sorted((p["x"], p["y"]) for p in by_slide["cmu_small_region.svs"])
    assert grid == sorted((p["x"], p["y"]) for p in by_slide["batch2/cmu_pyramid.tif"])

    code, doc = _ingest(cohort, store, tiny_ckpt)
    assert code == 3 and doc["skipped"] == 3 and doc["tiles_written"] == 0 and len(doc["failed"]) == 2
    second = _points(store)
    assert second.keys() == first.keys()

    (cohort / "unreadable.svs").unlink()
    (cohort / "unopenable.tiff").unlink()
    code, doc = _ingest(cohort, store, tiny_ckpt)
    assert code == 0 and doc["failed"] == [] and doc["skipped"] == 3

    code, doc = _ingest(cohort, store, tiny_ckpt, "--force")
    assert code == 0 and doc["ingested"] == 3
    forced = _points(store)
    assert forced.keys() == first.keys()
    for pid, (payload, vector) in forced.items():
        assert payload["ingest_run"] != first[pid][0]["ingest_run"]
        np.testing.assert_allclose(vector, first[pid][1], atol=1e-5)

    result = runner.invoke(app, ["stats", "--store", str(store), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    tiles = next(c for c in stats["collections"] if c["name"] == COLLECTION)
    assert tiles["points"] == len(first)
    assert tiles["slides_by_status"] == {"done": 3, "failed": 2}
    assert tiles["metadata"]["tiling"]["target_mpp"] == 0.5
    floor = tiles["metadata"]["noise_floor"]  # measured at the end of the run, on the stored tiles
    assert floor["slides"] == 3 and floor["quantile"] == 0.99 and -1 <= floor["value"] <= 1


def test_another_checkpoint_is_refused_and_nothing_is_lost(cohort, tmp_path, tiny_ckpt):
    for bad in ("unreadable.svs", "unopenable.tiff"):
        (cohort / bad).unlink()
    store = tmp_path / "store"
    code, _ = _ingest(cohort, store, tiny_ckpt)
    assert code == 0
    before = _points(store)
    other = tmp_path / "other.bin"
    save_checkpoint(make_tiny_model(1), other)
    result = runner.invoke(app, ["ingest", str(cohort), "--store", str(store), "--checkpoint", str(other)])
    assert result.exit_code == 2
    assert "fingerprint" in result.output and "--collection" in result.output
    assert "Traceback" not in result.output
    assert _points(store).keys() == before.keys()


def test_bad_manifest_stops_before_any_work(cohort, tmp_path, tiny_ckpt):
    (cohort / "manifest.csv").write_text("patient,diagnosis\nP1,x\n")
    result = runner.invoke(app, ["ingest", str(cohort), "--store", str(tmp_path / "s"), "--checkpoint", str(tiny_ckpt)])
    assert result.exit_code == 2
    assert "manifest.csv" in result.output and "slide" in result.output
    assert not (tmp_path / "s").exists()


def test_interrupted_run_resumes_to_the_same_points(cohort, tmp_path, tiny_ckpt):
    for bad in ("unreadable.svs", "unopenable.tiff"):
        (cohort / bad).unlink()
    encoder = Encoder.load(str(tiny_ckpt), device="cpu", need_tokenizer=False)
    options = IngestOptions(batch_size=3, readers=1)

    reference = EdgeStore(tmp_path / "reference")
    ingest(cohort, encoder, reference, COLLECTION, options=options)
    expected = {h.id: h.payload for h in reference.scroll(COLLECTION)}
    reference.close()

    seen = [0]

    def interrupt(n: int) -> None:
        seen[0] += 1
        if seen[0] == 2:
            raise KeyboardInterrupt

    store = EdgeStore(tmp_path / "store")
    with pytest.raises(KeyboardInterrupt):
        ingest(cohort, encoder, store, COLLECTION, options=options, progress=Progress(on_batch=interrupt))
    statuses = {h.payload["slide_id"]: h.payload["status"] for h in store.scroll(slides_collection(COLLECTION))}
    assert "in_progress" in statuses.values()
    summary = ingest(cohort, encoder, store, COLLECTION, options=options)
    assert summary.exit_code == 0
    got = {h.id: h.payload for h in store.scroll(COLLECTION)}
    store.close()
    assert got.keys() == expected.keys()
    strip = lambda p: {k: v for k, v in p.items() if k != "ingest_run"}  # noqa: E731
    assert all(strip(got[k]) == strip(expected[k]) for k in got)


KILLER = """
import os, signal, sys
from conchdb.ingest.pipeline import IngestOptions, Progress, ingest
from conchdb.model.encoder import Encoder
from conchdb.store.edge import EdgeStore
cohort, ckpt, store = sys.argv[1:4]
encoder = Encoder.load(ckpt, device="cpu", need_tokenizer=False)
seen = [0]
def on_batch(n):
    seen[0] += 1
    if seen[0] == 3:  # in the middle of the first slide, after its first writes
        os.kill(os.getpid(), signal.SIGKILL)
ingest(cohort, encoder, EdgeStore(store), "conch_tiles", options=IngestOptions(batch_size=2, readers=1),
       progress=Progress(on_batch=on_batch))
"""


def test_killed_process_then_rerun_equals_uninterrupted_run(cohort, tmp_path, tiny_ckpt):
    for bad in ("unreadable.svs", "unopenable.tiff"):
        (cohort / bad).unlink()
    killed = subprocess.run(
        [sys.executable, "-c", KILLER, str(cohort), str(tiny_ckpt), str(tmp_path / "store")],
        capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.getcwd()},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    code, doc = _ingest(cohort, tmp_path / "store", tiny_ckpt)
    assert code == 0 and doc["ingested"] == 3
    code, _ = _ingest(cohort, tmp_path / "reference", tiny_ckpt)
    assert code == 0
    resumed, reference = _points(tmp_path / "store"), _points(tmp_path / "reference")
    assert resumed.keys() == reference.keys()
    for pid, (payload, vector) in resumed.items():
        np.testing.assert_allclose(vector, reference[pid][1], atol=1e-5)
        assert payload["x"] == reference[pid][0]["x"] and payload["slide_id"] == reference[pid][0]["slide_id"]


def test_replaced_file_is_redone_and_old_tiles_removed(cohort, tmp_path, tiny_ckpt, slides_dir):
    for bad in ("unreadable.svs", "unopenable.tiff"):
        (cohort / bad).unlink()
    store = tmp_path / "store"
    assert _ingest(cohort, store, tiny_ckpt)[0] == 0
    before = _points(store)
    # Replace the PNG by another picture under the same name: the slide must be redone.
    from PIL import Image

    Image.new("RGB", (300, 200), (200, 80, 150)).save(cohort / "boxes.png")
    code, doc = _ingest(cohort, store, tiny_ckpt)
    assert code == 0 and doc["ingested"] == 1 and doc["skipped"] == 2
    after = _points(store)
    old = {k for k, (p, _) in before.items() if p["slide_id"] == "boxes.png"}
    new = {k for k, (p, _) in after.items() if p["slide_id"] == "boxes.png"}
    assert len(new) == 1 and not (old & new)
    assert len(after) == len(before)


def test_filters_on_manifest_fields(cohort, tmp_path, tiny_ckpt):
    for bad in ("unreadable.svs", "unopenable.tiff"):
        (cohort / bad).unlink()
    store_path = tmp_path / "store"
    assert _ingest(cohort, store_path, tiny_ckpt)[0] == 0
    store = EdgeStore(store_path)
    try:
        site = store.count(COLLECTION, Filter((Condition("site", "eq", "colon"),)))
        grade = store.count(COLLECTION, Filter((Condition("grade", "gte", 2),)))
        total = store.count(COLLECTION)
        # tissue has no payload index: the engine reads it from the payloads.
        values = sorted(h.payload["tissue"] for h in store.scroll(COLLECTION))
        cut = values[len(values) // 2]
        tissue = store.count(COLLECTION, Filter((Condition("tissue", "gte", str(cut)),)))
        schema = store.collection_metadata(COLLECTION)["payload_schema"]
        built = set(store._shard(COLLECTION).info().payload_schema)
        records = [h.payload for h in store.scroll(slides_collection(COLLECTION))]
    finally:
        store.close()
    assert site == 1 and grade == total - 1 and tissue == sum(v >= cut for v in values) > 0
    record = json.loads((store_path / "collections" / COLLECTION / "collection.json").read_text())
    manifest_columns = set(schema) - set(TILE_FIELDS) - set(DICOM_FIELDS)
    assert {"site", "grade", "diagnosis"} <= manifest_columns
    assert set(record["indexed"]) == set(schema) >= {*TILE_INDEXED, *DICOM_FIELDS, *manifest_columns}
    # Written with only slide_id indexed; the ingest's end built the others.
    assert built == set(record["indexed"])
    assert len(records) == 3 and all(_catalogued(r, SLIDE_FIELDS) for r in records)
