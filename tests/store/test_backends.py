"""The store contract, run unchanged against every backend (edge, in-process client, live server).

Expected answers come from numpy and plain Python over the same data, so a backend is
checked against arithmetic, not against the other backend.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from conchdb.errors import QueryError, StoreError
from conchdb.store import CollectionSpec, Condition, Filter, Point, stable_id
from tests.store.conftest import FINGERPRINT, QUIET_LOCAL_MODE, Data, make_data, spec

pytestmark = QUIET_LOCAL_MODE


def expected(data: Data, cond: Condition) -> set[str]:
    """The ids a condition must select: only points that have the field, as documented."""
    ops = {
        "eq": lambda v, x: v == x,
        "ne": lambda v, x: v != x,
        "in": lambda v, x: v in x,
        "gt": lambda v, x: v > x,
        "gte": lambda v, x: v >= x,
        "lt": lambda v, x: v < x,
        "lte": lambda v, x: v <= x,
    }
    value = cond.value
    if cond.field == "x" and isinstance(value, str):  # the coercion case below
        value = int(value)
    test = ops[cond.op]
    return {
        i
        for i, p in zip(data.ids, data.payloads, strict=True)
        if p.get(cond.field) is not None and test(p[cond.field], value)
    }


_TISSUE = make_data().payloads[7]["tissue"]  # a float value that is present, for eq and boundaries
CONDITIONS = [
    Condition("site", "eq", "lung"),
    Condition("site", "ne", "lung"),
    Condition("site", "in", ["lung", "colon"]),
    Condition("slide_id", "in", []),
    Condition("x", "eq", 160),
    Condition("x", "ne", 160),
    Condition("x", "in", [0, 16, 3200]),
    Condition("x", "gt", 1904),
    Condition("x", "gte", 1904),
    Condition("x", "lt", 1904),
    Condition("x", "lte", 1904),
    Condition("x", "gt", "1904"),  # a numeric string on an integer field is read as the number
    Condition("tissue", "eq", _TISSUE),
    Condition("tissue", "ne", _TISSUE),
    Condition("tissue", "in", [_TISSUE, 0.5]),
    Condition("tissue", "gt", _TISSUE),
    Condition("tissue", "gte", _TISSUE),
    Condition("tissue", "lt", _TISSUE),
    Condition("tissue", "lte", _TISSUE),
    Condition("flag", "eq", True),
    Condition("flag", "eq", False),
    Condition("flag", "ne", True),
    Condition("flag", "in", [True]),
    Condition("note", "eq", "tile 5"),  # a field without an index still filters
]


@pytest.mark.parametrize("cond", CONDITIONS, ids=lambda c: f"{c.field}-{c.op}-{c.value}")
def test_every_filter_op_selects_exactly_the_matching_points(filled, data, cond):
    store, name = filled
    want = expected(data, cond)
    flt = Filter((cond,))
    assert store.count(name, flt) == len(want)
    assert {h.id for h in store.scroll(name, flt)} == want
    hits = store.query(name, data.vectors[0], k=len(data.ids), flt=flt)
    assert {h.id for h in hits} == want


def test_conditions_are_and_combined(filled, data):
    store, name = filled
    conds = (Condition("site", "in", ["lung", "breast"]), Condition("x", "lt", 2000), Condition("flag", "eq", True))
    want = set.intersection(*(expected(data, c) for c in conds))
    assert 0 < len(want) < len(data.ids)
    assert {h.id for h in store.scroll(name, Filter(conds))} == want
    assert store.count(name, Filter(conds)) == len(want)


def test_query_ranks_like_exact_cosine(filled, data):
    store, name = filled
    query = np.random.default_rng(1).normal(size=data.vectors.shape[1]).astype(np.float32)
    scores = data.scores(query)
    order = np.argsort(-scores)[:10]
    hits = store.query(name, query, k=10, with_vectors=True)
    assert [h.id for h in hits] == [data.ids[i] for i in order]
    np.testing.assert_allclose([h.score for h in hits], scores[order], atol=1e-5)
    np.testing.assert_allclose(hits[0].vector, data.vectors[order[0]], atol=1e-5)
    assert hits[0].payload == data.payloads[order[0]]
    assert store.query(name, query, k=3)[0].vector is None


def test_paging_with_offset_continues_the_ranking(filled, data):
    store, name = filled
    query = data.vectors[3]
    full = [h.id for h in store.query(name, query, k=30)]
    pages = [h.id for off in (0, 10, 20) for h in store.query(name, query, k=10, offset=off)]
    assert pages == full
    flt = Filter((Condition("site", "eq", "colon"),))
    assert [h.id for h in store.query(name, query, k=5, flt=flt, offset=5)] == [
        h.id for h in store.query(name, query, k=10, flt=flt)
    ][5:]


def test_min_score_drops_weaker_hits(filled, data):
    store, name = filled
    query = data.vectors[5]
    threshold = float(np.sort(data.scores(query))[-12])
    hits = store.query(name, query, k=50, min_score=threshold - 1e-6)
    assert len(hits) == 12
    assert all(h.score >= threshold - 1e-5 for h in hits)


def test_groups_are_one_per_slide_best_first(filled, data):
    store, name = filled
    query = data.vectors[11]
    scores = data.scores(query)
    by_slide: dict[str, list[tuple[float, str]]] = {}
    for i, p in enumerate(data.payloads):
        if p["x"] >= 400:  # with a filter too
            by_slide.setdefault(p["slide_id"], []).append((float(scores[i]), data.ids[i]))
    ranked = sorted(by_slide.items(), key=lambda kv: -max(kv[1])[0])[:3]
    groups = store.query_groups(
        name, query, group_by="slide_id", groups=3, group_size=4, flt=Filter((Condition("x", "gte", 400),))
    )
    assert [g.key for g in groups] == [slide for slide, _ in ranked]
    for g, (_, members) in zip(groups, ranked, strict=True):
        assert [h.id for h in g.hits] == [i for _, i in sorted(members, reverse=True)[:4]]
        assert all(h.payload["slide_id"] == g.key for h in g.hits)


def test_groups_stop_when_points_run_out(filled, data):
    store, name = filled
    groups = store.query_groups(name, data.vectors[0], group_by="slide_id", groups=20, group_size=1000)
    assert len(groups) == 8  # only 8 slides exist
    assert sum(len(g.hits) for g in groups) == len(data.ids)


def test_retrieve_keeps_order_and_skips_missing(filled, data):
    store, name = filled
    ids = [data.ids[4], stable_id("no such point"), "not-a-uuid", data.ids[2]]
    hits = store.retrieve(name, ids, with_vectors=True)
    assert [h.id for h in hits] == [data.ids[4], data.ids[2]]
    assert hits[0].payload == data.payloads[4]
    np.testing.assert_allclose(hits[1].vector, data.vectors[2], atol=1e-6)
    assert store.retrieve(name, []) == []


def test_scroll_yields_every_point_with_vectors(filled, data):
    store, name = filled
    hits = list(store.scroll(name, with_vectors=True))
    assert sorted(h.id for h in hits) == sorted(data.ids)
    assert [h.id for h in hits] == sorted(h.id for h in hits)  # id order
    by_id = {h.id: h for h in hits}
    np.testing.assert_allclose(by_id[data.ids[9]].vector, data.vectors[9], atol=1e-6)
    assert store.count(name) == len(data.ids)


def test_upsert_overwrites_by_id(store, name):
    data = make_data(n=20)
    store.ensure_collection(spec(name))
    store.upsert(name, data.points())
    store.upsert(name, data.points())  # the same ids again: nothing new
    assert store.count(name) == 20
    changed = Point(data.ids[0], -data.vectors[0], {"slide_id": "moved", "x": 1})
    store.upsert(name, [changed])
    assert store.count(name) == 20
    (hit,) = store.retrieve(name, [data.ids[0]], with_vectors=True)
    assert hit.payload == {"slide_id": "moved", "x": 1}
    np.testing.assert_allclose(hit.vector, -data.vectors[0], atol=1e-6)


def test_delete_by_filter(store, name):
    data = make_data(n=64)
    store.ensure_collection(spec(name))
    store.upsert(name, data.points())
    gone = Filter((Condition("slide_id", "eq", "slide-3"),))
    store.delete(name, gone)
    assert store.count(name, gone) == 0
    assert store.count(name) == 64 - 8
    with pytest.raises(StoreError, match="refusing to delete every point"):
        store.delete(name, Filter())


def test_update_metadata_adds_fields_keeps_the_rest_and_a_later_join_keeps_it(store, name):
    store.ensure_collection(spec(name))
    meta = store.update_metadata(name, noise_floor={"value": 0.42, "quantile": 0.99})
    assert meta["noise_floor"]["value"] == 0.42 and meta["model_fingerprint"] == FINGERPRINT
    store.update_metadata(name, noise_floor={"value": 0.5, "quantile": 0.99})
    assert store.collection_metadata(name)["noise_floor"]["value"] == 0.5
    assert store.collection_metadata(name)["tiling"]["target_mpp"] == 0.5
    store.ensure_collection(spec(name))  # a later ingest joining the collection keeps it
    assert store.collection_metadata(name)["noise_floor"]["value"] == 0.5
    with pytest.raises(StoreError, match="fingerprint"):
        store.update_metadata(name, model_fingerprint="another")
    with pytest.raises(StoreError, match="does not exist|no collection"):
        store.update_metadata(name + "_none", noise_floor=None)


def test_a_collection_fingerprinted_by_an_earlier_version_is_joined_and_renamed(store, name):
    """A writer whose model names the recorded fingerprint among its aliases (the same
    weights, hashed as an earlier conchdb did) joins the collection, which is known by the
    writer's fingerprint from then on; aliases that are not the record's change nothing."""
    store.ensure_collection(spec(name, fingerprint="sha256:earlier"))
    with pytest.raises(StoreError, match="sha256:earlier"):
        store.ensure_collection(replace(spec(name, fingerprint="sha256:now"), model_aliases=("sha256:else",)))
    assert store.collection_metadata(name)["model_fingerprint"] == "sha256:earlier"
    store.ensure_collection(replace(spec(name, fingerprint="sha256:now"), model_aliases=("sha256:earlier",)))
    meta = store.collection_metadata(name)
    assert meta["model_fingerprint"] == "sha256:now" and meta["tiling"]["target_mpp"] == 0.5
    store.ensure_collection(spec(name, fingerprint="sha256:now"))
    with pytest.raises(StoreError, match="sha256:now"):
        store.ensure_collection(spec(name, fingerprint="sha256:earlier"))


def test_collection_records_metadata_and_refuses_another_model(store, name):
    store.ensure_collection(spec(name))
    store.ensure_collection(spec(name))  # same model again: fine
    meta = store.collection_metadata(name)
    assert meta["model_fingerprint"] == FINGERPRINT and meta["tiling"]["target_mpp"] == 0.5
    assert meta["payload_schema"] == spec(name).fields
    assert name in store.collections()
    with pytest.raises(StoreError) as err:
        store.ensure_collection(spec(name, fingerprint="sha256:other-model"))
    message = str(err.value)
    assert FINGERPRINT in message and "sha256:other-model" in message and name in message
    assert err.value.parameter == "collection" and "another collection" in err.value.fix
    with pytest.raises(StoreError, match="32-d"):
        store.ensure_collection(spec(name, dim=64))
    assert store.collection_metadata(f"{name}_absent") is None


def test_new_fields_and_indexes_are_added_to_an_existing_collection(store, name):
    data = make_data(n=30)
    store.ensure_collection(spec(name))
    store.upsert(name, data.points())
    wider = spec(name)
    wider.fields["note"] = "keyword"
    store.ensure_collection(wider)
    assert store.count(name, Filter((Condition("note", "eq", "tile 3"),))) == 1
    assert store.collection_metadata(name)["payload_schema"]["note"] == "keyword"
    clash = spec(name)
    clash.fields["x"] = "keyword"
    with pytest.raises(StoreError, match="'x' is declared as integer"):
        store.ensure_collection(clash)


def test_declared_fields_without_an_index_are_filtered_by_their_type(store, name):
    data = make_data(n=60)
    narrow = spec(name)
    narrow.indexed = ("slide_id",)
    store.ensure_collection(narrow)
    store.upsert(name, data.points())
    # `x` has no index but its declared type still reads "32" as an integer.
    assert store.count(name, Filter((Condition("x", "lt", "32"),))) == 2
    assert store.count(name, Filter((Condition("flag", "eq", True),))) == sum(p["flag"] for p in data.payloads)
    assert store.collection_metadata(name)["payload_schema"] == narrow.fields
    with pytest.raises(StoreError, match="cannot index nope"):
        store.ensure_collection(CollectionSpec(f"{name}_bad", 32, fields={"x": "integer"}, indexed=("nope",)))


def test_shared_fields_reach_every_point_of_the_batch(store, name):
    data = make_data(n=40)
    store.ensure_collection(spec(name))
    own = [Point(p.id, p.vector, {"x": p.payload["x"]}) for p in data.points()]
    store.upsert(name, own[:20], {"slide_id": "slide-a", "site": "lung", "flag": True})
    store.upsert(name, own[20:], {"slide_id": "slide-b", "site": "colon", "flag": False})
    assert store.count(name, Filter((Condition("site", "eq", "lung"), Condition("flag", "eq", True)))) == 20
    hit = store.retrieve(name, [own[25].id])[0]
    assert hit.payload == {"x": own[25].payload["x"], "slide_id": "slide-b", "site": "colon", "flag": False}
    with pytest.raises(StoreError, match="x of point .* also in the batch's shared fields"):
        store.upsert(name, own[:2], {"x": 3})
    assert store.retrieve(name, [own[0].id])[0].payload["x"] == own[0].payload["x"]


def test_missing_collection_and_bad_input_are_store_errors(store, name):
    with pytest.raises(StoreError, match="does not exist"):
        store.count(name)
    with pytest.raises(StoreError, match="does not exist"):
        store.query(name, np.ones(32, dtype=np.float32), k=3)
    with pytest.raises(StoreError, match="invalid collection name"):
        store.ensure_collection(CollectionSpec("../escape"))
    store.ensure_collection(spec(name))
    with pytest.raises(StoreError, match="32-d"):
        store.upsert(name, [Point(stable_id("p"), np.ones(8), {})])
    with pytest.raises(StoreError, match="not a UUID"):
        store.upsert(name, [Point("tile-1", np.ones(32), {})])
    with pytest.raises(StoreError, match="query vector has 8"):
        store.query(name, np.ones(8), k=3)


@pytest.mark.parametrize(
    "cond, words",
    [
        (Condition("site", "gt", "lung"), "compares numbers"),
        (Condition("x", "eq", "many"), "not a integer"),
        (Condition("flag", "eq", "maybe"), "not a bool"),
        (Condition("site", "in", "lung"), "needs a list"),
        (Condition("site", "eq", None), "needs one value"),
        (Condition("site", "like", "lu"), "unknown operator"),
    ],
)
def test_malformed_filters_are_query_errors(filled, cond, words):
    store, name = filled
    with pytest.raises(QueryError, match=words) as err:
        store.count(name, Filter((cond,)))
    assert cond.field in str(err.value)


def test_payload_updates_by_filter_and_by_id_keep_vectors_and_other_fields(store, name):
    data = make_data(40)
    store.ensure_collection(spec(name))
    store.upsert(name, data.points())
    before = {h.id: h.vector for h in store.scroll(name, with_vectors=True)}
    on_slide = Filter((Condition("slide_id", "eq", "slide-1"),))
    store.set_payload(name, {"site": "kidney", "stage": 3}, flt=on_slide)
    store.delete_payload(name, ["note"], flt=on_slide)
    store.set_payload(name, {"flag": False}, ids=[data.ids[0]])
    store.delete_payload(name, ["tissue"], ids=[data.ids[0], "not-a-uuid"])
    for hit in store.scroll(name, with_vectors=True):
        i = data.ids.index(hit.id)
        want = dict(data.payloads[i])
        if want["slide_id"] == "slide-1":
            want.update(site="kidney", stage=3)
            del want["note"]
        if i == 0:
            want["flag"] = False
            del want["tissue"]
        assert hit.payload == want
        assert np.array_equal(hit.vector, before[hit.id])  # the vector is not rewritten, not even re-normalized
    assert store.count(name, Filter((Condition("site", "eq", "kidney"),))) == 5


def test_payload_updates_name_their_points_once_and_never_all(store, name):
    store.ensure_collection(spec(name))
    store.upsert(name, make_data(8).points())
    with pytest.raises(StoreError, match="filter or by ids"):
        store.set_payload(name, {"site": "x"})
    with pytest.raises(StoreError, match="filter or by ids"):
        store.delete_payload(name, ["site"], flt=Filter((Condition("x", "gt", 0),)), ids=[])
    with pytest.raises(StoreError, match="filter is empty"):
        store.set_payload(name, {"site": "x"}, flt=Filter(()))


@pytest.mark.parametrize("key", ["site", "slide_id", "flag", "x"])
def test_facet_counts_each_value_of_an_indexed_field_exactly(filled, data, key):
    store, collection = filled
    flt = Filter((Condition("tissue", "gte", 0.5),))
    for condition in (None, flt):
        chosen = [p for p in data.payloads if condition is None or p["tissue"] >= 0.5]
        want: dict = {}
        for p in chosen:
            if p.get(key) is not None:
                want[p[key]] = want.get(p[key], 0) + 1
        got = store.facet(collection, key, flt=condition, limit=1000)
        assert dict(got) == want
        assert [c for _, c in got] == sorted(want.values(), reverse=True)
    assert len(store.facet(collection, "x", limit=5)) == 5
