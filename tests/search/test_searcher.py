"""`Searcher` with the model: text, image, region and point queries; image -> text; zero-shot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conchdb.catalog import slides_collection
from conchdb.errors import ConchdbError, ImageInputError, QueryError, StoreError
from conchdb.model.encoder import Encoder
from conchdb.search import Searcher, classes_from_labels, load_prompt_file, prompts, vocabulary
from conchdb.search.texts import add_texts, read_text_file, text_id
from conchdb.search.zeroshot import mi_zero, softmax
from conchdb.store import CollectionSpec, Point, stable_id
from tests.model.conftest import make_tiny_model
from tests.search.conftest import QUIET_LOCAL_MODE, TILE, fill_store, open_backend

pytestmark = QUIET_LOCAL_MODE


@pytest.fixture(scope="module")
def memory(corpus, encoder):
    """One server-backend store holding the corpus (the backends' parity is tested in test_filters)."""
    import tempfile
    from pathlib import Path

    store = open_backend("memory", Path(tempfile.gettempdir()))
    fill_store(store, "tiles", corpus, encoder)
    yield store
    store.close()


@pytest.fixture
def searcher(memory, encoder, tmp_path) -> Searcher:
    return Searcher(encoder, memory, "tiles", cache_dir=tmp_path / "cache")


def normalize(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


# -- text and image -> tiles ------------------------------------------------------------------


def test_text_search_ranks_as_the_vectors_dictate(searcher, corpus, encoder):
    query = encoder.encode_texts(["poorly differentiated adenocarcinoma"])[0]
    hits = searcher.search(searcher.query_vector(text="poorly differentiated adenocarcinoma"), k=10)
    expected = np.argsort(-(corpus.vectors @ query))[:10]
    assert [h.id for h in hits] == [corpus.points[i].id for i in expected]
    assert hits[0].score == pytest.approx(float(corpus.vectors[expected[0]] @ query), abs=1e-5)


def test_prompt_ensemble_is_the_renormalized_mean_of_the_templates(searcher, encoder):
    texts = [t.replace("CLASSNAME", "necrosis") for t in prompts.TEMPLATES]
    expected = normalize(normalize(encoder.encode_texts(texts)).mean(axis=0))
    got = searcher.text_vector("necrosis", ensemble=True)
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert len(prompts.TEMPLATES) >= 8
    assert not np.allclose(got, searcher.text_vector("necrosis"))


def test_an_image_file_of_a_stored_tile_finds_that_tile_first(searcher, corpus, tmp_path):
    path = tmp_path / "tile.png"
    corpus.tile(40).save(path)
    hits = searcher.search(searcher.query_vector(image=str(path)), k=3)
    assert hits[0].id == corpus.points[40].id
    assert hits[0].score >= 0.999


def test_a_slide_region_finds_its_tile_first(searcher, corpus):
    p = corpus.points[57].payload
    hits = searcher.search(searcher.query_vector(image=f"{p['path']}+{p['x']},{p['y']},{TILE},{TILE}"), k=3)
    assert hits[0].id == corpus.points[57].id
    assert hits[0].score >= 0.999


def test_a_point_query_finds_the_point_first_and_needs_no_model(memory, corpus):
    hits = Searcher(None, memory, "tiles").search(Searcher(None, memory, "tiles").point_vector(corpus.ids()[9]), k=2)
    assert hits[0].id == corpus.ids()[9]
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize(
    ("query", "error", "words"),
    [
        ({"text": "   "}, QueryError, "empty"),
        ({"point": "00000000-0000-0000-0000-000000000000"}, QueryError, "no point with id"),
        ({"point": "not-a-uuid"}, QueryError, "no point with id"),
        ({"text": "a", "point": "b"}, QueryError, "exactly one"),
    ],
)
def test_bad_queries(searcher, query, error, words):
    with pytest.raises(error, match=words):
        searcher.query_vector(**query)


def test_a_file_that_is_not_an_image(searcher, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not pixels")
    with pytest.raises(ImageInputError, match="cannot read"):
        searcher.query_vector(image=str(bad))


def test_a_region_outside_the_slide(searcher, corpus):
    with pytest.raises(QueryError, match="outside"):
        searcher.load_image(f"{corpus.points[0].payload['path']}+300,200,200,200")


def test_a_collection_of_another_model_is_refused(memory, tokenizer_path):
    from conchdb.model.tokenizer import ConchTokenizer

    other = Encoder.from_model(make_tiny_model(), ConchTokenizer(tokenizer_path))
    with pytest.raises(QueryError, match="fingerprint"):
        Searcher(other, memory, "tiles").query_vector(text="tumor")


def test_a_collection_recorded_by_an_earlier_version_with_the_same_weights_is_searched(memory, encoder):
    """Earlier versions fingerprinted the same weights otherwise (`Encoder.aliases`)."""
    memory.ensure_collection(CollectionSpec("earlier", 512, {"model_fingerprint": encoder.aliases[0]}))
    vector = encoder.encode_texts(["tumor"])[0]
    memory.upsert("earlier", [Point(stable_id("earlier", 0), vector, {})])
    assert len(Searcher(encoder, memory, "earlier").search(vector, k=1)) == 1
    Searcher(encoder, memory, "earlier").check_model()


def test_a_missing_collection(memory, encoder):
    with pytest.raises(ConchdbError, match="does not exist"):
        Searcher(encoder, memory, "nope").search(np.ones(512, dtype=np.float32), k=1)


# -- image -> text ----------------------------------------------------------------------------


class CountingEncoder:
    """Counts the texts it embeds, to show the vocabulary is embedded once per model."""

    def __init__(self, encoder):
        self.encoder, self.texts = encoder, 0

    def encode_texts(self, texts):
        self.texts += len(texts)
        return self.encoder.encode_texts(texts)


def test_the_vocabulary_has_200_terms_of_every_kind():
    terms = vocabulary.all_terms()
    assert len(terms) >= 200 and len({t for t, _ in terms}) == len(terms)
    assert {"normal tissue", "tumour", "pattern", "stain", "artefact"} <= {k for _, k in terms}


def test_describe_ranks_the_vocabulary_as_the_vectors_dictate(searcher, corpus, encoder, tmp_path):
    image = corpus.tile(12)
    matches = searcher.describe(encoder.encode_images([image])[0], k=15)
    terms = [t for t, _ in vocabulary.all_terms()]
    text_vectors = encoder.encode_texts([vocabulary.TEMPLATE.replace("CLASSNAME", t) for t in terms])
    scores = text_vectors @ encoder.encode_images([image])[0]
    order = np.argsort(-scores)[:15]
    assert [m.text for m in matches] == [terms[i] for i in order]
    assert [m.score for m in matches] == pytest.approx([float(scores[i]) for i in order], abs=1e-5)
    assert {m.source for m in matches} == {"vocabulary"}
    assert list((tmp_path / "cache").glob(f"vocabulary-{encoder.fingerprint}-*.npy"))


def test_the_vocabulary_is_embedded_once_and_cached_per_model(encoder, tmp_path):
    counting = CountingEncoder(encoder)
    first = vocabulary.load_vocabulary(counting, "model-a", tmp_path)
    again = vocabulary.load_vocabulary(counting, "model-a", tmp_path)
    assert counting.texts == len(first.terms)
    np.testing.assert_array_equal(first.vectors, again.vectors)
    vocabulary.load_vocabulary(counting, "model-b", tmp_path)
    assert counting.texts == 2 * len(first.terms)


def test_describe_uses_the_texts_collection_once_filled(searcher, corpus, encoder, tmp_path):
    file = tmp_path / "captions.csv"
    file.write_text("text,organ,year\nsheets of atypical cells,colon,2020\nbenign fat,breast,2021\n"
                    "dense lymphoid infiltrate,node,2022\n")
    texts = read_text_file(file)
    assert texts.columns == {"organ": "string", "year": "int"}
    assert add_texts(texts, encoder, searcher.store, searcher.texts) == 3
    try:
        image_vector = encoder.encode_images([corpus.tile(3)])[0]
        matches = searcher.describe(image_vector, k=3)
        scores = encoder.encode_texts([r.text for r in texts.records]) @ image_vector
        assert [m.text for m in matches] == [texts.records[i].text for i in np.argsort(-scores)]
        assert matches[0].id == text_id(matches[0].text)
        assert {m.source for m in matches} == {searcher.texts}
        assert {m.metadata["organ"] for m in matches} == {"colon", "breast", "node"}
    finally:
        searcher.store.client.delete_collection(searcher.texts)


# -- zero-shot and MI-Zero --------------------------------------------------------------------


def test_classify_is_the_softmax_of_scaled_cosines(searcher, corpus, encoder):
    labels = ["tumor", "stroma", "fat"]
    image_vector = encoder.encode_images([corpus.tile(20)])[0]
    result = searcher.classify(image_vector, classes_from_labels(labels))
    logits = encoder.logit_scale * (encoder.encode_texts(labels) @ image_vector)
    expected = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    np.testing.assert_allclose(result.probabilities, expected, rtol=1e-4, atol=1e-6)
    assert result.probabilities.sum() == pytest.approx(1.0)
    assert [label for label, _, _ in result.ranked()] == [labels[i] for i in np.argsort(-expected)]
    assert result.prediction == labels[int(np.argmax(expected))]


def test_a_conch_prompt_file_averages_names_and_templates(tmp_path, encoder, searcher, corpus):
    file = tmp_path / "prompts.json"
    file.write_text(json.dumps({"0": {
        "classnames": {"TUM": ["tumor", "carcinoma"], "NORM": ["normal mucosa"]},
        "templates": ["CLASSNAME.", "an image of CLASSNAME."],
    }}))
    classes = load_prompt_file(file)
    assert [c.label for c in classes] == ["TUM", "NORM"]
    assert classes[0].prompts == ("tumor.", "an image of tumor.", "carcinoma.", "an image of carcinoma.")
    vectors = searcher.class_vectors(classes)
    np.testing.assert_allclose(vectors[0], normalize(normalize(encoder.encode_texts(list(classes[0].prompts))).mean(0)),
                               atol=1e-6)
    image_vector = encoder.encode_images([corpus.tile(1)])[0]
    got = searcher.classify(image_vector, classes)
    np.testing.assert_allclose(got.probabilities, softmax(encoder.logit_scale * (vectors @ image_vector)), rtol=1e-5)


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ("[1, 2]", "not a CONCH prompt file"),
        ('{"0": {"classnames": {"A": ["a"]}, "templates": ["CLASSNAME."]}}', "at least two classes"),
        ('{"0": {"classnames": {"A": ["a"], "B": ["b"]}, "templates": ["no placeholder"]}}', "has no CLASSNAME"),
        ('{"0": {"classnames": {"A": [], "B": ["b"]}, "templates": ["CLASSNAME."]}}', "non-empty list"),
        ("{not json", "cannot read it as JSON"),
    ],
)
def test_bad_prompt_files(tmp_path, content, words):
    file = tmp_path / "p.json"
    file.write_text(content)
    with pytest.raises(QueryError, match=words):
        load_prompt_file(file)


def test_labels_need_two_distinct_classes():
    with pytest.raises(QueryError, match="at least two"):
        classes_from_labels(["tumor"])
    with pytest.raises(QueryError, match="twice"):
        classes_from_labels(["tumor", "tumor"])
    assert classes_from_labels(["a", "b"], ensemble=True)[0].prompts == tuple(prompts.fill(prompts.TEMPLATES, "a"))


def test_mi_zero_pooling_matches_a_hand_computation():
    tiles = np.array([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.96, 0.28], [0.0, 0.6, 0.8], [0.0, 0.0, 1.0]])
    classes = normalize(np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    scale = 10.0
    results = mi_zero(tiles, classes, scale, ["A", "B"], ks=[1, 2, 5, 50])
    # tile logits: class A = [10, 8, 0, 0, 0]; class B = [0, 6, 9.6, 6, 0]
    by_hand = {1: [10.0, 9.6], 2: [9.0, 7.8], 5: [3.6, 4.32], 50: [3.6, 4.32]}
    for r in results:
        np.testing.assert_allclose(r.scores.logits, by_hand[r.k], rtol=1e-9)
        a, b = by_hand[r.k]
        assert r.scores.probabilities[0] == pytest.approx(np.exp(a) / (np.exp(a) + np.exp(b)))
    assert [r.k_used for r in results] == [1, 2, 5, 5]
    assert [r.scores.prediction for r in results] == ["A", "A", "B", "B"]


def test_classify_slide_pools_the_stored_vectors(searcher, corpus, encoder):
    labels = ["tumor", "normal"]
    slide = "case_a/s2.png"
    n, results = searcher.classify_slide(slide, classes_from_labels(labels), ks=[1, 5, 10, 50, 100])
    tiles = np.stack([p.vector for p in corpus.points if p.payload["slide_id"] == slide])
    assert n == len(tiles) == 24
    logits = encoder.logit_scale * tiles @ encoder.encode_texts(labels).T
    for r in results:
        k = min(r.k, len(tiles))
        pooled = np.sort(logits, axis=0)[::-1][:k].mean(axis=0)
        np.testing.assert_allclose(r.scores.logits, pooled, rtol=1e-4)
        np.testing.assert_allclose(r.scores.probabilities, softmax(pooled), rtol=1e-4)


def test_an_unknown_slide_suggests_close_ids(memory, encoder, corpus):
    slides = CollectionSpec(
        slides_collection("tiles"), 512, {"model_fingerprint": encoder.fingerprint}, {"slide_id": "keyword"}
    )
    memory.ensure_collection(slides)
    memory.upsert(slides.name, [
        type(corpus.points[0])(f"00000000-0000-0000-0000-00000000000{i}", corpus.vectors[i], {"slide_id": s})
        for i, s in enumerate(["case_a/s1.png", "case_a/s2.png", "case_b/s3.png"])
    ])
    try:
        with pytest.raises(QueryError, match="no tiles of slide 'case_a/s4.png'") as info:
            Searcher(encoder, memory, "tiles").slide_tiles("case_a/s4.png")
        assert "case_a/s1.png" in info.value.fix
    finally:
        memory.client.delete_collection(slides.name)


def test_a_slide_stored_twice_must_be_narrowed(tmp_path, corpus, encoder):
    store = open_backend("memory", tmp_path)
    fill_store(store, "tiles", corpus, encoder)
    from conchdb.store import Point, stable_id

    twin = corpus.points[0]
    store.upsert("tiles", [Point(stable_id("twin"), twin.vector, {**twin.payload, "cohort": "other"})])
    searcher = Searcher(encoder, store, "tiles")
    with pytest.raises(QueryError, match="several values of 'cohort'"):
        searcher.slide_tiles("case_a/s1.png")
    assert len(searcher.slide_tiles("case_a/s1.png", searcher.parse_where(["cohort=other"]))) == 1


def test_slide_mpp_scales_a_region_of_a_slide_without_a_pixel_size(tmp_path):
    from PIL import Image

    Image.new("RGB", (256, 256), (200, 120, 170)).save(tmp_path / "plain.png")
    searcher = Searcher()  # no store: regions are read at the default 0.5 µm/px
    assert searcher.load_image(f"{tmp_path / 'plain.png'}+0,0,100,100").size == (100, 100)  # level 0: no size known
    assert searcher.load_image(f"{tmp_path / 'plain.png'}+0,0,100,100", slide_mpp=0.25).size == (50, 50)
    with pytest.raises(QueryError) as caught:
        searcher.load_image(tmp_path / "plain.png", slide_mpp=0.25)
    assert caught.value.parameter == "slide_mpp"


def test_the_searcher_opens_the_store_and_loads_only_the_tower_a_query_needs(tmp_path, encoder, corpus):
    """As a context manager: the store is opened on first need and closed on exit; a text
    query asks for the text tower, an image query for the vision tower, a point query for none."""
    asked: list[frozenset[str]] = []
    opened: list = []

    def load(towers):
        asked.append(frozenset(towers))
        return encoder

    def open_it():
        store = open_backend("edge", tmp_path / "store")
        fill_store(store, "tiles", corpus, encoder)
        opened.append(store)
        return store

    with Searcher(collection="tiles", load_encoder=load, open_store=open_it) as searcher:
        assert not opened and not asked
        point = searcher.search(searcher.query_vector(point=corpus.ids()[0]), 1)[0]
        assert len(opened) == 1 and not asked and point.id == corpus.ids()[0]
        searcher.search(searcher.query_vector(text="tumor"), 3)
        assert asked == [frozenset({"text"})]
    assert searcher.store is None
    with pytest.raises(StoreError, match="closed"):
        opened[0].count("tiles")
    searcher = Searcher(collection="tiles", load_encoder=load, open_store=None)
    vector = searcher.image_vector(_pixels())
    assert vector.shape == (512,) and asked[-1] == frozenset({"vision"})


def _pixels():
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
