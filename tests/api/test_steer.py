"""The API's steering: /v1/search/refine, more/less on searches, weak hits, and hits as QuPath GeoJSON."""

from __future__ import annotations

import geojson
import numpy as np
import pytest
from PIL import Image

from conchdb.search.steer import Concept
from tests.api.conftest import TILE


def ids(hits):
    return [h["id"] for h in hits]


def test_ingest_recorded_the_noise_floor(store):
    floor = store.collection_metadata("conch_tiles")["noise_floor"]
    assert floor["slides"] == 3 and floor["tiles"] == 72 and floor["quantile"] == 0.99


def test_refine_moves_the_query_as_the_searcher_does_and_leaves_out_the_marked_hits(client, searcher):
    first = client.post("/v1/search/text", json={"query": "tubular adenoma", "top_k": 10}).json()["hits"]
    like, unlike = [first[3]["id"], first[5]["id"]], [first[0]["id"]]
    body = {"query": "tubular adenoma", "top_k": 10, "like": like, "unlike": unlike,
            "more": [{"text": "mucin", "weight": 0.3}]}
    got = client.post("/v1/search/refine", json=body)
    assert got.status_code == 200, got.text
    vector = searcher.steer(searcher.text_vector("tubular adenoma"), more=[Concept("mucin", 0.3)], like=like,
                            unlike=unlike)
    want = searcher.search(vector, 10, exclude=like + unlike)
    assert ids(got.json()["hits"]) == [h.id for h in want]
    assert not set(ids(got.json()["hits"])) & set(like + unlike)
    by_point = client.post("/v1/search/refine", json={"point_id": first[1]["id"], "like": like, "top_k": 5})
    assert by_point.status_code == 200, by_point.text


def test_more_and_less_on_text_and_image_searches(client, searcher, store):
    body = {"query": "tubular adenoma", "top_k": 8, "more": [{"text": "necrosis"}], "less": [{"text": "fat"}]}
    got = client.post("/v1/search/text", json=body).json()["hits"]
    vector = searcher.steer(searcher.text_vector("tubular adenoma"), more=[Concept("necrosis")], less=[Concept("fat")])
    assert ids(got) == [h.id for h in searcher.search(vector, 8)]
    point = next(iter(store.scroll("conch_tiles"))).id
    image = client.post("/v1/search/image", json={"point_id": point, "top_k": 4, "more": [{"text": "necrosis"}]})
    assert image.status_code == 200, image.text


@pytest.mark.parametrize(("body", "status", "field"), [
    ({"query": "x", "like": ["00000000-0000-0000-0000-000000000000"]}, 404, "like"),
    ({"query": "x", "unlike": ["not-an-id"]}, 404, "unlike"),
    ({"query": "x", "more": [{"text": "necrosis", "weight": 0}]}, 422, "more.0.weight"),
    ({"query": "x", "point_id": "00000000-0000-0000-0000-000000000000"}, 422, "query"),
])
def test_bad_refinements_name_their_field(client, body, status, field):
    got = client.post("/v1/search/refine", json=body)
    assert got.status_code == status, got.text
    assert got.json()["field"] == field and got.json()["fix"]


def test_hits_below_the_noise_floor_are_weak(client, store):
    recorded = store.collection_metadata("conch_tiles")["noise_floor"]["value"]
    tile = next(iter(store.scroll("conch_tiles")))
    image = client.post("/v1/search/image", json={"point_id": tile.id, "top_k": 72}).json()
    assert image["noise_floor"] == pytest.approx(recorded)  # an image query: the floor recorded at ingest
    assert all(h["weak"] == (h["score"] < recorded) for h in image["hits"])
    assert image["hits"][0]["id"] == tile.id and image["hits"][0]["weak"] is False
    text = client.post("/v1/search/text", json={"query": "tubular adenoma", "top_k": 72}).json()
    floor = text["noise_floor"]  # a text query: its own floor, unrelated texts on the same tiles
    assert floor is not None and floor != pytest.approx(recorded)
    assert all(h["weak"] == (h["score"] < floor) for h in text["hits"])


def test_hits_geojson_is_the_slides_hits_in_level0_pixels_each_polygon_its_tile(client, searcher, store, ingested,
                                                                              encoder):
    got = client.get("/v1/slides/case_a/s1.png/hits.geojson", params={"query": "tubular adenoma", "top_k": 5})
    assert got.status_code == 200, got.text
    assert got.headers["content-type"].startswith("application/geo+json")
    doc = geojson.loads(got.text)
    assert doc.is_valid and doc["type"] == "FeatureCollection" and len(doc["features"]) == 5
    stored = {h.id: h for h in store.retrieve("conch_tiles", [f["id"] for f in doc["features"]], with_vectors=True)}
    with Image.open(ingested.cohort / "case_a/s1.png") as image:
        slide = np.asarray(image.convert("RGB"))
    for feature in doc["features"]:
        ring = feature["geometry"]["coordinates"][0]
        assert feature["geometry"]["type"] == "Polygon" and ring[0] == ring[-1] and len(ring) == 5
        props = feature["properties"]
        assert props["objectType"] == "annotation" and props["classification"]["name"].startswith("conchdb")
        assert len(props["classification"]["color"]) == 3 and 0 <= props["measurements"]["score"] <= 1
        hit = stored[feature["id"]]
        xs, ys = [p[0] for p in ring], [p[1] for p in ring]
        assert (min(xs), min(ys), max(xs) - min(xs)) == (hit.payload["x"], hit.payload["y"], hit.payload["size"])
        cut = slide[min(ys):max(ys), min(xs):max(xs)]  # the polygon cut from the slide is the hit's tile
        assert cut.shape == (TILE, TILE, 3)
        assert float(encoder.encode_tiles(cut[None])[0] @ hit.vector) > 0.9999
    bad = client.get("/v1/slides/nope.png/hits.geojson", params={"query": "x"})
    assert bad.status_code == 404 and bad.json()["field"] == "slide_id"
