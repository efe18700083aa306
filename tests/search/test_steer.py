"""Steering a search: by example (Rocchio), by concept (text directions), and abstaining
below the collection's noise floor."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest

from conchdb.archive import measure_noise_floor, record_noise_floor
from conchdb.errors import QueryError
from conchdb.search import Searcher
from conchdb.search.steer import Concept, add_concepts, parse_concept, rocchio
from tests.search.archive import CLASSES, make_archive, unit, write_archive
from tests.search.conftest import QUIET_LOCAL_MODE, fill_store, open_backend

pytestmark = QUIET_LOCAL_MODE
K = 20


@pytest.fixture(scope="module")
def planted():
    """A planted-class archive (3 classes, 8 slides each, 30 tiles a slide) in a memory store."""
    archive = make_archive(per_class=8, tiles=30, seed=3)
    store = open_backend("memory", Path(tempfile.gettempdir()))
    write_archive(store, "tiles", archive, records=False)
    yield archive, store
    store.close()


def labels_by_id(archive) -> dict[str, str]:
    from conchdb.store import stable_id

    return {
        stable_id("archive", s, t): archive.labels[s] for s in archive.slides for t in range(len(archive.vectors[s]))
    }


def precision(hits, labels, wanted) -> float:
    return sum(labels[h.id] == wanted for h in hits) / len(hits)


def test_marking_three_good_and_two_bad_hits_raises_precision_at_20(planted):
    archive, store = planted
    labels = labels_by_id(archive)
    wanted, other = CLASSES[0], CLASSES[1]
    # A query half way between two classes: its first page mixes them.
    query = unit(archive.directions[0] + archive.directions[1])
    searcher = Searcher(None, store, "tiles")
    first = searcher.search(query, K)
    before = precision(first, labels, wanted)
    like = [h.id for h in first if labels[h.id] == wanted][:3]
    unlike = [h.id for h in first if labels[h.id] == other][:2]
    assert len(like) == 3 and len(unlike) == 2
    refined = searcher.search(searcher.steer(query, like=like, unlike=unlike), K, exclude=like + unlike)
    after = precision(refined, labels, wanted)
    assert before < 0.8 and after > before + 0.15, (before, after)
    assert not {h.id for h in refined} & set(like + unlike)  # the marked tiles are left out
    assert [h.rank for h in refined] == list(range(1, K + 1))


def test_rocchio_is_the_stated_arithmetic():
    q, liked, unliked = unit(np.eye(4)[0]), np.eye(4)[[1, 2]], np.eye(4)[[3]]
    got = rocchio(q, liked, unliked, alpha=1.0, beta=1.5, gamma=1.0)
    np.testing.assert_allclose(got, unit(np.array([1.0, 0.75, 0.75, -1.0])), atol=1e-6)


def test_excluded_tiles_do_not_shift_the_pages_of_the_rest(planted):
    archive, store = planted
    searcher = Searcher(None, store, "tiles")
    query = unit(archive.directions[2])
    top = searcher.search(query, 30)
    gone = [top[0].id, top[12].id]
    rest = [h.id for h in top if h.id not in gone]
    page2 = searcher.search(query, 10, offset=10, exclude=gone)
    assert [h.id for h in page2] == rest[10:20]
    grouped = searcher.search(query, 3, group_by="slide", group_size=2, exclude=gone)
    assert not {t.id for g in grouped for t in g.flat()} & set(gone)


def test_marking_an_unknown_tile_or_one_tile_twice_is_refused(planted):
    archive, store = planted
    searcher = Searcher(None, store, "tiles")
    query = unit(archive.directions[0])
    with pytest.raises(QueryError, match="no tile with id") as info:
        searcher.steer(query, like=["00000000-0000-0000-0000-000000000000"])
    assert info.value.parameter == "like"
    some = searcher.search(query, 1)[0].id
    with pytest.raises(QueryError, match="both relevant and not") as info:
        searcher.steer(query, like=[some], unlike=[some])
    assert info.value.parameter == "unlike"


# -- by concept ---------------------------------------------------------------------------------


def test_concept_specs_parse_text_and_weight():
    assert parse_concept("necrosis") == Concept("necrosis", 0.5)
    assert parse_concept("necrosis:0.8") == Concept("necrosis", 0.8)
    assert parse_concept("ratio 1:2 glands") == Concept("ratio 1:2 glands", 0.5)
    with pytest.raises(QueryError, match="weight") as info:
        parse_concept("necrosis:-1", parameter="less")
    assert info.value.parameter == "less"
    with pytest.raises(QueryError, match="empty"):
        parse_concept(" :0.4")


def test_more_moves_every_score_toward_the_concept_by_the_stated_amount(corpus, encoder):
    """By hand: score'(x) = (x·q + w·x·t) / ‖q + w·t‖ for every stored tile x."""
    store = open_backend("memory", Path(tempfile.gettempdir()))
    fill_store(store, "tiles", corpus, encoder)
    searcher = Searcher(encoder, store, "tiles")
    q = searcher.query_vector(text="glandular epithelium")
    t = encoder.encode_texts(["necrosis"])[0]
    u = encoder.encode_texts(["mucin"])[0]
    w, v = 0.8, 0.3
    steered = searcher.steer(q, more=[Concept("necrosis", w)], less=[Concept("mucin", v)])
    x = corpus.vectors.astype(np.float64)
    norm = np.linalg.norm(q + w * t - v * u)
    expected = (x @ q + w * (x @ t) - v * (x @ u)) / norm
    hits = searcher.search(steered, len(x))
    by_id = dict(zip(corpus.ids(), expected, strict=True))
    for hit in hits:
        assert hit.score == pytest.approx(by_id[hit.id], abs=1e-5)
    assert [h.id for h in hits[:10]] == [corpus.ids()[i] for i in np.argsort(-expected)[:10]]
    np.testing.assert_allclose(add_concepts(q, [(t, w)], [(u, v)]), (q + w * t - v * u) / norm, atol=1e-6)
    store.close()


def test_concepts_that_cancel_the_query_are_refused():
    q = unit(np.eye(4)[0])
    with pytest.raises(QueryError, match="cancels out"):
        add_concepts(q, [], [(q, 1.0)])


# -- abstain ---------------------------------------------------------------------------------


def test_the_noise_floor_is_a_deterministic_quantile_of_cross_slide_pairs():
    rng = np.random.default_rng(0)
    vectors = unit(rng.normal(size=(200, 16)))
    slides = [f"s{i % 5}" for i in range(200)]
    a, b = measure_noise_floor(vectors, slides), measure_noise_floor(vectors, slides)
    assert a is not None and a.value == b.value and a.slides == 5 and a.quantile == 0.99
    same = np.array([vectors[i] @ vectors[j] for i in range(200) for j in range(200) if slides[i] != slides[j]])
    assert abs(a.value - np.quantile(same, 0.99)) < 0.05
    assert measure_noise_floor(vectors, ["one"] * 200) is None  # no unrelated pair to measure


def test_an_orthogonal_query_gets_only_weak_hits_and_a_stored_tile_does_not():
    archive = make_archive(per_class=4, tiles=10, seed=5)  # 120 tiles: their span leaves room for an orthogonal query
    store = open_backend("memory", Path(tempfile.gettempdir()))
    write_archive(store, "tiles", archive, records=False)
    assert Searcher(None, store, "tiles").search(unit(archive.directions[0]), 1)[0].weak is None  # none measured yet
    floor = record_noise_floor(store, "tiles")
    assert floor is not None and store.collection_metadata("tiles")["noise_floor"]["value"] == floor.value
    searcher = Searcher(None, store, "tiles")
    everything = np.concatenate(list(archive.vectors.values())).astype(np.float64)
    basis = np.linalg.svd(everything, full_matrices=False)[2]  # an orthonormal basis of their span
    rng = np.random.default_rng(1)
    free = rng.normal(size=everything.shape[1])
    orthogonal = unit(free - basis.T @ (basis @ free))
    assert np.abs(everything @ orthogonal).max() < 1e-4
    assert all(h.weak is True for h in searcher.search(orthogonal, 10))
    own = archive.vectors[archive.slides[4]][7]
    best = searcher.search(own, 1)[0]
    assert best.weak is False and best.score > 0.999
    assert best.to_dict()["weak"] is False
    store.close()


def test_text_queries_are_held_to_a_floor_of_unrelated_texts_on_the_tiles(corpus, encoder, tmp_path):
    """A text scores far lower on tissue than tissue does on tissue, so text hits are compared
    with what the built-in vocabulary's terms score on a sample of the collection's tiles."""
    from conchdb.search import vocabulary

    store = open_backend("memory", Path(tempfile.gettempdir()))
    fill_store(store, "tiles", corpus, encoder)
    record_noise_floor(store, "tiles")
    searcher = Searcher(encoder, store, "tiles", cache_dir=tmp_path)
    terms = vocabulary.load_vocabulary(encoder, encoder.fingerprint, tmp_path).vectors
    want = float(np.quantile((terms @ corpus.vectors.T).ravel(), 0.99))
    text_floor = searcher.noise_floor("text")
    assert text_floor is not None and text_floor.value == pytest.approx(want, abs=1e-5)
    assert text_floor.value != searcher.noise_floor("image").value
    hits = searcher.search(searcher.query_vector(text="necrosis"), 72, modality="text")
    assert [h.weak for h in hits] == [h.score < text_floor.value for h in hits]
    store.close()
