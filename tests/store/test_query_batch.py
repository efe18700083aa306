"""`Store.query_batch`: one planned batch answers as a query per row would, on every backend."""

from __future__ import annotations

import numpy as np
import pytest

from conchdb.errors import StoreError
from conchdb.store import Condition, Filter
from tests.store.conftest import QUIET_LOCAL_MODE

pytestmark = QUIET_LOCAL_MODE


def test_each_row_gets_the_exact_nearest_points(filled, data):
    store, name = filled
    rows = data.vectors[[3, 50, 111]]
    results = store.query_batch(name, rows, k=7)
    assert len(results) == 3
    for row, hits in zip(rows, results, strict=True):
        truth = np.argsort(-data.scores(row), kind="stable")[:7]
        assert [h.id for h in hits] == [data.ids[i] for i in truth]
        np.testing.assert_allclose([h.score for h in hits], data.scores(row)[truth], atol=1e-4)


def test_one_filter_per_row_and_a_payload_subset(filled, data):
    store, name = filled
    rows = data.vectors[[0, 1]]
    flts = [Filter((Condition("slide_id", "eq", "slide-2"),)), Filter((Condition("site", "eq", "lung"),))]
    first, second = store.query_batch(name, rows, k=5, flts=flts, payload_fields=("slide_id", "x"))
    assert first and all(h.payload["slide_id"] == "slide-2" for h in first)
    assert all(set(h.payload) <= {"slide_id", "x"} for h in first + second)
    lung = {i for i, p in zip(data.ids, data.payloads, strict=True) if p.get("site") == "lung"}
    assert second and {h.id for h in second} <= lung
    one = store.query(name, rows[1], k=5, flt=flts[1])
    assert [h.id for h in second] == [h.id for h in one]


def test_a_shared_filter_applies_to_every_row(filled, data):
    store, name = filled
    flt = Filter((Condition("flag", "eq", True),))
    for hits in store.query_batch(name, data.vectors[:4], k=3, flts=flt):
        assert len(hits) == 3
        assert all(data.payloads[data.ids.index(h.id)]["flag"] is True for h in hits)


def test_rows_ask_one_vector_under_several_filters(filled, data):
    store, name = filled
    vectors = data.vectors[[4, 9]]
    slides = [Filter((Condition("slide_id", "eq", f"slide-{n}"),)) for n in range(3)]
    flts = [slides[0], slides[1], slides[2], slides[0]]
    got = store.query_batch(name, vectors, k=2, flts=flts, rows=[0, 0, 1, 1], payload_fields=())
    for (row, flt), hits in zip([(0, slides[0]), (0, slides[1]), (1, slides[2]), (1, slides[0])], got, strict=True):
        assert [h.id for h in hits] == [h.id for h in store.query(name, vectors[row], k=2, flt=flt)]
        assert all(h.payload == {} for h in hits)
    with pytest.raises(StoreError, match="a row outside them"):
        store.query_batch(name, vectors, k=2, rows=[0, 2])
    with pytest.raises(StoreError, match="3 query vectors got 2 filters"):
        store.query_batch(name, vectors, k=2, rows=[0, 1, 1], flts=flts[:2])


def test_bad_batches_are_store_errors(filled, data):
    store, name = filled
    with pytest.raises(StoreError, match="2 filters"):
        store.query_batch(name, data.vectors[:3], k=2, flts=[Filter(), Filter()])
    with pytest.raises(StoreError, match="query vector has 5"):
        store.query_batch(name, np.ones((2, 5)), k=2)
    with pytest.raises(StoreError, match="does not exist"):
        store.query_batch("no_such_collection", data.vectors[:1], k=2)
    assert store.query_batch(name, data.vectors[:2], k=0) == [[], []]


def test_grouping_keeps_each_slide_best_hit_among_the_k_nearest(filled, data):
    store, name = filled
    row = data.vectors[7]
    (grouped,) = store.query_batch(name, row[None, :], k=40, group_by="slide_id", payload_fields=("x",))
    (plain,) = store.query_batch(name, row[None, :], k=40)
    firsts: dict[str, str] = {}
    for hit in plain:
        firsts.setdefault(hit.payload["slide_id"], hit.id)
    assert [h.id for h in grouped] == list(firsts.values())
    assert all(set(h.payload) == {"x", "slide_id"} for h in grouped)
    (by_site,) = store.query_batch(name, row[None, :], k=40, group_by="site")
    assert len({h.payload["site"] for h in by_site}) == len(by_site) <= 3  # points without a site are left out
