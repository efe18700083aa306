"""`--where` parsing, and filtered, grouped and paged search on both store backends."""

from __future__ import annotations

import numpy as np
import pytest

from conchdb.errors import QueryError
from conchdb.search import GRAMMAR, FieldTypes, Searcher, parse_where
from conchdb.search.filters import infer_types
from conchdb.store import Condition
from tests.search.conftest import QUIET_LOCAL_MODE, SCHEMA, SLIDES, fill_store, open_backend

pytestmark = QUIET_LOCAL_MODE
TYPES = FieldTypes(SCHEMA)


# -- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("diagnosis=adenoma", [Condition("diagnosis", "eq", "adenoma")]),
        ("diagnosis!=adenoma", [Condition("diagnosis", "ne", "adenoma")]),
        ("diagnosis=adenoma,normal", [Condition("diagnosis", "in", ["adenoma", "normal"])]),
        ("diagnosis!=adenoma,normal", [Condition("diagnosis", "ne", "adenoma"),
                                       Condition("diagnosis", "ne", "normal")]),
        ("grade>1", [Condition("grade", "gt", 1)]),
        ("grade >= 2", [Condition("grade", "gte", 2)]),
        ("age<61.5", [Condition("age", "lt", 61.5)]),
        ("age<=47", [Condition("age", "lte", 47.0)]),
        ("grade<2.5", [Condition("grade", "lt", 2.5)]),
        ("consented=yes", [Condition("consented", "eq", True)]),
        ("consented=False", [Condition("consented", "eq", False)]),
        ('diagnosis="adenoma, tubular",normal', [Condition("diagnosis", "in", ["adenoma, tubular", "normal"])]),
        ("slide_id=case_a/s1.png", [Condition("slide_id", "eq", "case_a/s1.png")]),
        ("grade=1,3", [Condition("grade", "in", [1, 3])]),
    ],
)
def test_expressions_become_typed_conditions(expr, expected):
    assert list(parse_where([expr], TYPES).must) == expected


def test_expressions_combine_with_and():
    flt = parse_where(["grade>=2", "site=colon"], TYPES)
    assert flt.must == (Condition("grade", "gte", 2), Condition("site", "eq", "colon"))


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        ("diagnosis", "not of the form"),
        ("=adenoma", "not of the form"),
        ("grade==2", "unknown operator '=='"),
        ("grade=>2", "unknown operator '=>'"),
        ("grade<>2", "unknown operator '<>'"),
        ("diagnosis~aden", "unknown operator '~'"),
        ("grade>=", "no value"),
        ("diagnosis=a,,b", "a value is missing"),
        ("grade>1,2", "takes one value"),
        ("grade=high", "'high' is not an integer value"),
        ("grade=2.5", "'2.5' is not an integer value"),
        ("age>=old", "'old' is not a float value"),
        ("consented=maybe", "'maybe' is not a bool value"),
        ("diagnosis>3", "have no order"),
        ("consented<1", "have no order"),
        ("diagnossis=adenoma", "no field 'diagnossis'"),
    ],
)
def test_bad_expressions_are_errors_that_show_the_expression(expr, problem):
    with pytest.raises(QueryError) as info:
        parse_where([expr], TYPES)
    message = str(info.value)
    assert repr(expr) in message
    assert problem in message
    if "no field" not in problem:
        assert "field=value" in (info.value.fix or "")


def test_the_unknown_field_error_lists_the_fields():
    with pytest.raises(QueryError) as info:
        parse_where(["diagnossis=adenoma"], TYPES)
    assert "diagnosis" in info.value.fix and "grade" in info.value.fix


def test_inferred_types_still_catch_mismatches_but_allow_unseen_fields():
    types = FieldTypes(infer_types([{"grade": 1, "age": 2, "n": "x"}, {"age": 2.5, "n": 3}]), declared=False)
    assert types.types == {"grade": "integer", "age": "float"}
    with pytest.raises(QueryError, match="not an integer"):
        parse_where(["grade=two"], types)
    assert parse_where(["other=7"], types).must == (Condition("other", "eq", 7),)


def test_grammar_is_one_line_with_every_operator():
    for op in ("=", "!=", ">", ">=", "<", "<="):
        assert f"field{op}" in GRAMMAR


# -- filtered search on both backends ---------------------------------------------------------


def _matches(payload: dict, field: str, op: str, value) -> bool:
    if field not in payload:
        return False
    have = payload[field]
    return {
        "eq": lambda: have == value,
        "ne": lambda: have != value,
        "in": lambda: have in value,
        "gt": lambda: have > value,
        "gte": lambda: have >= value,
        "lt": lambda: have < value,
        "lte": lambda: have <= value,
    }[op]()


FILTERS = [
    ["diagnosis=adenoma"],
    ["diagnosis!=adenoma"],
    ["diagnosis=adenoma,normal"],
    ["diagnosis!=adenoma,normal"],
    ["site=colon"],
    ["site!=colon"],
    ["grade>1"],
    ["grade>=2"],
    ["grade<2"],
    ["grade<=2"],
    ["age>47"],
    ["age>=61.5"],
    ["age<61.5"],
    ["age<=61.5"],
    ["tissue>=0.65"],
    ["consented=true"],
    ["consented!=true"],
    ["x>=128", "y<128", "slide_id=case_a/s1.png,case_b/s3.png"],
    ["grade=1,3", "tissue<0.5"],
]


@pytest.mark.parametrize("where", FILTERS, ids=lambda w: " & ".join(w))
def test_filters_return_exactly_the_matching_points(filled, corpus, where):
    store, name = filled
    searcher = Searcher(None, store, collection=name)
    flt = searcher.parse_where(where)
    expected = {
        p.id for p in corpus.points if all(_matches(p.payload, c.field, c.op, c.value) for c in flt.must)
    }
    assert expected, "each filter should match something"
    assert len(expected) < len(corpus.points), "and leave something out"
    hits = searcher.search(corpus.vectors[0], k=1000, flt=flt)
    assert {h.id for h in hits} == expected
    assert store.count(name, flt) == len(expected)


def test_a_filter_type_error_without_a_recorded_schema(tmp_path, corpus, encoder):
    store = open_backend("memory", tmp_path)
    fill_store(store, "tiles", corpus, encoder, schema=False)
    searcher = Searcher(None, store, collection="tiles")
    assert not searcher.field_types().declared
    with pytest.raises(QueryError, match="'high' is not an integer value"):
        searcher.parse_where(["grade=high"])
    hits = searcher.search(corpus.vectors[0], k=1000, flt=searcher.parse_where(["grade>=2"]))
    assert {h.payload["grade"] for h in hits} == {2, 3}


# -- ranking, grouping, paging, min score -----------------------------------------------------


def _numpy_scores(corpus, query):
    return corpus.vectors @ query


def test_search_ranks_as_numpy_does(filled, corpus):
    store, name = filled
    searcher = Searcher(None, store, collection=name)
    query = corpus.vectors[5]
    hits = searcher.search(query, k=20)
    scores = dict(zip(corpus.ids(), _numpy_scores(corpus, query), strict=True))
    assert [h.rank for h in hits] == list(range(1, 21))
    assert hits[0].id == corpus.points[5].id
    for h in hits:
        assert h.score == pytest.approx(scores[h.id], abs=1e-5)
    assert all(a.score >= b.score - 1e-6 for a, b in zip(hits, hits[1:], strict=False))
    left_out = max(v for k, v in scores.items() if k not in {h.id for h in hits})
    assert hits[-1].score >= left_out - 1e-5


def test_grouping_returns_one_entry_per_slide(filled, corpus):
    store, name = filled
    searcher = Searcher(None, store, collection=name)
    query = corpus.vectors[60]
    groups = searcher.search(query, k=10, group_by="slide", group_size=4)
    assert len(groups) == len(SLIDES)
    assert len({g.slide_id for g in groups}) == len(groups)
    assert [g.rank for g in groups] == [1, 2, 3]
    scores = dict(zip(corpus.ids(), _numpy_scores(corpus, query), strict=True))
    for group in groups:
        assert group.tiles is not None and len(group.tiles) == 4
        assert {t.slide_id for t in group.tiles} == {group.slide_id}
        best_of_slide = max(v for p, v in zip(corpus.points, scores.values(), strict=True)
                            if p.payload["slide_id"] == group.slide_id)
        assert group.score == pytest.approx(best_of_slide, abs=1e-5)
    assert groups[0].slide_id == corpus.points[60].payload["slide_id"]
    assert [g.score for g in groups] == sorted((g.score for g in groups), reverse=True)


def test_grouping_with_a_filter_and_paging(filled, corpus):
    store, name = filled
    searcher = Searcher(None, store, collection=name)
    flt = searcher.parse_where(["site=colon,rectum"])
    first = searcher.search(corpus.vectors[0], k=1, flt=flt, group_by="slide")
    second = searcher.search(corpus.vectors[0], k=1, flt=flt, group_by="slide", offset=1)
    assert first[0].rank == 1 and second[0].rank == 2
    assert {first[0].slide_id, second[0].slide_id} == {"case_a/s1.png", "case_a/s2.png"}


def test_paging_continues_where_the_first_page_ended(filled, corpus):
    store, name = filled
    searcher = Searcher(None, store, collection=name)
    both = searcher.search(corpus.vectors[3], k=10)
    page2 = searcher.search(corpus.vectors[3], k=5, offset=5)
    assert [h.id for h in page2] == [h.id for h in both[5:]]
    assert [h.rank for h in page2] == [6, 7, 8, 9, 10]


def test_min_score_leaves_out_weaker_hits(filled, corpus):
    store, name = filled
    searcher = Searcher(None, store, collection=name)
    scores = np.sort(_numpy_scores(corpus, corpus.vectors[7]))[::-1]
    threshold = float((scores[9] + scores[10]) / 2)
    hits = searcher.search(corpus.vectors[7], k=100, min_score=threshold)
    assert len(hits) == 10
    assert all(h.score >= threshold for h in hits)


@pytest.mark.parametrize(("k", "offset", "min_score"), [(0, 0, None), (1001, 0, None), (10, -1, None),
                                                         (1000, 9500, None), (10, 0, 1.5)])
def test_limits(filled, corpus, k, offset, min_score):
    store, name = filled
    with pytest.raises(QueryError):
        Searcher(None, store, collection=name).search(corpus.vectors[0], k=k, offset=offset, min_score=min_score)
