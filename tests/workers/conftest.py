"""Workers fixtures: a real redis-server on a free loopback port, worker processes, a small cohort.

Redis runs with its append-only file synced on every write, as the compose file runs it
(there every second), so a stop and start in the middle of an ingest loses nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from conchdb.catalog import slides_collection
from conchdb.ingest.cohort import discover
from conchdb.ingest.manifest import read_manifest
from conchdb.ingest.pipeline import IngestOptions, Progress, ingest
from conchdb.model.checkpoint import save_checkpoint
from conchdb.model.encoder import Encoder
from conchdb.store.edge import EdgeStore
from conchdb.workers.dispatch import BrokerIngest, BrokerOptions
from conchdb.workers.status import heartbeats
from tests.conftest import need_tool
from tests.model.conftest import make_tiny_model

REDIS_SERVER = shutil.which("redis-server")
# Short enough that a killed worker's slide comes back within seconds, long enough that the
# small test slides are never handed out twice by the timeout alone.
VISIBILITY_TIMEOUT_S = 10
BATCH = 2
COLLECTION = "conch_tiles"
OPTIONS = IngestOptions(batch_size=BATCH, readers=1)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """One redis-server process on 127.0.0.1, stoppable and restartable on the same port and data."""

    def __init__(self, folder: Path):
        self.folder, self.port = folder, free_port()
        self.process: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        args = [REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.folder),
                "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--maxmemory-policy", "noeviction"]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=self.port, socket_connect_timeout=0.2).ping()
                return
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)  # redis flushes its append-only file and exits
            self.process.wait(timeout=20)
        self.process = None

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port, socket_connect_timeout=1)


@pytest.fixture(autouse=True)
def celery_worker_state() -> Iterator[None]:
    """Celery's in-thread test worker keeps its stop request in module state, and resets it
    only when the worker thread exits in time: a test whose worker was slow to stop would
    leave it set, and the next in-thread worker would stop before it started, leaving
    `start_worker` waiting forever. Each test starts from a clean state."""
    from celery.worker import state

    state.should_stop = state.should_terminate = None
    yield
    state.should_stop = state.should_terminate = None


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory) -> Iterator[RedisServer]:
    need_tool(REDIS_SERVER is not None, "redis-server is not installed (Debian: apt-get install redis-server)")
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "tiny.bin"
    save_checkpoint(make_tiny_model(0), path)
    return path


def worker_env(home: Path, **more: str) -> dict[str, str]:
    """The environment of a `conchdb` subprocess: this checkout's code first, its own home."""
    return {**os.environ, "PYTHONPATH": os.getcwd(), "CONCHDB_HOME": str(home),
            "CONCHDB_VISIBILITY_TIMEOUT": str(VISIBILITY_TIMEOUT_S), **more}


class Workers:
    """`conchdb worker` processes on one broker; each logs to its own file. `env` adds
    settings to theirs (`CONCHDB_*`)."""

    def __init__(self, server: RedisServer, ckpt: Path, folder: Path, env: dict[str, str] | None = None):
        self.server, self.ckpt, self.folder, self.env = server, ckpt, folder, env or {}
        self.processes: list[tuple[subprocess.Popen, Path]] = []

    def start(self, n: int = 1) -> None:
        started = []
        for _ in range(n):
            log = self.folder / f"worker-{len(self.processes)}.log"
            args = [sys.executable, "-m", "conchdb.cli", "worker", "--broker", self.server.url,
                    "--checkpoint", str(self.ckpt), "--device", "cpu", "--batch-size", str(BATCH)]
            with log.open("w") as out:
                proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT,
                                        env=worker_env(self.folder, **self.env))
            self.processes.append((proc, log))
            started.append(proc)
        deadline = time.monotonic() + 120
        while not all(p.pid in self.online_pids() for p in started):
            for p in started:
                assert p.poll() is None, self.logs()
            assert time.monotonic() < deadline, self.logs()
            time.sleep(0.2)

    def online_pids(self) -> set[int]:
        client = self.server.client()
        pids = set()
        for key in client.scan_iter(match="conchdb:worker:*"):
            raw = client.get(key)
            if raw:
                pids.add(json.loads(raw)["pid"])
        return pids

    def alive(self) -> list[subprocess.Popen]:
        return [p for p, _ in self.processes if p.poll() is None]

    def ensure(self, n: int) -> None:
        missing = n - len(self.alive())
        if missing > 0:
            self.start(missing)

    def logs(self) -> str:
        return "\n".join(f"--- {log.name}\n{log.read_text()}" for _, log in self.processes)

    def stop(self) -> None:
        for proc in self.alive():
            proc.send_signal(signal.SIGTERM)
        for proc, _ in self.processes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture(scope="module")
def workers(redis_server, tiny_ckpt, tmp_path_factory) -> Iterator[Workers]:
    pool = Workers(redis_server, tiny_ckpt, tmp_path_factory.mktemp("workers"))
    yield pool
    pool.stop()


MANIFEST = """\
    slide,patient_id,grade
    cmu_small_region.svs,P001,2
    boxes.png,P002,1
    """


@pytest.fixture(scope="module")
def cohort(tmp_path_factory, slides_dir) -> Path:
    """Two good slides (a real Aperio region of 12 tiles, a PNG of one tile) and a damaged one."""
    root = tmp_path_factory.mktemp("cohorts") / "cohortW"
    root.mkdir()
    for name in ("cmu_small_region.svs", "boxes.png", "unreadable.svs"):
        shutil.copy(slides_dir / name, root / name)
    (root / "manifest.csv").write_text(textwrap.dedent(MANIFEST))
    return root


# -- what every distributed run is compared with ------------------------------------------

def points(store) -> dict[str, tuple[dict, np.ndarray]]:
    return {h.id: (h.payload, h.vector) for h in store.scroll(COLLECTION, with_vectors=True)}


def records(store) -> dict[str, str]:
    return {h.payload["slide_id"]: h.payload["status"] for h in store.scroll(slides_collection(COLLECTION))}


def same_points(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    # The server store keeps fields set to None, the embedded one leaves them out.
    strip = lambda p: {k: v for k, v in p.items() if k != "ingest_run" and v is not None}  # noqa: E731
    for pid, (payload, vector) in got.items():
        np.testing.assert_allclose(vector, expected[pid][1], atol=1e-5)
        assert strip(payload) == strip(expected[pid][0])


@pytest.fixture(scope="module")
def encoder(tiny_ckpt) -> Encoder:
    return Encoder.load(str(tiny_ckpt), device="cpu", need_tokenizer=False)


@pytest.fixture(scope="module")
def reference(cohort, encoder, tmp_path_factory) -> dict[str, tuple[dict, np.ndarray]]:
    """The in-process ingest of the cohort: the points every distributed run must reproduce."""
    store = EdgeStore(tmp_path_factory.mktemp("reference") / "store")
    try:
        summary = ingest(cohort, encoder, store, COLLECTION, manifest=None, options=OPTIONS)
        assert summary.count("done") == 2 and len(summary.failed) == 1
        return points(store)
    finally:
        store.close()


def broker_run(cohort: Path, store, url: str, progress: Progress | None = None,
               options: IngestOptions = OPTIONS, **opts) -> BrokerIngest:
    found = discover(cohort)
    return BrokerIngest(found, read_manifest(None, found), store, COLLECTION, options, BrokerOptions(url, **opts),
                        progress)


class Background:
    """A broker ingest in a thread, so the test can break things while it runs."""

    def __init__(self, run: BrokerIngest):
        self.summary, self.error = None, None
        self.thread = threading.Thread(target=self._go, args=(run,), daemon=True)
        self.thread.start()

    def _go(self, run: BrokerIngest) -> None:
        try:
            self.summary = run.run()
        except BaseException as exc:  # handed to the test
            self.error = exc

    def join(self, timeout: float = 240) -> None:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the ingest did not finish"


def mid_slide(server, slide: str = "cmu_small_region.svs", timeout: float = 120) -> dict:
    """Wait until a worker is part-way through `slide`; returns its heartbeat. Heartbeats older
    than a few seconds are passed over: they are those of workers lost earlier."""
    client, deadline = server.client(), time.monotonic() + timeout
    while time.monotonic() < deadline:
        for beat in heartbeats(client):
            if beat.age_s < 10 and any(r["slide"] == slide and 0 < r["done"] < r["tiles"] for r in beat.running()):
                return beat.doc
        time.sleep(0.01)
    raise AssertionError(f"no worker was seen in the middle of {slide}")
