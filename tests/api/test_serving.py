"""The server under concurrent requests: what waits for the model, what does not, and `serve --workers`.

The image tower is held (`HeldEncoder`) until the test releases it, so "queued behind an
encode" is a state the test sets up and observes, not a timing. Starlette's thread pool is
shrunk to 8 threads (`SmallPool`), and the service's own threads for requests that use the
model to 9, one per image query the tests send: so a request waiting for the model on a
thread of Starlette's pool would leave a tile request without one, and a search by stored
point sent to the model's threads would find none free.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace

import anyio.to_thread
import httpx
import numpy as np
import pytest
from PIL import Image
from qdrant_client import QdrantClient
from typer.testing import CliRunner

from conchdb.api import ApiSettings, create_app
from conchdb.api.service import Service
from conchdb.api.shared import SerialStore
from conchdb.cli import app as cli_app
from conchdb.store.copy import copy_store
from conchdb.store.edge import EdgeStore
from conchdb.store.server import ServerStore
from tests.api.conftest import LiveServer, free_port
from tests.api.qdrant_standin import standin_app
from tests.search.conftest import checkpoint  # noqa: F401 - fixture

WAIT_S = 60  # a bound for what must happen, never a measured time
QUIET_LOCAL_MODE = pytest.mark.filterwarnings(
    "ignore:Payload indexes have no effect:UserWarning", "ignore:Local mode performs exact:UserWarning"
)


class HeldEncoder:
    """The tiny encoder with its image tower held until `release` is set; records each batch's size."""

    def __init__(self, inner):
        self._inner = inner
        self.release = threading.Event()
        self.started = threading.Event()
        self.batches: list[int] = []

    def __getattr__(self, name: str):
        return getattr(self._inner, name)

    def encode_pixels(self, pixels, raw: bool = False):
        self.batches.append(len(pixels))
        self.started.set()
        assert self.release.wait(WAIT_S), "the test never released the image tower"
        return self._inner.encode_pixels(pixels, raw)


class SmallPool:
    """The app with Starlette's thread pool (anyio's default limiter, 40 threads) cut to `threads`."""

    def __init__(self, app, threads: int):
        self.app, self.threads = app, threads
        self.state = app.state

    async def __call__(self, scope, receive, send):
        anyio.to_thread.current_default_thread_limiter().total_tokens = self.threads
        await self.app(scope, receive, send)


def until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.01)


def png(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def search_image(url: str, seed: int, out: dict[int, int]) -> None:
    with httpx.Client(base_url=url, trust_env=False, timeout=WAIT_S) as client:
        got = client.post("/v1/search/image", files={"image": ("q.png", png(seed), "image/png")}, data={"top_k": "3"})
        out[seed] = got.status_code


@pytest.fixture
def held(searcher) -> Iterator[tuple[LiveServer, HeldEncoder, Service]]:
    """A live server whose image tower is held, with 8 threads in Starlette's pool and 9 for model requests."""
    encoder = HeldEncoder(searcher.encoder)
    app = create_app(replace(searcher, encoder=encoder), ApiSettings(model_requests=9, image_batch=8))
    try:
        with LiveServer(SmallPool(app, threads=8)) as server:
            yield server, encoder, app.state.service
    finally:
        encoder.release.set()
        app.state.service.close()


def start_image_queries(url: str, seeds: range, out: dict[int, int]) -> list[threading.Thread]:
    threads = [threading.Thread(target=search_image, args=(url, seed, out), daemon=True) for seed in seeds]
    for thread in threads:
        thread.start()
    return threads


def test_a_tile_request_issued_while_8_image_encodes_are_queued_completes_before_them(held):
    """And a search by stored point: neither needs the model, so neither waits for it."""
    server, encoder, service = held
    with httpx.Client(base_url=server.url, trust_env=False, timeout=WAIT_S) as client:
        hit = client.post("/v1/search/text", json={"query": "tumor", "top_k": 1}).json()["hits"][0]
        done: dict[int, int] = {}
        first = start_image_queries(server.url, range(1), done)
        until(encoder.started.is_set, "the first image's encode to start")
        queued = start_image_queries(server.url, range(1, 9), done)
        until(lambda: service.runner.pending("image") == 8, "8 image queries to wait for the model")
        tile = client.get(hit["tile_url"])  # the pool has 8 threads: none may be held by the 9 image requests
        assert tile.status_code == 200 and tile.headers["content-type"] == "image/jpeg"
        by_point = client.post("/v1/search/image", json={"point_id": hit["id"], "top_k": 3})
        assert by_point.status_code == 200 and by_point.json()["hits"][0]["id"] == hit["id"]
        assert done == {}  # every image query still waits
    encoder.release.set()
    for thread in first + queued:
        thread.join(WAIT_S)
    assert done == dict.fromkeys(range(9), 200)


def test_image_queries_arriving_together_are_encoded_as_one_batch(held):
    server, encoder, service = held
    done: dict[int, int] = {}
    first = start_image_queries(server.url, range(1), done)
    until(encoder.started.is_set, "the first image's encode to start")
    together = start_image_queries(server.url, range(1, 6), done)
    until(lambda: service.runner.pending("image") == 5, "5 image queries to wait for the model")
    encoder.release.set()
    for thread in first + together:
        thread.join(WAIT_S)
    assert done == dict.fromkeys(range(6), 200)
    assert encoder.batches == [1, 5] and service.runner.batches["image"] == [1, 5]


def test_a_text_query_is_answered_while_an_image_batch_is_encoding(held):
    server, encoder, service = held
    done: dict[int, int] = {}
    first = start_image_queries(server.url, range(1), done)
    until(encoder.started.is_set, "the first image's encode to start")
    with httpx.Client(base_url=server.url, trust_env=False, timeout=WAIT_S) as client:
        text = client.post("/v1/search/text", json={"query": "a text nobody asked for before", "top_k": 3})
    assert text.status_code == 200 and len(text.json()["hits"]) == 3
    assert done == {}  # the image is still being encoded
    encoder.release.set()
    for thread in first:
        thread.join(WAIT_S)
    assert done == {0: 200}


def test_a_request_whose_client_disconnects_while_it_waits_is_never_encoded(held):
    server, encoder, service = held
    done: dict[int, int] = {}
    first = start_image_queries(server.url, range(1), done)
    until(encoder.started.is_set, "the first image's encode to start")
    request = httpx.Request("POST", f"{server.url}/v1/search/image",
                            files={"image": ("q.png", png(99), "image/png")}, data={"top_k": "3"})
    body = request.read()
    head = (f"POST /v1/search/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {request.headers['content-type']}"
            f"\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    with socket.create_connection(("127.0.0.1", server.port)) as gone:
        gone.sendall(head + body)
        until(lambda: service.runner.pending("image") == 1, "the second image query to wait for the model")
    until(lambda: service.runner.pending("image") == 0, "the server to notice that the client left")
    encoder.release.set()
    for thread in first:
        thread.join(WAIT_S)
    until(lambda: service.runner.skipped == 1, "the image thread to drop the query nobody waits for")
    assert done == {0: 200}
    assert encoder.batches == [1]  # the departed client's image was never encoded


@pytest.fixture(scope="module")
def standin(store) -> Iterator[LiveServer]:
    """The stand-in Qdrant server (`qdrant_standin`) holding a copy of the ingested collections."""
    local = QdrantClient(":memory:")
    copy_store(store, ServerStore(client=local))
    with LiveServer(standin_app(local)) as server:
        yield server


@QUIET_LOCAL_MODE
def test_the_store_is_serialized_in_process_and_queried_concurrently_on_a_qdrant_server(searcher, standin):
    embedded = Service(searcher, ApiSettings())
    local_mode = Service(replace(searcher, store=ServerStore(client=QdrantClient(":memory:"))), ApiSettings())
    server = ServerStore(url=standin.url)
    remote = Service(replace(searcher, store=server), ApiSettings())
    try:
        assert isinstance(embedded.store, SerialStore) and isinstance(local_mode.store, SerialStore)
        assert remote.store is server
        assert remote.health()["status"] == "ok" and remote.health()["points"] == 72
    finally:
        for service in (embedded, local_mode, remote):
            service.close()


@QUIET_LOCAL_MODE
def test_serve_with_2_workers_over_the_server_store_standin_answers_from_both_processes(
    standin, tmp_path, checkpoint, tokenizer_path  # noqa: F811
):
    port = free_port()
    env = {**os.environ, "CONCHDB_HOME": str(tmp_path / "home")}
    for name in ("CONCHDB_API_KEY", "CONCHDB_QDRANT_URL", "CONCHDB_STORE"):
        env.pop(name, None)
    command = [sys.executable, "-m", "conchdb.cli", "serve", "--workers", "2", "--qdrant-url", standin.url,
               "--port", str(port), "--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer_path),
               "--device", "cpu", "--precision", "fp32"]
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    processes: set[int] = set()
    try:
        deadline = time.monotonic() + 180  # two processes load the model; a bound, not a measurement
        while len(processes) < 2:
            assert server.poll() is None, server.stderr.read().decode() if server.stderr else ""
            assert time.monotonic() < deadline, f"answers came from {processes} only"
            try:  # a new connection each time, so that either process may accept it
                health = httpx.get(f"http://127.0.0.1:{port}/v1/health", trust_env=False, timeout=10).json()
            except httpx.HTTPError:
                time.sleep(0.2)
                continue
            assert health["status"] == "ok" and health["points"] == 72
            processes.add(health["process"])
        assert server.pid not in processes  # the parent only supervises
        hits = httpx.post(f"http://127.0.0.1:{port}/v1/search/text", json={"query": "tumor", "top_k": 3},
                          trust_env=False, timeout=60)
        assert hits.status_code == 200 and len(hits.json()["hits"]) == 3
    finally:
        server.terminate()
        server.wait(60)


def test_serve_with_workers_over_the_embedded_store_is_refused_with_the_reason(ingested, tmp_path, monkeypatch):
    folder = tmp_path / "store"
    shutil.copytree(ingested.store, folder)
    monkeypatch.delenv("CONCHDB_QDRANT_URL", raising=False)
    with EdgeStore(folder):  # held here: the refusal must come before any attempt to open it
        result = CliRunner().invoke(cli_app, ["serve", "--workers", "2", "--store", str(folder)])
    assert result.exit_code == 2, result.output
    assert "needs a Qdrant server" in result.output and "one process holds it" in result.output
    assert "--workers 1" in result.output and "--to-qdrant-url" in result.output
    zero = CliRunner().invoke(cli_app, ["serve", "--workers", "0", "--store", str(folder)])
    assert zero.exit_code == 2 and "--workers" in zero.output
