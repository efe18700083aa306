"""Every endpoint on an ingested store: the same hits and scores as `Searcher` for the same query."""

from __future__ import annotations

import io
import threading
import time
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from conchdb.api.batching import ModelRunner, Tower
from conchdb.search import classes_from_labels
from conchdb.search.filters import parse_where
from tests.api.conftest import TILE, make_client


def ids(hits):
    return [h["id"] for h in hits]


def same_hits(api_hits, searcher_hits):
    assert ids(api_hits) == [h.id for h in searcher_hits]
    for got, want in zip(api_hits, searcher_hits, strict=True):
        assert got["score"] == pytest.approx(want.score, abs=1e-5)
        assert (got["slide_id"], got["x"], got["y"], got["size"]) == (want.slide_id, want.x, want.y, want.size)
        assert got["payload"] == want.payload
        assert got["tile_url"] == f"/v1/tiles/{want.id}.jpg"
        assert got["viewer_url"].startswith("/?slide=") and got["viewer_url"].endswith(f"&point={want.id}")


def close(got, want) -> bool:
    """JSON-equal, floats within 1e-5."""
    if isinstance(want, float):
        return isinstance(got, (int, float)) and abs(got - want) <= 1e-5
    if isinstance(want, dict):
        return isinstance(got, dict) and got.keys() == want.keys() and all(close(got[k], want[k]) for k in want)
    if isinstance(want, (list, tuple)):
        return isinstance(got, list) and len(got) == len(want) and all(map(close, got, want))
    return got == want


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def stored_tile(cohort, payload) -> Image.Image:
    with Image.open(cohort / payload["slide_id"]) as image:
        x, y = payload["x"], payload["y"]
        return image.convert("RGB").crop((x, y, x + TILE, y + TILE))


@pytest.fixture(scope="module")
def tiles(store):
    return sorted(store.scroll("conch_tiles"), key=lambda h: h.id)


def test_text_search_gives_the_searchers_hits_with_filters_and_pages(client, searcher):
    body = {"query": "tubular adenoma", "top_k": 5, "page": 2, "filters": {"grade": {"gte": 2}, "consented": True}}
    got = client.post("/v1/search/text", json=body)
    assert got.status_code == 200, got.text
    flt = parse_where(["grade>=2", "consented=true"], searcher.field_types())
    want = searcher.search(searcher.text_vector("tubular adenoma"), 5, flt, offset=5)
    same_hits(got.json()["hits"], want)
    assert [h["rank"] for h in got.json()["hits"]] == [6, 7, 8, 9, 10]
    assert {h["payload"]["slide_id"] for h in got.json()["hits"]} == {"case_b/s3.png"}


def test_text_search_with_ensemble_in_and_nin(client, searcher):
    body = {"query": "necrosis", "ensemble": True, "top_k": 7,
            "filters": {"diagnosis": {"in": ["adenoma", "normal"]}, "site": {"nin": ["colon"]}}}
    got = client.post("/v1/search/text", json=body).json()["hits"]
    flt = parse_where(["diagnosis=adenoma,normal", "site!=colon"], searcher.field_types())
    want = searcher.search(searcher.text_vector("necrosis", ensemble=True), 7, flt)
    same_hits(got, want)
    assert {h["payload"]["site"] for h in got} == {"rectum"}  # `ne` leaves out tiles without a site


def test_grouping_by_slide_and_min_score(client, searcher):
    got = client.post("/v1/search/text", json={"query": "mucosa", "group_by": "slide", "top_k": 3, "group_size": 2})
    want = searcher.search(searcher.text_vector("mucosa"), 3, group_by="slide", group_size=2)
    hits = got.json()["hits"]
    same_hits(hits, want)
    assert len({h["slide_id"] for h in hits}) == 3
    for hit, group in zip(hits, want, strict=True):
        same_hits(hit["tiles"], group.tiles)
    floor = want[0].score - 1e-4
    kept = client.post("/v1/search/text", json={"query": "mucosa", "min_score": floor, "top_k": 50}).json()["hits"]
    assert kept and all(h["score"] >= floor for h in kept)


def test_an_uploaded_tile_finds_itself_first_as_the_searcher_does(client, searcher, tiles, ingested):
    target = tiles[17]
    pixels = stored_tile(ingested.cohort, target.payload)
    got = client.post("/v1/search/image", files={"image": ("q.png", png(pixels), "image/png")},
                      data={"top_k": "4", "filters": '{"cohort": "cohort"}'})
    assert got.status_code == 200, got.text
    hits = got.json()["hits"]
    assert hits[0]["id"] == target.id and hits[0]["score"] >= 0.999
    same_hits(hits, searcher.search(searcher.image_vector(pixels), 4))


def test_a_point_and_a_stored_slide_region_find_their_tile(client, searcher, tiles):
    target = tiles[30]
    by_point = client.post("/v1/search/image", json={"point_id": target.id, "top_k": 3}).json()["hits"]
    same_hits(by_point, searcher.search(searcher.point_vector(target.id), 3))
    assert by_point[0]["id"] == target.id
    p = target.payload
    region = {"slide_id": p["slide_id"], "x": p["x"], "y": p["y"], "w": p["size"], "h": p["size"], "top_k": 3}
    by_region = client.post("/v1/search/image", json=region).json()["hits"]
    assert by_region[0]["id"] == target.id and by_region[0]["score"] >= 0.999


def test_describe_and_classify_match_the_searcher(client, searcher, tiles):
    point = tiles[5].id
    vector = searcher.point_vector(point)
    got = client.post("/v1/describe", json={"point_id": point, "top_k": 4}).json()["texts"]
    assert close(got, [m.to_dict() for m in searcher.describe(vector, 4)])
    labels = ["adenocarcinoma", "normal colonic mucosa"]
    got = client.post("/v1/classify", json={"point_id": point, "labels": labels}).json()
    assert close(got, searcher.classify(vector, classes_from_labels(labels)).to_dict())
    prompts = {"tumor": ["a photo of tumor", "tumor tissue"], "stroma": ["stroma"]}
    by_prompts = client.post("/v1/classify", json={"point_id": point, "prompts": prompts})
    assert by_prompts.status_code == 200 and {c["label"] for c in by_prompts.json()["classes"]} == set(prompts)


def test_mi_zero_on_a_stored_slide(client, searcher):
    labels = ["adenocarcinoma", "normal"]
    got = client.post("/v1/classify", json={"slide_id": "case_a/s2.png", "labels": labels, "topk": [1, 5]})
    assert got.status_code == 200, got.text
    n, results = searcher.classify_slide("case_a/s2.png", classes_from_labels(labels), [1, 5])
    assert close(got.json(), {"slide_id": "case_a/s2.png", "tiles": n, "results": [r.to_dict() for r in results]})
    assert n == 24


def test_a_tile_jpeg_is_the_stored_tile_cut_from_its_slide(client, tiles, ingested):
    target = tiles[11]
    got = client.get(f"/v1/tiles/{target.id}.jpg")
    assert got.status_code == 200 and got.headers["content-type"] == "image/jpeg"
    image = np.asarray(Image.open(io.BytesIO(got.content)).convert("RGB"), dtype=np.float64)
    want = np.asarray(stored_tile(ingested.cohort, target.payload), dtype=np.float64)
    assert image.shape == want.shape == (TILE, TILE, 3)
    blocks = (TILE // 8, 8, TILE // 8, 8, 3)  # JPEG keeps each 8-px block's colour, not the noise in it
    assert np.abs(image.reshape(blocks).mean((1, 3)) - want.reshape(blocks).mean((1, 3))).mean() < 3
    assert client.get(f"/v1/tiles/{target.id}.jpg").content == got.content  # cached
    assert client.get("/v1/tiles/6b1e0000-0000-0000-0000-000000000000.jpg").status_code == 404


def test_slides_are_listed_paged_and_filtered(client):
    first = client.get("/v1/slides", params={"page_size": 2}).json()
    assert first["total"] == 3 and [s["slide_id"] for s in first["slides"]] == ["case_a/s1.png", "case_a/s2.png"]
    second = client.get("/v1/slides", params={"page_size": 2, "page": 2}).json()
    assert [s["slide_id"] for s in second["slides"]] == ["case_b/s3.png"]
    done = client.get("/v1/slides", params={"filters": '{"status": "done", "grade": {"gt": 1}}'}).json()
    assert [s["slide_id"] for s in done["slides"]] == ["case_a/s2.png", "case_b/s3.png"]
    assert all("path" not in s for s in done["slides"])
    bad = client.get("/v1/slides", params={"filters": '{"grade": "high"}'})
    assert bad.status_code == 422 and bad.json()["field"] == "filters.grade"


def test_a_slide_record_its_thumbnail_and_deep_zoom(client):
    record = client.get("/v1/slides/case_a/s1.png").json()
    assert record["records"][0]["status"] == "done" and record["records"][0]["diagnosis"] == "adenocarcinoma"
    assert record["records"][0]["tiles"] == 24
    thumb = client.get(record["thumbnail_url"], params={"size": 128})
    assert thumb.status_code == 200 and Image.open(io.BytesIO(thumb.content)).size[0] == 128
    dzi = client.get(record["dzi_url"])
    assert dzi.status_code == 200
    size = ET.fromstring(dzi.text).find("{http://schemas.microsoft.com/deepzoom/2008}Size")
    assert (size.get("Width"), size.get("Height")) == ("384", "256")
    top = client.get("/v1/slides/case_a%2Fs1.png_files/9/0_0.jpeg")  # level 9 is full resolution
    assert top.status_code == 200 and Image.open(io.BytesIO(top.content)).size == (255, 255)
    assert client.get("/v1/slides/case_a%2Fs1.png_files/9/9_9.jpeg").status_code == 404
    assert client.get("/v1/slides/case_a%2Fs1.png_files/40/0_0.jpeg").status_code == 404


def test_heatmap_overlay_and_figure(client, searcher):
    overlay = client.get("/v1/slides/case_a/s1.png/heatmap.png", params={"query": "tumor", "size": 192})
    assert overlay.status_code == 200 and overlay.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(overlay.content))
    assert image.mode == "RGBA" and image.size == (192, 128)
    tiles, scores = searcher.slide_similarity("case_a/s1.png", searcher.text_vector("tumor"))
    best = tiles[int(np.argmax(scores))].payload
    pixel = image.getpixel((best["x"] // 2 + 16, best["y"] // 2 + 16))
    assert pixel[3] == 255 and pixel[:3] == (253, 231, 37)  # the top of the colour scale (viridis)
    low, high = float(overlay.headers["X-Score-Low"]), float(overlay.headers["X-Score-High"])
    assert abs(low - float(np.min(scores))) < 1e-5 and abs(high - float(np.max(scores))) < 1e-5  # the legend's ends
    figure = client.get("/v1/slides/case_a/s1.png/heatmap.png", params={"query": "tumor", "style": "figure"})
    assert figure.status_code == 200 and Image.open(io.BytesIO(figure.content)).mode == "RGB"


def test_health_stats_and_schema(client):
    health = client.get("/v1/health").json()
    assert health["status"] == "ok" and health["points"] == 72 and health["model"] and health["store"]
    stats = client.get("/v1/stats").json()
    tiles = next(c for c in stats["collections"] if c["name"] == "conch_tiles")
    assert tiles["points"] == 72 and tiles["slides_by_status"] == {"done": 3}
    fields = {f["name"]: f["type"] for f in client.get("/v1/schema").json()["fields"]}
    assert fields["grade"] == "integer" and fields["consented"] == "bool" and fields["diagnosis"] == "keyword"


def test_a_slide_whose_file_moved_gives_404_with_a_message(searcher, ingested):
    path = ingested.cohort / "case_b" / "s3.png"
    moved = path.with_name("s3.moved")
    with make_client(searcher) as fresh:  # empty caches
        hit = fresh.post("/v1/search/text", json={"query": "x", "filters": {"slide_id": "case_b/s3.png"}}).json()
        path.rename(moved)
        try:
            for url in (hit["hits"][0]["tile_url"], "/v1/slides/case_b/s3.png/thumbnail.jpg",
                        "/v1/slides/case_b%2Fs3.png.dzi"):
                got = fresh.get(url)
                assert got.status_code == 404, url
                assert "s3" in got.json()["error"] and "ingest" in got.json()["fix"]
        finally:
            moved.rename(path)


def test_text_queries_arriving_together_are_encoded_in_one_batch_and_cached():
    calls: list[list[str]] = []
    first = threading.Event()
    release = threading.Event()

    def blocked_encode(texts):
        calls.append(list(texts))
        first.set()
        release.wait(30)
        return np.stack([np.full(4, len(t), dtype=np.float32) for t in texts])

    runner = ModelRunner({"text": Tower(encode=blocked_encode, max_batch=64, cache_size=16)})
    texts = [f"query {'x' * n}" for n in range(8)]
    out: dict[str, np.ndarray] = {}

    def ask(text: str) -> None:
        out[text] = runner.vectors("text", [text], keys=[text])[0]

    threads = [threading.Thread(target=ask, args=(t,)) for t in [*texts, texts[5]]]  # texts[5] twice
    threads[0].start()
    assert first.wait(30)  # the first text is being encoded alone; the rest arrive while it runs
    for thread in threads[1:]:
        thread.start()
    deadline = time.monotonic() + 30
    while runner.pending("text") < 7 and time.monotonic() < deadline:
        time.sleep(0.01)
    release.set()
    for thread in threads:
        thread.join(30)
    assert all(out[t][0] == len(t) for t in texts)
    assert len(calls) == 2 and sorted(calls[1]) == sorted(texts[1:])  # the rest together, texts[5] once
    runner.vectors("text", [texts[3]], keys=[texts[3]])
    assert len(calls) == 2  # cached
    runner.close()


def test_slide_search_ranks_the_other_stored_slides_as_the_searcher_does(client, searcher):
    got = client.post("/v1/search/slide", json={"slide_id": "case_a/s1.png", "top_k": 5})
    assert got.status_code == 200, got.text
    doc = got.json()
    want = searcher.search_slides(searcher.slide_query("case_a/s1.png"), 5)
    assert doc["slide_id"] == "case_a/s1.png" and doc["mosaic_tiles"] > 0
    assert [(r["slide_id"], round(r["score"], 5)) for r in doc["results"]] == [
        (m.slide_id, round(m.score, 5)) for m in want
    ]
    assert {r["slide_id"] for r in doc["results"]} == {"case_a/s2.png", "case_b/s3.png"}
    assert client.post("/v1/search/slide", json={"slide_id": "nope.png"}).status_code == 404
    missing = client.post("/v1/search/slide", json={"slide_id": "case_a/s1.png", "exclude_same": ["nope"]})
    assert missing.status_code == 422 and "nope" in missing.text
    one = client.post("/v1/search/slide", json={"slide_id": "case_a/s1.png", "top_k": 1, "candidates": 1})
    assert one.status_code == 200 and len(one.json()["results"]) == 1
    for bad in (0, 1001):
        refused = client.post("/v1/search/slide", json={"slide_id": "case_a/s1.png", "candidates": bad})
        assert refused.status_code == 422 and "candidates" in refused.text
