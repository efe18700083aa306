"""`conchdb copy`: a store copied into another folder or onto a server answers as the original,
resumes after an interruption, refreshes changed payloads, and refuses what it cannot do."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conchdb.catalog import texts_collection
from conchdb.cli import app
from conchdb.errors import StoreError
from conchdb.search.slide_search import QueryTile, SlideQuery, rank_slides
from conchdb.store import Condition, Filter, Point, Store, stable_id
from conchdb.store.base import store_identity
from conchdb.store.copy import SAMPLE, copy_store
from conchdb.store.edge import EdgeStore
from tests.search.archive import Archive, make_archive, write_archive
from tests.store.conftest import QUIET_LOCAL_MODE, make_data, open_backend, spec

pytestmark = QUIET_LOCAL_MODE
runner = CliRunner()
TILES = "tiles"


@pytest.fixture(scope="module")
def archive() -> Archive:
    return make_archive()


def write_texts(store: Store, name: str, archive: Archive) -> None:
    """A small texts collection beside the tiles, as `conchdb texts add` writes one."""
    from conchdb.store import CollectionSpec

    store.ensure_collection(CollectionSpec(texts_collection(name), 512, {"model_fingerprint": "archive"},
                                           {"source": "keyword", "line": "integer"}))
    points = [Point(stable_id("text", n), v, {"text": f"{label} tissue", "source": "terms", "line": n})
              for n, (label, v) in enumerate(zip(("adenoma", "carcinoma", "normal"), archive.directions, strict=True))]
    store.upsert(texts_collection(name), points)


@pytest.fixture
def source(tmp_path, archive) -> Iterator[Store]:
    """An embedded store holding the archive's tiles, slide records and texts."""
    store = EdgeStore(tmp_path / "source")
    write_archive(store, TILES, archive)
    write_texts(store, TILES, archive)
    store.finish_bulk_load(TILES)
    yield store
    store.close()


def everything(store: Store, name: str) -> dict[str, tuple[np.ndarray, dict]]:
    return {hit.id: (hit.vector, hit.payload) for hit in store.scroll(name, with_vectors=True)}


def assert_same_points(a: Store, b: Store, name: str) -> None:
    left, right = everything(a, name), everything(b, name)
    assert left.keys() == right.keys()
    for point_id, (vector, payload) in left.items():
        assert right[point_id][1] == payload
        np.testing.assert_allclose(right[point_id][0], vector, atol=1e-6)


def ranked(hits) -> list[tuple[str, float]]:
    return [(h.id, round(h.score, 4)) for h in hits]


@pytest.mark.parametrize("kind", ["edge", "memory"])
def test_a_copy_answers_every_kind_of_search_as_the_source_and_keeps_the_records(source, archive, tmp_path, kind):
    target = open_backend(kind, tmp_path / "target")
    try:
        summary = copy_store(source, target)
        assert target.collections() == source.collections() == [TILES, "tiles_slides", "tiles_texts"]
        for name in source.collections():
            assert target.collection_metadata(name) == source.collection_metadata(name)
            ours, theirs = source.collection_record(name), target.collection_record(name)
            assert (theirs.dim, theirs.fields, theirs.indexed, theirs.graph) == (
                ours.dim, ours.fields, ours.indexed, ours.graph)
            assert target.count(name) == source.count(name)
            done = summary.to_dict()["collections"][name]
            assert done == {"points": source.count(name), "copied": source.count(name), "already_there": 0,
                            "rewritten": 0, "checked": min(SAMPLE, source.count(name))}
        vectors = np.concatenate([archive.vectors[s][:2] for s in archive.slides[::3]])
        carcinoma = Filter((Condition("diagnosis", "eq", "carcinoma"),))
        for vector in vectors:
            assert ranked(target.query(TILES, vector, k=10)) == ranked(source.query(TILES, vector, k=10))
            assert ranked(target.query(TILES, vector, k=5, flt=carcinoma)) == ranked(
                source.query(TILES, vector, k=5, flt=carcinoma))
        batch = [ranked(hits) for hits in target.query_batch(TILES, vectors, k=5, flts=carcinoma)]
        assert batch == [ranked(hits) for hits in source.query_batch(TILES, vectors, k=5, flts=carcinoma)]
        query = SlideQuery([QueryTile(v) for v in archive.vectors[archive.slides[1]][:8]], "eight tiles")
        theirs = [(m.slide_id, round(m.score, 4)) for m in rank_slides(target, TILES, query, k=4)]
        assert theirs == [(m.slide_id, round(m.score, 4)) for m in rank_slides(source, TILES, query, k=4)]
        assert len(theirs) == 4
        text = archive.directions[0]
        assert ranked(target.query("tiles_texts", text, k=3)) == ranked(source.query("tiles_texts", text, k=3))
    finally:
        target.close()


def test_a_copy_onto_a_server_and_back_holds_the_same_points(source, tmp_path):
    server = open_backend("memory", tmp_path)
    with EdgeStore(tmp_path / "back") as back:
        copy_store(source, server)
        copy_store(server, back)
        for name in source.collections():
            assert_same_points(source, back, name)
            assert back.collection_metadata(name) == source.collection_metadata(name)
    server.close()


def test_an_interrupted_copy_resumes_with_what_is_missing_and_ends_as_an_uninterrupted_one(tmp_path, monkeypatch):
    data = make_data(n=240)
    with EdgeStore(tmp_path / "source") as source, EdgeStore(tmp_path / "cut") as cut, \
            EdgeStore(tmp_path / "whole") as whole:
        source.ensure_collection(spec("points"))
        source.upsert("points", data.points())
        writes = []
        upsert = cut.upsert

        def fails_on_the_third(name, points, shared=None):
            if len(writes) == 2:
                raise KeyboardInterrupt
            writes.append(len(points))
            upsert(name, points, shared)

        monkeypatch.setattr(cut, "upsert", fails_on_the_third)
        with pytest.raises(KeyboardInterrupt):
            copy_store(source, cut, batch_size=50)
        assert cut.count("points") == 100
        monkeypatch.undo()
        summary = copy_store(source, cut, batch_size=50).collections[0]
        assert (summary.copied, summary.already_there, summary.rewritten) == (140, 100, 0)
        copy_store(source, whole, batch_size=50)
        assert_same_points(whole, cut, "points")
        assert_same_points(source, cut, "points")
        again = copy_store(source, cut, batch_size=50).collections[0]
        assert (again.copied, again.already_there, again.rewritten) == (0, 240, 0)


def test_a_rerun_after_a_relabel_rewrites_exactly_the_relabelled_points(source, tmp_path, archive):
    with EdgeStore(tmp_path / "target") as target:
        copy_store(source, target)
        slide = archive.slides[0]
        tiles = list(source.scroll(TILES, Filter((Condition("slide_id", "eq", slide),)), with_vectors=True))
        source.upsert(TILES, [Point(h.id, h.vector, {**h.payload, "diagnosis": "relabelled"}) for h in tiles])
        summary = {c.name: c for c in copy_store(source, target, collection=TILES).collections}
        assert (summary[TILES].copied, summary[TILES].rewritten) == (0, len(tiles))
        assert summary[TILES].already_there == source.count(TILES) - len(tiles)
        assert (summary["tiles_slides"].copied, summary["tiles_slides"].rewritten) == (0, 0)
        relabelled = target.scroll(TILES, Filter((Condition("diagnosis", "eq", "relabelled"),)))
        assert {h.id for h in relabelled} == {h.id for h in tiles}


def test_collection_copies_that_tiles_collection_and_its_companions_only(source, tmp_path, archive):
    write_archive(source, "other", archive, records=False)
    with EdgeStore(tmp_path / "target") as target:
        names = [c.name for c in copy_store(source, target, collection=TILES).collections]
        assert names == target.collections() == [TILES, "tiles_slides", "tiles_texts"]
        with pytest.raises(StoreError, match="collection 'missing' does not exist") as caught:
            copy_store(source, target, collection="missing")
        assert caught.value.parameter == "collection"


def test_a_copy_onto_itself_is_refused(tmp_path):
    server = open_backend("memory", tmp_path)
    server.ensure_collection(spec("points"))
    from conchdb.store.server import ServerStore

    same = ServerStore(client=server.client)
    with pytest.raises(StoreError, match="onto itself") as caught:
        copy_store(server, same)
    assert caught.value.parameter == "target" and caught.value.fix
    assert store_identity(url="HTTP://Qdrant-Host:6333/") == store_identity(url="http://qdrant-host:6333")
    assert store_identity(path=tmp_path / "a" / ".." / "b") == store_identity(path=tmp_path / "b")
    server.close()


def test_a_target_collection_of_another_model_is_refused_before_anything_is_written(source, tmp_path):
    with EdgeStore(tmp_path / "target") as target:
        from conchdb.store import CollectionSpec

        target.ensure_collection(CollectionSpec("tiles_texts", 512, {"model_fingerprint": "another"}))
        with pytest.raises(StoreError, match="model fingerprint another") as caught:
            copy_store(source, target)
        assert caught.value.parameter == "collection" and caught.value.fix
        assert target.collections() == ["tiles_texts"] and target.count("tiles_texts") == 0


def test_the_check_names_a_target_holding_points_the_source_lacks(source, tmp_path):
    with EdgeStore(tmp_path / "target") as target:
        copy_store(source, target)
        stray = next(iter(target.scroll("tiles_texts", with_vectors=True)))
        target.upsert("tiles_texts", [Point(stable_id("stray"), stray.vector, {"text": "stray"})])
        with pytest.raises(StoreError, match="collection 'tiles_texts' holds 4 points .* but 3") as caught:
            copy_store(source, target)
        assert "copy into a new folder" in caught.value.fix


def test_bad_batch_sizes_are_refused(source, tmp_path):
    with EdgeStore(tmp_path / "target") as target:
        with pytest.raises(StoreError, match="batch size 0") as caught:
            copy_store(source, target, batch_size=0)
        assert caught.value.parameter == "batch_size"
        assert target.collections() == []


# -- the command ----------------------------------------------------------------------------------


@pytest.fixture
def closed_source(tmp_path, monkeypatch) -> Path:
    """A small embedded store, closed so that the command can open it, and a private CONCHDB_HOME."""
    monkeypatch.setenv("CONCHDB_HOME", str(tmp_path / "home"))
    for name in ("CONCHDB_QDRANT_URL", "CONCHDB_STORE", "CONCHDB_COLLECTION"):
        monkeypatch.delenv(name, raising=False)
    folder = tmp_path / "source"
    with EdgeStore(folder) as store:
        store.ensure_collection(spec("points"))
        store.upsert("points", make_data(n=120).points())
    return folder


def test_the_command_copies_and_prints_its_summary(closed_source, tmp_path):
    result = runner.invoke(app, ["copy", "--store", str(closed_source), "--to", str(tmp_path / "copy"), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["collections"] == {"points": {"points": 120, "copied": 120, "already_there": 0, "rewritten": 0,
                                             "checked": 100}}
    assert doc["points"] == doc["written"] == 120
    table = runner.invoke(app, ["copy", "--store", str(closed_source), "--to", str(tmp_path / "copy")])
    assert table.exit_code == 0, table.output
    assert re.search(r"points\s*\W\s*120\s*\W\s*0\s*\W\s*120\s*\W\s*0", table.stdout), table.stdout
    with EdgeStore(closed_source) as a, EdgeStore(tmp_path / "copy") as b:
        assert_same_points(a, b, "points")


@pytest.mark.parametrize(
    ("target", "words", "flag"),
    [
        (["--to", "{source}"], "onto itself", "--to"),
        (["--to", "{file}"], "is a file", "--to"),
        ([], "give one place to copy to", "--to"),
        (["--to", "{folder}", "--to-qdrant-url", "http://localhost:1"], "both given", "--to"),
        (["--to-qdrant-url", "http://127.0.0.1:1"], "cannot reach", "--to-qdrant-url"),
    ],
)
def test_the_command_names_a_bad_target_and_the_fix(closed_source, tmp_path, target, words, flag):
    (tmp_path / "file").write_text("not a store")
    places = {"source": str(closed_source), "file": str(tmp_path / "file"), "folder": str(tmp_path / "copy")}
    args = [arg.format(**places) for arg in target]
    result = runner.invoke(app, ["copy", "--store", str(closed_source), *args])
    assert result.exit_code == 2, result.output
    assert re.search(words, result.stderr), result.stderr
    assert f"fix: {flag}:" in result.stderr, result.stderr
    assert "Traceback" not in result.output
    with EdgeStore(closed_source) as store:  # nothing already stored is lost
        assert store.count("points") == 120


@pytest.mark.parametrize("kind", ["edge", "memory"])
def test_collection_record_is_a_copy_and_none_for_a_missing_collection(tmp_path, kind):
    store = open_backend(kind, tmp_path)
    try:
        store.ensure_collection(spec("points"))
        record = store.collection_record("points")
        assert record.metadata["model_fingerprint"] == spec("points").metadata["model_fingerprint"]
        record.metadata["model_fingerprint"] = "changed"
        record.fields.clear()
        assert store.collection_record("points").fields == spec("points").fields
        assert store.collection_metadata("points")["model_fingerprint"] != "changed"
        assert store.collection_record("missing") is None
    finally:
        store.close()
