"""API fixtures: a cohort ingested by the real pipeline with the tiny model, and apps over it.

The slides are the search tests' synthetic images (a distinct colour and texture in every
64-px cell), written as PNGs that record 0.5 µm/px, with a manifest; `conchdb.ingest`
tiles them at 64 px, so that every stored tile can be cut again from its slide and found.
"""

from __future__ import annotations

import csv
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from conchdb.api import ApiSettings, create_app
from conchdb.ingest.pipeline import IngestOptions, ingest
from conchdb.search import Searcher
from conchdb.slides.grid import TilingParams
from conchdb.store.edge import EdgeStore
from tests.search.conftest import SLIDES, encoder, make_slide_image  # noqa: F401 - fixture

KEY = "test-key-0123456789"
TILE = 64
MANIFEST_FIELDS = ("slide", "patient_id", "diagnosis", "grade", "age", "consented", "site")


def write_cohort(root: Path) -> Path:
    """The synthetic slides as PNGs at 0.5 µm/px, and their manifest."""
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, MANIFEST_FIELDS)
        writer.writeheader()
        for n, (slide_id, columns) in enumerate(SLIDES.items()):
            path = root / slide_id
            path.parent.mkdir(parents=True, exist_ok=True)
            make_slide_image(n).save(path, dpi=(25400 / 0.5, 25400 / 0.5))
            patient = "P-" + slide_id.split("/")[0].removeprefix("case_")  # case_a's two slides are one patient's
            writer.writerow({"slide": slide_id, "patient_id": patient, **columns})
    return root


def ingest_cohort(root: Path, store_dir: Path, encoder) -> None:  # noqa: F811
    with EdgeStore(store_dir) as store:
        options = IngestOptions(TilingParams(0.5, TILE, None, 0.0), readers=0)
        summary = ingest(root, encoder, store, "conch_tiles", options=options)
    assert summary.exit_code == 0 and summary.tiles_written == 72


@dataclass
class Ingested:
    cohort: Path
    store: Path


@pytest.fixture(scope="session")
def ingested(tmp_path_factory, encoder) -> Ingested:  # noqa: F811
    base = tmp_path_factory.mktemp("api")
    cohort = write_cohort(base / "cohort")
    ingest_cohort(cohort, base / "store", encoder)
    return Ingested(cohort, base / "store")


@pytest.fixture(scope="module")
def store(ingested, tmp_path_factory) -> Iterator[EdgeStore]:
    """A module's own copy of the ingested store, open."""
    folder = tmp_path_factory.mktemp("api-store") / "store"
    shutil.copytree(ingested.store, folder)
    opened = EdgeStore(folder)
    yield opened
    opened.close()
    shutil.rmtree(folder.parent, ignore_errors=True)  # a store holds ~600 MB of preallocated files


@pytest.fixture(scope="module")
def searcher(store, encoder, tmp_path_factory) -> Searcher:  # noqa: F811
    return Searcher(encoder, store, "conch_tiles", cache_dir=tmp_path_factory.mktemp("cache"))


def make_client(searcher: Searcher, **settings) -> TestClient:
    return TestClient(create_app(searcher, ApiSettings(**settings)), base_url="http://127.0.0.1")


@pytest.fixture(scope="module")
def client(searcher) -> Iterator[TestClient]:
    """An app without a key (as on loopback)."""
    with make_client(searcher) as c:
        yield c


@pytest.fixture(scope="module")
def keyed(searcher) -> Iterator[TestClient]:
    """An app with the key `KEY` and small upload limits."""
    with make_client(searcher, api_key=KEY, max_upload_bytes=200_000, max_pixels=1_000_000) as c:
        yield c


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """uvicorn serving an app on 127.0.0.1 in a thread of this process."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the test server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
