"""Slide -> slides on a synthetic archive with planted classes, on both backends, and mosaics."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import numpy as np
import pytest
from typer.testing import CliRunner

from conchdb.archive.marks import build_mosaics, mark_slide
from conchdb.archive.mosaic import choose_mosaic
from conchdb.catalog import MOSAIC_FIELD
from conchdb.cli import app
from conchdb.errors import QueryError
from conchdb.search import Searcher, slide_search
from conchdb.search.slide_search import QueryTile, SlideQuery, candidate_filter, candidate_slides, rank_slides
from conchdb.store import Condition, Filter, Point, Store, stable_id
from conchdb.store.edge import EdgeStore
from tests.search.archive import Archive, make_archive, write_archive
from tests.search.conftest import BACKENDS, QUIET_LOCAL_MODE, open_backend

pytestmark = QUIET_LOCAL_MODE
runner = CliRunner()


@pytest.fixture(scope="module")
def archive() -> Archive:
    return make_archive()


@pytest.fixture(scope="module", params=BACKENDS)
def stored(request, tmp_path_factory, archive) -> Iterator[tuple[Store, str]]:
    """The archive in a store of each backend, with mosaics built from the stored vectors."""
    store = open_backend(request.param, tmp_path_factory.mktemp(f"slides-{request.param}"))
    name = f"tiles_{uuid.uuid4().hex[:8]}"
    write_archive(store, name, archive)
    build_mosaics(store, name)
    yield store, name
    store.close()


def mosaic_ids(store: Store, name: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for hit in store.scroll(name, Filter((Condition(MOSAIC_FIELD, "eq", True),))):
        out.setdefault(hit.payload["slide_id"], set()).add(hit.id)
    return out


def test_same_class_slides_rank_first(stored, archive):
    store, name = stored
    searcher = Searcher(None, store, name)
    for slide in archive.slides:
        matches = searcher.search_slides(searcher.slide_query(slide), k=3)
        assert [archive.labels[m.slide_id] for m in matches] == [archive.labels[slide]] * 3
        assert slide not in {m.slide_id for m in matches}


def test_scores_equal_the_exhaustive_median_of_best_cosines(stored, archive):
    store, name = stored
    searcher = Searcher(None, store, name)
    for slide in archive.slides[:4]:
        query = searcher.slide_query(slide)
        matches = searcher.search_slides(query, k=len(archive.slides) - 1)
        truth = archive.exact_scores(query.vectors, slide)
        assert {m.slide_id for m in matches} == set(truth)
        for m in matches:
            assert m.score == pytest.approx(truth[m.slide_id], abs=1e-4)
        assert [m.score for m in matches] == sorted((m.score for m in matches), reverse=True)
        best = matches[0]
        assert len(best.matched_tiles) == len(query.tiles)
        pair = best.matched_tiles[0]
        assert pair.score == max(p.score for p in best.matched_tiles)
        assert pair.query.id in {t.id for t in query.tiles}


def test_exclude_same_patient_never_returns_that_patient_and_filters_narrow_the_candidates(stored, archive):
    store, name = stored
    searcher = Searcher(None, store, name)
    for slide in archive.slides:
        query = searcher.slide_query(slide)
        matches = searcher.search_slides(query, k=20, exclude_same=["patient_id"])
        assert matches
        assert all(archive.patients[m.slide_id] != archive.patients[slide] for m in matches)
        assert all(m.payload["patient_id"] == archive.patients[m.slide_id] for m in matches)
    flt = searcher.parse_where(["diagnosis=normal"])
    matches = searcher.search_slides(searcher.slide_query(archive.slides[0]), k=20, flt=flt)
    assert {m.payload["diagnosis"] for m in matches} == {"normal"}
    assert len(matches) == sum(label == "normal" for label in archive.labels.values())


def test_excluding_by_a_field_the_query_lacks_is_an_error(stored, archive):
    store, name = stored
    searcher = Searcher(None, store, name)
    with pytest.raises(QueryError, match="no value of 'site'"):
        searcher.search_slides(searcher.slide_query(archive.slides[0]), exclude_same=["site"])


def test_mosaics_are_the_same_across_backends_and_reruns(tmp_path, archive):
    chosen = []
    for kind in BACKENDS:
        store = open_backend(kind, tmp_path / kind)
        write_archive(store, "tiles", archive)
        first = build_mosaics(store, "tiles")
        again = build_mosaics(store, "tiles")
        assert first.marked == first.mosaic_tiles == 8 * len(archive.slides)  # 30 tiles: k = 8
        assert (again.marked, again.unmarked) == (0, 0)
        chosen.append(mosaic_ids(store, "tiles"))
        store.close()
    assert chosen[0] == chosen[1]
    for slide in archive.slides:
        ids = [stable_id("archive", slide, t) for t in range(len(archive.vectors[slide]))]
        assert chosen[0][slide] == set(choose_mosaic(ids, archive.vectors[slide]))


def test_a_mosaic_does_not_change_when_the_vectors_move_by_their_last_bits(archive):
    """What two backends, or two reads, may differ by: a float32 ulp or so on every value,
    and exact near-ties (two tiles equally near a centre), which must go to the same tile."""
    rng = np.random.default_rng(7)
    for slide in archive.slides:
        vectors = archive.vectors[slide].copy()
        vectors[5] = vectors[4]  # a duplicated tile: its twin is always equally near
        ids = [stable_id("archive", slide, t) for t in range(len(vectors))]
        first = choose_mosaic(ids, vectors)
        for _ in range(5):
            noise = rng.choice([-1, 0, 1], size=vectors.shape).astype(np.float32)
            moved = np.nextafter(vectors, vectors + noise)  # each value up, down or not, by one ulp
            assert choose_mosaic(ids, moved) == first


def test_marking_at_ingest_and_rebuilding_agree_and_keep_the_payload(tmp_path, archive):
    store = EdgeStore(tmp_path / "store")
    write_archive(store, "tiles", archive)
    slide = archive.slides[0]
    tiles = sorted(store.scroll("tiles", Filter((Condition("slide_id", "eq", slide),)), with_vectors=True),
                   key=lambda h: h.id)
    marked = mark_slide(store, "tiles", [h.id for h in tiles], np.stack([h.vector for h in tiles]))
    summary = build_mosaics(store, "tiles", slide_ids=[slide])
    assert (summary.marked, summary.unmarked, summary.mosaic_tiles) == (0, 0, len(marked))
    for hit in store.retrieve("tiles", marked):
        assert hit.payload[MOSAIC_FIELD] is True
        before = next(t for t in tiles if t.id == hit.id)
        assert {k: v for k, v in hit.payload.items() if k != MOSAIC_FIELD} == before.payload
    for hit in store.retrieve("tiles", [t.id for t in tiles], with_vectors=True):
        assert np.array_equal(hit.vector, next(t.vector for t in tiles if t.id == hit.id))  # marks leave vectors be
    store.close()


def test_a_slide_without_a_stored_mosaic_gets_one_chosen_for_the_query(tmp_path, archive):
    store = EdgeStore(tmp_path / "store")
    write_archive(store, "tiles", archive)
    searcher = Searcher(None, store, "tiles")
    query = searcher.slide_query(archive.slides[1])
    assert not query.mosaic_stored and len(query.tiles) == 8
    assert [m.slide_id for m in searcher.search_slides(query, k=1)][0] != archive.slides[1]
    with pytest.raises(QueryError, match="no tiles of slide 's99.svs'"):
        searcher.slide_query("s99.svs")
    store.close()


def test_a_query_tile_matching_nothing_in_a_filtered_slide_counts_as_no_match(tmp_path, archive):
    store = EdgeStore(tmp_path / "store")
    write_archive(store, "tiles", archive)
    vectors = archive.vectors[archive.slides[0]][:3]
    query = SlideQuery([QueryTile(v) for v in vectors], "three tiles")
    flt = Filter((Condition("x", "lt", 512),))  # one tile per slide left
    matches = rank_slides(store, "tiles", query, k=2, flt=flt)
    assert matches[0].slide_id == archive.slides[0] and matches[0].score == pytest.approx(
        float(np.median(vectors @ archive.vectors[archive.slides[0]][0])), abs=1e-4)
    store.close()


def test_the_cli_prints_json_and_refuses_mixed_queries(tmp_path, monkeypatch, archive):
    monkeypatch.setenv("CONCHDB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CONCHDB_QDRANT_URL", raising=False)
    with EdgeStore(tmp_path / "store") as store:
        write_archive(store, "conch_tiles", archive)
    base = ["--store", str(tmp_path / "store")]
    done = runner.invoke(app, ["mosaic", "--json", *base])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["mosaic_tiles"] == 8 * len(archive.slides)
    slide = archive.slides[0]
    result = runner.invoke(app, ["search", "--slide", slide, "--exclude-same", "patient_id", "--top-k", "4",
                                 "--json", *base])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [d["rank"] for d in doc] == [1, 2, 3, 4]
    assert set(doc[0]) == {"rank", "slide_id", "score", "matched_tiles", "payload"}
    assert all(d["payload"]["patient_id"] != archive.patients[slide] for d in doc)
    assert set(doc[0]["matched_tiles"][0]) == {"query_id", "query_x", "query_y", "id", "x", "y", "score"}
    table = runner.invoke(app, ["search", "--slide", slide, "--top-k", "2", *base])
    assert table.exit_code == 0, table.output
    assert f"slides like {slide}" in table.stdout
    assert any(other in table.stdout for other in archive.slides if archive.labels[other] == archive.labels[slide])
    for args, words in (
        (["search", "tumor", "--slide", slide], "exactly one query"),
        (["search", "tumor", "--exclude-same", "patient_id"], "--exclude-same"),
        (["search", "--slide", "nope.svs"], "no tiles of slide 'nope.svs'"),
    ):
        bad = runner.invoke(app, [*args, *base])
        assert bad.exit_code == 2 and words in bad.output and "Traceback" not in bad.output


def test_slide_records_without_tiles_are_listed_and_a_named_one_is_an_error(tmp_path, archive):
    from conchdb.errors import StoreError
    from conchdb.store import CollectionSpec, Point

    store = EdgeStore(tmp_path / "store")
    write_archive(store, "tiles", archive, records=False)
    store.ensure_collection(CollectionSpec("tiles_slides", 512, {}, {"slide_id": "keyword"}))
    records = [*archive.slides, "failed.svs"]
    axis = np.eye(512, dtype=np.float32)[0]
    store.upsert("tiles_slides", [Point(stable_id("record", s), axis, {"slide_id": s}) for s in records])
    summary = build_mosaics(store, "tiles")
    assert summary.without_tiles == ["failed.svs"] and summary.slides == len(archive.slides)
    with pytest.raises(StoreError, match="no tiles of slide 'failed.svs'"):
        build_mosaics(store, "tiles", slide_ids=["failed.svs"])
    store.close()


def test_candidates_from_slide_records_rank_as_the_exhaustive_search(tmp_path, archive):
    """Records narrow the slides scored to those whose mean tile vector is nearest; with as
    many candidates as slides, the ranking (pruning included) is the exhaustive one."""
    with EdgeStore(tmp_path / "with") as recorded, EdgeStore(tmp_path / "without") as bare:
        write_archive(recorded, "tiles", archive)
        write_archive(bare, "tiles", archive, records=False)
        for slide in archive.slides[::3]:
            query = Searcher(None, bare, "tiles").slide_query(slide)
            exact = rank_slides(bare, "tiles", query, k=4)
            assert [(m.slide_id, round(m.score, 5)) for m in rank_slides(recorded, "tiles", query, k=4)] == [
                (m.slide_id, round(m.score, 5)) for m in exact]
            truth = archive.exact_scores(query.vectors, slide)
            assert [m.slide_id for m in exact] == sorted(truth, key=lambda s: (-truth[s], s))[:4]
            few = rank_slides(recorded, "tiles", query, k=1, candidates=1)  # k + REFINE_EXTRA are scored
            means = {s: float(v.mean(axis=0) @ query.vectors.mean(axis=0) / np.linalg.norm(v.mean(axis=0)))
                     for s, v in archive.vectors.items() if s != slide}
            nearest = sorted(means, key=lambda s: -means[s])[:6]
            pool, checked = candidate_slides(recorded, "tiles", query.vectors, candidate_filter(query, None, ()), 6)
            assert checked and pool == nearest
            assert few[0].slide_id == max(nearest, key=lambda s: (truth[s], s))


@pytest.mark.parametrize(("chunk", "records"), [(1, False), (3, False), (64, False), (3, True), (64, True)])
def test_pruning_in_chunks_and_stages_keeps_the_exhaustive_order(tmp_path, archive, monkeypatch, chunk, records):
    """Every slide a candidate (in id order without records; with them, by mean vector, the
    further ones' tiles asked least like their mean first), the further ones scored one,
    three or all at a time (the first chunk's first stage in the first batch): the top
    slides and their scores are the exhaustive ones, and slides below the bar are dropped
    before all their pairs are asked."""
    monkeypatch.setattr(slide_search, "CHUNK", chunk)
    with EdgeStore(tmp_path / "store") as bare:
        write_archive(bare, "tiles", archive, records=records)
        searcher = Searcher(None, bare, "tiles")
        queries = [searcher.slide_query(slide) for slide in archive.slides]
        asked: list[int] = []
        real = bare.query_batch
        monkeypatch.setattr(bare, "query_batch",  # pair searches only: the records' one has no rows
                            lambda *a, **kw: asked.append(len(kw.get("rows") or ())) or real(*a, **kw))
        for query in queries:
            truth = archive.exact_scores(query.vectors, query.slide_id)
            matches = rank_slides(bare, "tiles", query, k=2)
            assert [m.slide_id for m in matches] == sorted(truth, key=lambda s: (-truth[s], s))[:2]
            for m in matches:
                assert m.score == pytest.approx(truth[m.slide_id], abs=1e-4)
                assert len(m.matched_tiles) == len(query.tiles)
        every = sum((len(archive.slides) - 1) * len(q.tiles) for q in queries)
        assert sum(asked) < every
        if chunk == 64:  # all further slides in one chunk: a batch of every pair of the first
            assert sum(map(bool, asked)) <= len(queries) * (1 + len(slide_search.STAGES))  # and a batch a stage


def test_where_slide_records_exist_a_slide_without_a_done_record_is_not_searched(tmp_path, archive):
    with EdgeStore(tmp_path / "store") as store:
        write_archive(store, "tiles", archive)
        query = Searcher(None, store, "tiles").slide_query(archive.slides[0])
        first = rank_slides(store, "tiles", query, k=3)[0].slide_id
        (record,) = store.scroll("tiles_slides", Filter((Condition("slide_id", "eq", first),)), with_vectors=True)
        store.upsert("tiles_slides", [Point(record.id, record.vector, {**record.payload, "status": "in_progress"})])
        again = rank_slides(store, "tiles", query, k=len(archive.slides))
        assert again and first not in {m.slide_id for m in again}
        records = list(store.scroll("tiles_slides", with_vectors=True))
        store.upsert("tiles_slides", [Point(r.id, r.vector, {**r.payload, "status": "in_progress"}) for r in records])
        assert rank_slides(store, "tiles", query, k=3) == []  # records say no slide is done: none is searched


def test_a_filter_on_the_cohort_keeps_the_pairs_within_that_copy_of_a_slide(tmp_path, archive):
    """Pairs skip the conditions the candidates' records met, except those telling apart
    two copies of one slide id (cohort, tiling)."""
    other = make_archive(seed=7)
    with EdgeStore(tmp_path / "store") as store:
        write_archive(store, "tiles", archive)
        write_archive(store, "tiles", other, cohort="second")
        query = SlideQuery([QueryTile(v) for v in archive.vectors[archive.slides[0]][:8]], "eight tiles")
        only = Filter((Condition("cohort", "eq", "second"),))
        matches = rank_slides(store, "tiles", query, k=3, flt=only)
        truth = other.exact_scores(query.vectors, "")
        assert [m.slide_id for m in matches] == sorted(truth, key=lambda s: (-truth[s], s))[:3]
        for m in matches:
            assert m.score == pytest.approx(truth[m.slide_id], abs=1e-4)
            assert m.payload["cohort"] == "second"


def test_the_cli_scores_as_many_candidates_as_asked(tmp_path, monkeypatch, archive):
    monkeypatch.setenv("CONCHDB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CONCHDB_QDRANT_URL", raising=False)
    with EdgeStore(tmp_path / "store") as store:
        write_archive(store, "conch_tiles", archive)
        build_mosaics(store, "conch_tiles")
    base = ["--store", str(tmp_path / "store")]
    slide = archive.slides[0]
    wide = runner.invoke(app, ["search", "--slide", slide, "--top-k", "3", "--candidates", "11", "--json", *base])
    narrow = runner.invoke(app, ["search", "--slide", slide, "--top-k", "1", "--candidates", "1", "--json", *base])
    assert wide.exit_code == 0 and narrow.exit_code == 0, wide.output + narrow.output
    assert len(json.loads(wide.stdout)) == 3 and len(json.loads(narrow.stdout)) == 1
    for args, words in (
        (["search", "--slide", slide, "--candidates", "0"], "--candidates"),
        (["search", "tumor", "--candidates", "5"], "--candidates"),
        (["evaluate", "retrieval", "--label", "diagnosis", "--candidates", "0"], "--candidates"),
    ):
        bad = runner.invoke(app, [*args, *base])
        assert bad.exit_code == 2 and words in bad.output and "Traceback" not in bad.output, bad.output
    done = runner.invoke(app, ["evaluate", "retrieval", "--label", "diagnosis", "--candidates", "6", "--json", *base])
    assert done.exit_code == 0 and json.loads(done.stdout)["slides"] == len(archive.slides), done.output
