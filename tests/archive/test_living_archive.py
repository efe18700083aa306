"""A living archive: labels corrected, columns added, slides moved and deleted, and the store
stays true without re-embedding (the in-process run; tests/workers covers the broker run)."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conchdb.api import ApiSettings, create_app
from conchdb.archive import SlideCatalog
from conchdb.catalog import slides_collection
from conchdb.cli import app
from conchdb.ingest.pipeline import IngestOptions, ingest
from conchdb.model.checkpoint import save_checkpoint
from conchdb.model.encoder import Encoder
from conchdb.search import Searcher
from conchdb.store import Condition, Filter
from conchdb.store.edge import EdgeStore
from tests.model.conftest import make_tiny_model

COLLECTION = "conch_tiles"
OPTIONS = IngestOptions(batch_size=4, readers=1)
runner = CliRunner()


class ModelMustNotRun:
    """Stands in for the encoder on a rerun that must embed nothing: it can name the model
    (dim, fingerprint and its aliases, description) but fails the test the moment anything else is asked."""

    def __init__(self, real: Encoder):
        self._real = real

    @property
    def dim(self) -> int:
        return self._real.dim

    @property
    def fingerprint(self) -> str:
        return self._real.fingerprint

    @property
    def aliases(self) -> tuple[str, ...]:
        return self._real.aliases

    def describe(self) -> dict:
        return self._real.describe()

    def __getattr__(self, name: str):
        raise AssertionError(f"the model was used ({name}) on a rerun that needs no embedding")


@pytest.fixture(scope="module")
def encoder(tmp_path_factory) -> Encoder:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.bin"
    save_checkpoint(make_tiny_model(0), path)
    return Encoder.load(str(path), device="cpu", need_tokenizer=False)


@pytest.fixture
def cohort(tmp_path, slides_dir) -> Path:
    root = tmp_path / "cohort"
    root.mkdir()
    shutil.copy(slides_dir / "cmu_small_region.svs", root / "a.svs")  # a dozen tiles
    shutil.copy(slides_dir / "boxes.png", root / "b.png")  # 1 tile
    (root / "manifest.csv").write_text("slide,diagnosis,patient_id\na.svs,benign,P1\nb.png,normal,P2\n")
    return root


def run(root: Path, store_path: Path, model) -> dict:
    store = EdgeStore(store_path)
    try:
        return ingest(root, model, store, COLLECTION, options=OPTIONS).to_dict()
    finally:
        store.close()


def points(store_path: Path) -> dict[str, tuple[dict, np.ndarray]]:
    store = EdgeStore(store_path)
    try:
        return {h.id: (h.payload, h.vector) for h in store.scroll(COLLECTION, with_vectors=True)}
    finally:
        store.close()


def records(store_path: Path) -> list[dict]:
    store = EdgeStore(store_path)
    try:
        return SlideCatalog(store, COLLECTION).records()
    finally:
        store.close()


def count(store_path: Path, *conditions: Condition) -> int:
    store = EdgeStore(store_path)
    try:
        return store.count(COLLECTION, Filter(conditions))
    finally:
        store.close()


def test_a_changed_manifest_relabels_tiles_and_records_in_place(cohort, tmp_path, encoder):
    store = tmp_path / "store"
    assert run(cohort, store, encoder)["ingested"] == 2
    before = points(store)
    (cohort / "manifest.csv").write_text("slide,diagnosis,site\na.svs,malignant,skin\nb.png,normal,colon\n")
    summary = run(cohort, store, ModelMustNotRun(encoder))
    assert summary["relabelled"] == ["a.svs", "b.png"] and summary["skipped"] == 2 and summary["tiles_written"] == 0
    after = points(store)
    assert after.keys() == before.keys()
    for pid, (payload, vector) in after.items():
        assert np.array_equal(vector, before[pid][1]), "no vector may change"
        old = before[pid][0]
        want = {k: v for k, v in old.items() if k != "patient_id"}  # the column the manifest dropped
        want.update({"a.svs": {"diagnosis": "malignant", "site": "skin"},
                     "b.png": {"diagnosis": "normal", "site": "colon"}}[old["slide_id"]])
        assert payload == want
    a_tiles = sum(p["slide_id"] == "a.svs" for p, _ in before.values())
    assert count(store, Condition("diagnosis", "eq", "malignant")) == a_tiles > 1
    assert count(store, Condition("diagnosis", "eq", "benign")) == 0
    assert count(store, Condition("site", "eq", "colon")) == 1
    by_slide = {r["slide_id"]: r for r in records(store)}
    assert by_slide["a.svs"]["diagnosis"] == "malignant" and "patient_id" not in by_slide["a.svs"]
    assert by_slide["a.svs"]["manifest_columns"] == ["diagnosis", "site"]
    # The new column is a declared, indexed field of both collections.
    opened = EdgeStore(store)
    try:
        for name in (COLLECTION, slides_collection(COLLECTION)):
            assert opened.collection_metadata(name)["payload_schema"]["site"] == "keyword"
    finally:
        opened.close()
    assert run(cohort, store, ModelMustNotRun(encoder))["relabelled"] == [], "a second rerun has nothing to change"


def test_a_moved_slide_keeps_its_tiles_and_is_still_served(cohort, tmp_path, encoder):
    store = tmp_path / "store"
    run(cohort, store, encoder)
    before, records_before = points(store), records(store)
    (cohort / "sub").mkdir()
    (cohort / "a.svs").rename(cohort / "sub" / "a.svs")
    summary = run(cohort, store, ModelMustNotRun(encoder))
    assert [(m["from"], m["to"]) for m in summary["moved"]] == [("a.svs", "sub/a.svs")]
    assert summary["missing"] == [] and summary["tiles_written"] == 0
    after = points(store)
    assert after.keys() == before.keys() and len(records(store)) == len(records_before)
    for pid, (payload, vector) in after.items():
        assert np.array_equal(vector, before[pid][1])
        if before[pid][0]["slide_id"] == "a.svs":
            assert payload["slide_id"] == "sub/a.svs" and payload["path"] == str(cohort / "sub" / "a.svs")
            assert payload["diagnosis"] == "benign"
    assert {r["slide_id"] for r in records(store)} == {"sub/a.svs", "b.png"}
    moved_tile = next(pid for pid, (p, _) in after.items() if p["slide_id"] == "sub/a.svs")
    opened = EdgeStore(store)
    try:
        from fastapi.testclient import TestClient

        client = TestClient(create_app(Searcher(None, opened, COLLECTION), ApiSettings()), base_url="http://127.0.0.1")
        response = client.get(f"/v1/tiles/{moved_tile}.jpg")
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    finally:
        opened.close()


def test_a_deleted_slide_is_reported_missing_and_removed_only_when_asked(cohort, tmp_path, encoder):
    store = tmp_path / "store"
    run(cohort, store, encoder)
    total = len(points(store))
    gone_tiles = {pid for pid, (p, _) in points(store).items() if p["slide_id"] == "b.png"}
    (cohort / "b.png").unlink()
    summary = run(cohort, store, ModelMustNotRun(encoder))
    assert [m["slide_id"] for m in summary["missing"]] == ["b.png"]
    assert len(points(store)) == total, "a missing slide is not deleted unasked"

    stats = runner.invoke(app, ["stats", "--store", str(store), "--json"])
    tiles_entry = next(c for c in json.loads(stats.stdout)["collections"] if c["name"] == COLLECTION)
    assert tiles_entry["slides_missing"] == 1
    listed = runner.invoke(app, ["slides", "--store", str(store), "--status", "missing", "--json"])
    assert listed.exit_code == 0, listed.output
    assert [s["slide_id"] for s in json.loads(listed.stdout)["slides"]] == ["b.png"]

    opened = EdgeStore(store)
    try:
        from fastapi.testclient import TestClient

        client = TestClient(create_app(Searcher(None, opened, COLLECTION), ApiSettings()), base_url="http://127.0.0.1")
        response = client.get(f"/v1/tiles/{next(iter(gone_tiles))}.jpg")
        assert response.status_code == 404 and str(cohort / "b.png") in response.text
        hits = client.post("/v1/search/image", json={"point_id": next(iter(gone_tiles)), "top_k": 20}).json()["hits"]
        assert {h["slide_id"]: h["slide_file"] for h in hits} == {"a.svs": "present", "b.png": "missing"}
    finally:
        opened.close()

    dry = runner.invoke(app, ["remove", "--missing", "--store", str(store)])
    assert dry.exit_code == 0 and "would remove 1 slide record(s) and 1 tiles" in dry.stdout
    assert len(points(store)) == total and len(records(store)) == 2
    done = runner.invoke(app, ["remove", "--missing", "--yes", "--store", str(store), "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["slides"][0]["tiles"] == len(gone_tiles)
    left = points(store)
    assert set(left) == set(points_before_without(total, left, gone_tiles)) and not (set(left) & gone_tiles)
    assert [r["slide_id"] for r in records(store)] == ["a.svs"]


def points_before_without(total: int, left: dict, gone: set) -> set:
    assert len(left) == total - len(gone)
    return set(left)


def test_remove_names_what_it_cannot_find_and_needs_something_named(tmp_path, cohort, encoder):
    store = tmp_path / "store"
    run(cohort, store, encoder)
    unknown = runner.invoke(app, ["remove", "a.sv", "--store", str(store)])
    assert unknown.exit_code == 2 and "did you mean a.svs" in unknown.output and "Traceback" not in unknown.output
    nothing = runner.invoke(app, ["remove", "--store", str(store)])
    assert nothing.exit_code == 2 and "--missing" in nothing.output
    by_where = runner.invoke(app, ["remove", "--where", "diagnosis=normal", "--yes", "--store", str(store), "--json"])
    assert by_where.exit_code == 0 and [s["slide_id"] for s in json.loads(by_where.stdout)["slides"]] == ["b.png"]
    assert [r["slide_id"] for r in records(store)] == ["a.svs"]


def test_a_new_manifest_pixel_size_redoes_the_slide(cohort, tmp_path, encoder):
    """Another pixel size cuts other pixels: that is not a relabel, the slide is embedded again."""
    store = tmp_path / "store"
    run(cohort, store, encoder)
    (cohort / "manifest.csv").write_text(textwrap.dedent("""\
        slide,diagnosis,patient_id,mpp
        a.svs,benign,P1,0.6
        b.png,normal,P2,
        """))
    summary = run(cohort, store, encoder)
    assert summary["ingested"] == 1 and summary["skipped"] == 1
    assert {r["slide_id"]: r["mpp"] for r in records(store)}["a.svs"] == pytest.approx(0.6)


def test_delete_over_http_needs_the_admin_key(cohort, tmp_path, encoder):
    from fastapi.testclient import TestClient

    store = tmp_path / "store"
    run(cohort, store, encoder)
    a_tiles = count(store, Condition("slide_id", "eq", "a.svs"))
    opened = EdgeStore(store)
    try:
        searcher = Searcher(None, opened, COLLECTION)
        plain = TestClient(create_app(searcher, ApiSettings(api_key="search")), base_url="http://127.0.0.1")
        refused = plain.delete("/v1/slides/a.svs", headers={"X-API-Key": "search"})
        assert refused.status_code == 403 and "--admin-key" in refused.json()["fix"]
        keyed = TestClient(create_app(searcher, ApiSettings(api_key="search", admin_key="admin")),
                           base_url="http://127.0.0.1")
        assert keyed.delete("/v1/slides/a.svs", headers={"X-API-Key": "search"}).status_code == 403
        assert keyed.get("/v1/slides/a.svs", headers={"X-API-Key": "admin"}).status_code == 200
        done = keyed.delete("/v1/slides/a.svs", headers={"Authorization": "Bearer admin"})
        assert done.status_code == 200 and done.json()["removed"][0]["tiles"] == a_tiles
        assert opened.count(COLLECTION, Filter((Condition("slide_id", "eq", "a.svs"),))) == 0
        assert keyed.get("/v1/slides/a.svs", headers={"X-API-Key": "admin"}).status_code == 404
        assert [r["slide_id"] for r in SlideCatalog(opened, COLLECTION).records()] == ["b.png"]
    finally:
        opened.close()
