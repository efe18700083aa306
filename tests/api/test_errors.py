"""How errors become responses: statuses by type, the field from the parameter, fixes in JSON words;
and what a server that lacks its model or its collection answers."""

from __future__ import annotations

import os

from qdrant_client import QdrantClient

from conchdb.api.errors import ApiError, error_field, error_status
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
    assert error_field(QueryError("top-k 0 is outside 1..1000", parameter="top_k")) == "top_k"
    assert error_field(QueryError("bad filter", parameter="where")) == "filters"
    assert error_field(QueryError("no such point", parameter="point")) == "point_id"
    assert error_field(QueryError("no parameter")) is None


def test_a_library_error_reaches_the_client_with_its_json_field(client, store):
    point = next(iter(store.scroll("conch_tiles"))).id
    twice = client.post("/v1/classify", json={"point_id": point, "labels": ["tumor", "tumor"]})  # prompts.py refuses
    assert twice.status_code == 422
    assert twice.json() == {"error": "the same label is given twice", "field": "labels", "fix": "give each class once"}


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
            "model_fingerprint": encoder.fingerprint, "process": os.getpid(),
        }
        refused = client.post("/v1/search/text", json={"query": "tumor"})
        assert refused.status_code == 503 and "ingest" in refused.json()["fix"]
        assert client.get("/v1/slides").json()["total"] == 0
        assert client.get("/v1/slides/a.svs").status_code == 404
    empty.close()


def _words_only(body: dict, fields: set[str]) -> None:
    """An error a user reads: no Python repr, no `None`, no example naming a field the collection lacks."""
    import re

    text = f"{body['error']} {body['fix']}"
    assert "None" not in text and "object at 0x" not in text and "<" not in text, text
    named = set(re.findall(r'"([a-z_]+)":', text)) | set(re.findall(r"'([a-z_]+)'", text))
    assert named <= fields | {"image", "point_id", "top_k", "filters", "gte", "lte", "conch_tiles"}, named - fields


def test_errors_name_the_field_and_a_fix_in_words(client, store):
    fields = {f["name"] for f in client.get("/v1/schema").json()["fields"]}
    wrong_type = client.post("/v1/search/text", json={"query": "tumor", "filters": {"grade": None}}).json()
    assert wrong_type["field"] == "filters.grade" and "no value (null)" in wrong_type["error"]
    _words_only(wrong_type, fields)
    text_for_number = client.post("/v1/search/text", json={"query": "tumor", "filters": {"grade": "high"}}).json()
    assert "grade" in text_for_number["error"] and "whole-number" in text_for_number["error"]
    _words_only(text_for_number, fields)
    not_object = client.post("/v1/search/text", json={"query": "tumor", "filters": ["grade"]}).json()
    assert not_object["field"] == "filters"
    _words_only(not_object, fields)
    upload = client.post("/v1/search/image", files={"image": ("notes.txt", b"not an image", "text/plain")}).json()
    assert upload["field"] == "image" and "not an image" in upload["error"]
    _words_only(upload, fields)
    unknown = client.post("/v1/search/image", json={"point_id": "00000000-0000-0000-0000-000000000000"}).json()
    assert unknown["field"] == "point_id" and "tile" in unknown["error"] and "search" in unknown["fix"]
    _words_only(unknown, fields)
    top_k = client.post("/v1/search/text", json={"query": "tumor", "top_k": "many"}).json()
    assert top_k == {"error": "'top_k' must be a whole number, not \"many\"", "field": "top_k",
                     "fix": "give 'top_k' a whole number"}
    extra = client.post("/v1/search/text", json={"query": "tumor", "sort": "score"}).json()
    assert extra["field"] == "sort" and "query" in extra["fix"]


def test_fields_offer_stored_values_with_counts_and_ranges(client):
    fields = {f["name"]: f for f in client.get("/v1/fields").json()["fields"]}
    diagnosis = fields["diagnosis"]
    assert diagnosis["source"] == "metadata" and diagnosis["type"] == "keyword"
    assert {v["value"]: (v["tiles"], v["slides"]) for v in diagnosis["values"]} == {
        "adenocarcinoma": (24, 1), "adenoma": (24, 1), "normal": (24, 1)}
    assert (fields["age"]["min"], fields["age"]["max"]) == (47.0, 70.25)
    assert fields["grade"]["values"] and (fields["grade"]["min"], fields["grade"]["max"]) == (1, 3)
    assert fields["x"]["source"] == "conchdb" and fields["path"]["values"] is None
    # Declared for every tiles collection but held by none of these tiles: not offered.
    assert "dicom_patient_id" not in fields and "annotation" not in fields


def test_validation_errors_in_words_for_bodies_and_query_parameters(client):
    empty = client.post("/v1/search/text", content=b"", headers={"Content-Type": "application/json"}).json()
    assert empty["error"] == "the request has no JSON body" and "query" in empty["fix"]
    broken = client.post("/v1/search/text", content=b"{'query': 1}", headers={"Content-Type": "application/json"})
    assert broken.json()["error"] == "the body is not valid JSON"
    page = client.get("/v1/slides", params={"page": 0}).json()
    assert page == {"error": "'page' must be at least 1, not 0", "field": "page",
                    "fix": "give 'page' a value at least 1"}
