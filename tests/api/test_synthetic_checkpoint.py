"""The endpoints with the full synthetic CONCH checkpoint on a store that `conchdb ingest` filled:
the same hits, texts and class scores as `Searcher` for the same queries and filters.

The cohort is two small slides (4 tiles each at 64 px): the full model costs about a second a
tile on this CPU, and the point is that the server and the library agree on a real model.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conchdb.api import ApiSettings, create_app
from conchdb.cli import app as cli_app
from conchdb.model.encoder import Encoder
from conchdb.search import Searcher, classes_from_labels
from conchdb.search.filters import parse_where
from conchdb.store.edge import EdgeStore
from tests.api.test_endpoints import close, same_hits
from tests.search.conftest import make_slide_image

pytestmark = pytest.mark.slow
runner = CliRunner()


@pytest.fixture(scope="module")
def served(tmp_path_factory, synthetic_checkpoint, tokenizer_path):
    from fastapi.testclient import TestClient

    base = tmp_path_factory.mktemp("synthetic-api")
    cohort = base / "cohort"
    cohort.mkdir()
    for n, (name, site) in enumerate([("a.png", "colon"), ("b.png", "lung")]):
        make_slide_image(n).crop((0, 0, 128, 128)).save(cohort / name, dpi=(50800, 50800))
        with open(cohort / "manifest.csv", "a") as f:
            f.write("slide,site\n" * (n == 0) + f"{name},{site}\n")
    model = ["--checkpoint", str(synthetic_checkpoint), "--tokenizer", str(tokenizer_path), "--device", "cpu",
             "--precision", "fp32"]
    result = runner.invoke(cli_app, ["ingest", str(cohort), "--store", str(base / "store"), "--tile-px", "64",
                                     "--min-tissue", "0", "--readers", "0", "--json", *model])
    assert result.exit_code == 0, result.output
    encoder = Encoder.load(str(synthetic_checkpoint), tokenizer_path, device="cpu", precision="fp32")
    store = EdgeStore(base / "store")
    searcher = Searcher(encoder, store, "conch_tiles", cache_dir=base / "cache")
    with TestClient(create_app(searcher, ApiSettings()), base_url="http://127.0.0.1") as client:
        yield client, searcher, cohort
    store.close()


def test_every_endpoint_agrees_with_the_searcher_on_the_synthetic_checkpoint(served):
    client, searcher, cohort = served
    assert client.get("/v1/health").json()["points"] == 8
    flt = {"site": "colon"}
    got = client.post("/v1/search/text", json={"query": "tumor necrosis", "top_k": 3, "filters": flt}).json()
    where = parse_where(["site=colon"], searcher.field_types())
    same_hits(got["hits"], searcher.search(searcher.text_vector("tumor necrosis"), 3, where))

    tiles = sorted(searcher.store.scroll("conch_tiles"), key=lambda h: h.id)
    target = tiles[3]
    p = target.payload
    with Image.open(cohort / p["slide_id"]) as image:
        pixels = image.convert("RGB").crop((p["x"], p["y"], p["x"] + 64, p["y"] + 64))
    buffer = io.BytesIO()
    pixels.save(buffer, "PNG")
    by_upload = client.post("/v1/search/image", files={"image": ("t.png", buffer.getvalue(), "image/png")},
                            data={"top_k": "3"}).json()["hits"]
    assert by_upload[0]["id"] == target.id and by_upload[0]["score"] >= 0.999
    same_hits(by_upload, searcher.search(searcher.image_vector(pixels), 3))
    by_point = client.post("/v1/search/image", json={"point_id": target.id, "top_k": 3}).json()["hits"]
    same_hits(by_point, searcher.search(searcher.point_vector(target.id), 3))
    region = {"slide_id": p["slide_id"], "x": p["x"], "y": p["y"], "w": 64, "h": 64, "top_k": 2}
    assert client.post("/v1/search/image", json=region).json()["hits"][0]["id"] == target.id

    vector = searcher.point_vector(target.id)
    texts = client.post("/v1/describe", json={"point_id": target.id, "top_k": 3}).json()["texts"]
    assert close(texts, [m.to_dict() for m in searcher.describe(vector, 3)])
    labels = ["adenocarcinoma", "normal tissue"]
    scores = client.post("/v1/classify", json={"point_id": target.id, "labels": labels}).json()
    assert close(scores, searcher.classify(vector, classes_from_labels(labels)).to_dict())
    slide = client.post("/v1/classify", json={"slide_id": "a.png", "labels": labels, "topk": [1, 2]}).json()
    n, results = searcher.classify_slide("a.png", classes_from_labels(labels), [1, 2])
    assert close(slide, {"slide_id": "a.png", "tiles": n, "results": [r.to_dict() for r in results]})

    tile = Image.open(io.BytesIO(client.get(f"/v1/tiles/{target.id}.jpg").content))
    assert tile.size == (64, 64)
    overlay = Image.open(io.BytesIO(client.get("/v1/slides/a.png/heatmap.png", params={"query": "tumor"}).content))
    assert overlay.mode == "RGBA" and np.asarray(overlay)[..., 3].max() == 255
    assert client.get("/v1/slides/b.png.dzi").status_code == 200
    assert [s["slide_id"] for s in client.get("/v1/slides").json()["slides"]] == ["a.png", "b.png"]
