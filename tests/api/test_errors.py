"""How errors become responses: statuses by type, the field from the parameter, fixes in JSON words;
and what a server that lacks its model or its collection answers."""

from __future__ import annotations

from qdrant_client import QdrantClient

from conchdb.api.errors import ApiError, api_wording, error_field, error_status
from conchdb.errors import (
    CheckpointError,
    ConchdbError,
    ImageInputError,
    QueryError,
    SlideError,
    StoreError,
    TokenizerError,
)
from conchdb.search import Searcher
from conchdb.store.server import ServerStore
from tests.api.conftest import make_client


def test_each_error_type_has_its_status():
    cases = {CheckpointError: 503, TokenizerError: 503, ImageInputError: 415, SlideError: 404, StoreError: 409,
             QueryError: 422, ConchdbError: 400}
    for kind, status in cases.items():
        assert error_status(kind("problem")) == status, kind
    assert error_status(ApiError(413, "too big")) == 413


def test_the_field_comes_from_the_api_or_the_librarys_parameter():
    assert error_field(ApiError(422, "bad", field="filters.grade")) == "filters.grade"
    named = QueryError("top-k 0 is outside 1..1000")
    named.parameter = "top_k"  # the error model's attribute
    assert error_field(named) == "top_k"
    where = QueryError("bad filter")
    where.parameter = "where"
    assert error_field(where) == "filters"
    assert error_field(QueryError("no parameter")) is None


def test_fixes_name_json_fields_not_flags():
    assert api_wording("pass --top-k between 1 and 1000") == "pass top_k between 1 and 1000"
    assert api_wording("narrow the search with --where or --min-score") == "narrow the search with filters or min_score"
    assert api_wording("choose one with --where cohort=a") == "choose one with filters cohort=a"
    assert api_wording(None) is None


def test_a_server_without_the_model_still_serves_points_and_tiles(store, searcher):
    bare = Searcher(None, store, "conch_tiles")
    with make_client(bare) as client:
        health = client.get("/v1/health").json()
        assert health["status"] == "unavailable" and health["store"] and not health["model"]
        refused = client.post("/v1/search/text", json={"query": "tumor"})
        assert refused.status_code == 503 and "model" in refused.json()["error"]
        point = next(iter(store.scroll("conch_tiles"))).id
        hits = client.post("/v1/search/image", json={"point_id": point, "top_k": 2}).json()["hits"]
        assert hits[0]["id"] == point
        assert client.get(f"/v1/tiles/{point}.jpg").status_code == 200


def test_a_store_without_the_collection_is_503_with_the_fix(encoder):
    empty = ServerStore(client=QdrantClient(":memory:"))
    with make_client(Searcher(encoder, empty, "conch_tiles")) as client:
        assert client.get("/v1/health").json() == {
            "status": "unavailable", "store": False, "model": True, "collection": "conch_tiles", "points": None,
            "model_fingerprint": encoder.fingerprint,
        }
        refused = client.post("/v1/search/text", json={"query": "tumor"})
        assert refused.status_code == 503 and "ingest" in refused.json()["fix"]
        assert client.get("/v1/slides").json()["total"] == 0
        assert client.get("/v1/slides/a.svs").status_code == 404
    empty.close()
