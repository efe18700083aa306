"""A DICOMweb slide in `conchdb serve`: its tiles, thumbnail, heatmap and deep zoom are read
from the PACS (Orthanc, tests/dicom.py) through the same `Slide` that ingest read."""

from __future__ import annotations

import io
import xml.etree.ElementTree as ET
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conchdb.api import ApiSettings, create_app
from conchdb.ingest.cohort import discover_dicomweb
from conchdb.ingest.manifest import read_manifest
from conchdb.ingest.pipeline import Ingest, IngestOptions
from conchdb.search import Searcher
from conchdb.slides.slide import open_slide
from conchdb.store.edge import EdgeStore
from tests.search.conftest import encoder  # noqa: F401 - fixture

COLLECTION = "conch_tiles"


@pytest.fixture(scope="module")
def served(orthanc, encoder, tmp_path_factory) -> Iterator[tuple[TestClient, EdgeStore, str]]:  # noqa: F811
    folder = tmp_path_factory.mktemp("dicomweb-api")
    cohort = discover_dicomweb(orthanc.source)
    store = EdgeStore(folder / "store")
    summary = Ingest(cohort, read_manifest(None, cohort), encoder, store, COLLECTION, IngestOptions(readers=0)).run()
    assert summary.exit_code == 0
    searcher = Searcher(encoder, store, COLLECTION, cache_dir=folder / "cache")
    with TestClient(create_app(searcher, ApiSettings()), base_url="http://127.0.0.1") as client:
        yield client, store, cohort.slides[0].id
    store.close()


def test_a_dicomweb_hit_has_its_tile_image_deep_zoom_and_heatmap(served, orthanc, slides_dir):
    client, store, slide_id = served
    hits = client.post("/v1/search/text", json={"query": "tumor", "top_k": 1})
    assert hits.status_code == 200, hits.text
    (hit,) = hits.json()["hits"]
    assert hit["slide_id"] == slide_id
    tile = client.get(hit["tile_url"])
    assert tile.status_code == 200 and tile.headers["content-type"] == "image/jpeg"
    payload = next(h.payload for h in store.scroll(COLLECTION) if h.id == hit["id"])
    with open_slide(slides_dir / "cmu_small_region.svs") as source:  # the same pixels as the source file
        size = payload["size"]
        expected = np.asarray(source.read_region((payload["x"], payload["y"]), 0, (size, size)).resize((512, 512)))
    served_tile = np.asarray(Image.open(io.BytesIO(tile.content)))
    assert served_tile.shape == expected.shape and np.abs(served_tile.astype(int) - expected).mean() < 8

    record = client.get(f"/v1/slides/{slide_id}").json()
    dzi = client.get(record["dzi_url"])
    assert dzi.status_code == 200, dzi.text
    dims = ET.fromstring(dzi.text).find("{http://schemas.microsoft.com/deepzoom/2008}Size")
    assert (dims.get("Width"), dims.get("Height")) == ("2220", "2967")
    top = client.get(f"/v1/slides/{slide_id}_files/12/0_0.jpeg")  # level 12 is full resolution
    assert top.status_code == 200 and Image.open(io.BytesIO(top.content)).size == (255, 255)
    thumb = client.get(record["thumbnail_url"], params={"size": 128})
    assert thumb.status_code == 200
    heat = client.get(f"/v1/slides/{slide_id}/heatmap.png", params={"query": "tumor", "size": 256})
    assert heat.status_code == 200 and Image.open(io.BytesIO(heat.content)).mode == "RGBA"

    orthanc.stop()  # what the server fetched is cached: the same pictures are served without the PACS
    try:
        assert client.get(hit["tile_url"]).content == tile.content
        assert client.get(f"/v1/slides/{slide_id}_files/12/0_0.jpeg").content == top.content
    finally:
        orthanc.start()
