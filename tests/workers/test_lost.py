"""A lost worker costs `CONCHDB_WORKER_LOST_S`, not the broker's visibility timeout.

The workers here run with a visibility timeout of an hour: a slide that comes back sooner
came back because the ingest saw its worker's heartbeat stop (or, for a pool child killed
inside a task, because Celery gave the message back). Each run must still store exactly
the points of the in-process ingest of the same cohort.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from qdrant_client import QdrantClient
from typer.testing import CliRunner

from conchdb.archive.mosaic import choose_mosaic
from conchdb.cli import app
from conchdb.ingest.pipeline import IngestOptions, Progress
from conchdb.store.edge import EdgeStore
from conchdb.store.server import ServerStore
from conchdb.workers.broker import server_time
from conchdb.workers.status import workers_status
from tests.workers.conftest import (
    BATCH,
    COLLECTION,
    Background,
    Workers,
    broker_run,
    mid_slide,
    points,
    records,
    same_points,
    worker_env,
)

runner = CliRunner()
SLIDE = "cmu_small_region.svs"  # 12 tiles: 6 batches, long enough to be caught in the middle
# Four missed heartbeats (one every 5 s): short for a test, long enough for a loaded machine.
LOST_S = 20
PATIENT = {"CONCHDB_VISIBILITY_TIMEOUT": "3600", "CONCHDB_WORKER_LOST_S": str(LOST_S)}
EXPECTED_RECORDS = {SLIDE: "done", "boxes.png": "done", "unreadable.svs": "failed"}


@pytest.fixture(scope="module")
def workers(redis_server, tiny_ckpt, tmp_path_factory) -> Iterator[Workers]:
    """`conchdb worker` processes whose broker hands an unfinished slide out again only after an hour."""
    pool = Workers(redis_server, tiny_ckpt, tmp_path_factory.mktemp("workers"), env=PATIENT)
    yield pool
    pool.stop()


def wait_for(condition: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout:g} s for {what}"
        time.sleep(0.1)


def _log_of(workers: Workers, pid: int) -> str:
    return next(log.read_text() for proc, log in workers.processes if proc.pid == pid)


def test_a_worker_killed_mid_slide_costs_a_lost_bound_not_the_visibility_timeout(
    redis_server, workers, cohort, reference, tmp_path
):
    """As a user would: two workers, `conchdb ingest --broker --json` of three slides, the worker
    holding one of them SIGKILLed (a machine lost, the OOM killer on its main process)."""
    workers.ensure(2)
    store = tmp_path / "store"
    args = [sys.executable, "-m", "conchdb.cli", "ingest", str(cohort), "--broker", redis_server.url,
            "--store", str(store), "--batch-size", str(BATCH), "--readers", "1", "--json"]
    ingest = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=worker_env(tmp_path, **PATIENT))
    try:
        victim = mid_slide(redis_server)
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        out, err = ingest.communicate(timeout=240)
    finally:
        if ingest.poll() is None:
            ingest.kill()
    assert time.monotonic() - killed_at < 120, err
    assert ingest.returncode == 3, err
    doc = json.loads(out)  # stdout is the one summary object; notices went to stderr
    assert doc["ingested"] == 2 and [Path(f["slide"]).name for f in doc["failed"]] == ["unreadable.svs"]
    assert [r["slide"] for r in doc["resent"]] == [SLIDE]
    assert victim["node"] in doc["resent"][0]["reason"] and "lost" in doc["resent"][0]["reason"]

    # While it waited, the ingest said what for: the slide running on the victim, then re-sent.
    notices = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    assert any({"slide": SLIDE, "worker": victim["node"]} in n["running"] for n in notices if n["event"] == "running")
    resent = [n for n in notices if n["event"] == "resent"]
    assert [(n["slide"], n["worker"], n["delivery"]) for n in resent] == [(SLIDE, victim["node"], 2)]
    assert "no heartbeat" in resent[0]["message"]

    opened = EdgeStore(store)
    try:
        same_points(points(opened), reference)
        assert opened.count(COLLECTION) == len(reference)
        assert records(opened) == EXPECTED_RECORDS
    finally:
        opened.close()

    # `workers status` names the lost worker and the slide it held; its message is not left for
    # the visibility timeout to hand out again.
    status = runner.invoke(app, ["workers", "status", "--broker", redis_server.url, "--json"],
                           env={"CONCHDB_WORKER_LOST_S": str(LOST_S)})
    assert status.exit_code == 0, status.output
    state = json.loads(status.stdout)
    lost = {w["node"]: w for w in state["lost"]}
    assert [r["slide"] for r in lost[victim["node"]]["held"]] == [SLIDE]
    assert lost[victim["node"]]["silent_s"] > LOST_S
    assert victim["pid"] not in {w["pid"] for w in state["workers"]}
    assert state["delivered_unfinished"] == 0 and state["queued"] == 0
    text = runner.invoke(app, ["workers", "status", "--broker", redis_server.url],
                         env={"CONCHDB_WORKER_LOST_S": str(LOST_S)})
    assert re.search(rf"lost\s+{re.escape(victim['node'])}", text.stdout), text.stdout
    assert f"held      {SLIDE}" in text.stdout


def test_a_paused_worker_that_comes_back_finds_its_slide_taken(redis_server, workers, cohort, reference, tmp_path):
    """SIGSTOP stops the heartbeat without a death: the slide is sent again; after SIGCONT the old
    delivery stops writing, nothing is stored twice or recorded failed, and the ingest ends once."""
    workers.ensure(2)
    notices: list[dict[str, Any]] = []
    progress = Progress(on_notice=lambda message, data: notices.append(data))
    store = EdgeStore(tmp_path / "store")
    try:
        background = Background(broker_run(cohort, store, redis_server.url, progress, lost_s=LOST_S))
        victim = mid_slide(redis_server)
        os.kill(victim["pid"], signal.SIGSTOP)
        try:
            wait_for(lambda: any(n["event"] == "resent" for n in notices), 120, "the slide to be sent again")
            # The lost worker's window: `workers status` shows it lost, with its slide.
            state = workers_status(redis_server.client(), "conchdb", LOST_S)
            lost = {w["node"]: w for w in state["lost"]}
            assert [r["slide"] for r in lost[victim["node"]]["held"]] == [SLIDE]
        finally:
            os.kill(victim["pid"], signal.SIGCONT)
        background.join()
        assert background.error is None, background.error
        summary = background.summary
        assert sorted(Path(o.path).name for o in summary.outcomes) == sorted(EXPECTED_RECORDS)  # each slide once
        assert [Path(o.path).name for o in summary.failed] == ["unreadable.svs"]
        assert [slide for slide, _ in summary.resent] == [SLIDE]
        same_points(points(store), reference)
        assert store.count(COLLECTION) == len(reference)
        assert records(store) == EXPECTED_RECORDS
    finally:
        store.close()
    # The worker that came back gave its stale delivery up and is online again.
    wait_for(lambda: re.search(r"slide task \w+: dropped", _log_of(workers, victim["pid"])), 120,
             "the paused worker to drop its stale delivery")
    wait_for(lambda: victim["node"] in {w["node"] for w in workers_status(redis_server.client(), "conchdb",
                                                                               LOST_S)["workers"]},
             60, "the paused worker to be online again")


PREFORK_WORKER = """
import sys
from conchdb.model.encoder import Encoder
from conchdb.workers.worker import WorkerConfig, run_worker
url, queue, checkpoint = sys.argv[1:4]
encoder = Encoder.load(checkpoint, device="cpu", need_tokenizer=False, batch_size=2)
sys.exit(run_worker(WorkerConfig(url, queue=queue, visibility_timeout=3600, pool="prefork"), encoder))
"""


def test_a_pool_child_killed_inside_a_task_gives_the_slide_back_at_once(
    redis_server, tiny_ckpt, cohort, reference, tmp_path
):
    """`reject_on_worker_lost`, tested: a prefork worker whose child dies mid-slide (the OOM killer
    picking the child) hands the message back to the queue at once, and the slide is redone."""
    queue = "prefork"
    log = tmp_path / "prefork.log"
    with log.open("w") as out:
        parent = subprocess.Popen(
            [sys.executable, "-c", PREFORK_WORKER, redis_server.url, queue, str(tiny_ckpt)], stdout=out,
            stderr=subprocess.STDOUT, env=worker_env(tmp_path, OMP_NUM_THREADS="1"),
        )
    store = EdgeStore(tmp_path / "store")
    try:
        wait_for(lambda: workers_status(redis_server.client(), queue, LOST_S)["workers"] or parent.poll() is not None,
                 120, "the prefork worker to come online")
        assert parent.poll() is None, log.read_text()
        # A prefork child is a daemon process and may not start tile readers: read in the task.
        options = IngestOptions(batch_size=BATCH, readers=0)
        background = Background(broker_run(cohort, store, redis_server.url, queue=queue, options=options,
                                           lost_s=LOST_S))
        child = mid_slide(redis_server)
        assert child["pid"] != parent.pid  # the task runs in a pool child, not the worker's main process
        os.kill(child["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        background.join(timeout=240)
        assert time.monotonic() - killed_at < 120, log.read_text()
        assert background.error is None, background.error
        summary = background.summary
        assert summary.count("done") == 2 and [Path(o.path).name for o in summary.failed] == ["unreadable.svs"]
        assert summary.resent == []  # given back by Celery, not found lost: the worker's parent kept beating
        same_points(points(store), reference)
        assert store.count(COLLECTION) == len(reference)
        assert records(store) == EXPECTED_RECORDS
        assert "WorkerLostError" in log.read_text()
    finally:
        store.close()
        parent.send_signal(signal.SIGTERM)
        try:
            parent.wait(timeout=60)
        except subprocess.TimeoutExpired:
            parent.kill()
            parent.wait()


class StallingStore:
    """A server store that stalls the upsert of one slide's second batch until released: a worker
    writing into it stops mid-slide (and, beating only per batch, stops beating) without dying."""

    def __init__(self, inner: ServerStore, slide: str):
        self.inner, self.slide = inner, slide
        self.stalled, self.release = threading.Event(), threading.Event()
        self.batches = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def upsert(self, name: str, points: Any, shared: dict[str, Any] | None = None) -> None:
        if name == COLLECTION and (shared or {}).get("slide_id") == self.slide:
            self.batches += 1
            if self.batches == 2:
                self.stalled.set()
                self.release.wait(300)
        self.inner.upsert(name, points, shared)


def test_a_lost_worker_writing_into_a_qdrant_server_does_not_undo_the_new_delivery(
    redis_server, cohort, encoder, reference, caplog
):
    """The direct path: the stalled worker comes back after its slide was sent again and must not
    record its stale delivery over the new one (in-thread workers; Qdrant in local mode stands in
    for the server, which these machines cannot run)."""
    from celery.contrib.testing.worker import start_worker

    from conchdb.workers.app import make_app
    from conchdb.workers.broker import connect
    from conchdb.workers.task import Heartbeat, WorkerContext, register

    url, queue = "http://qdrant.invalid:6333", "direct-lost"
    server = ServerStore(client=QdrantClient(":memory:"))
    stalling = StallingStore(server, SLIDE)

    def worker(node: str, store: Any, period_s: float) -> tuple[Any, WorkerContext, Heartbeat]:
        ctx = WorkerContext(encoder, connect(redis_server.url), node, "cpu", queue, 3)
        ctx.stores[url] = store
        worker_app = make_app(redis_server.url, queue, 3600)
        register(worker_app, ctx)
        return worker_app, ctx, Heartbeat(ctx, period_s)

    # The first worker's heartbeat thread sleeps an hour: it beats per batch only, so once
    # stalled it is silent. The second beats as workers do.
    app1, ctx1, beat1 = worker("conchdb-stalls@test", stalling, 3600.0)
    app2, ctx2, beat2 = worker("conchdb-steady@test", server, 5.0)
    notices: list[dict[str, Any]] = []
    progress = Progress(on_notice=lambda message, data: notices.append(data))
    caplog.set_level(logging.INFO, logger="conchdb.workers")
    beat1.start()
    beating = [beat1]
    try:
        with start_worker(app1, pool="solo", perform_ping_check=False, shutdown_timeout=60, queues=[queue]):
            background = Background(broker_run(cohort, server, redis_server.url, progress, queue=queue,
                                               qdrant_url=url, lost_s=LOST_S))
            assert stalling.stalled.wait(120), "the first worker never reached the slide"
            beat2.start()
            beating.append(beat2)
            with start_worker(app2, pool="solo", perform_ping_check=False, shutdown_timeout=60, queues=[queue]):
                wait_for(lambda: any(n["event"] == "resent" for n in notices), 120, "the slide to be sent again")
                stalling.release.set()  # the stalled worker comes back while the new delivery runs
                background.join()
                wait_for(lambda: not ctx1.running, 120, "the stale delivery to stop")
    finally:
        stalling.release.set()
        for beat in beating:
            beat.stop()
    assert background.error is None, background.error
    summary = background.summary
    assert summary.count("done") == 2 and [Path(o.path).name for o in summary.failed] == ["unreadable.svs"]
    assert [slide for slide, _ in summary.resent] == [SLIDE]
    assert "dropped: the slide was sent again" in caplog.text
    stored = points(server)
    # Mosaic marks aside (below), the points of the in-process ingest: the stale delivery's
    # tiles were the same points, and it wrote no record, cleanup or mosaic after the resend.
    unmarked = lambda found: {k: ({f: v for f, v in p.items() if f != "mosaic"}, vec)  # noqa: E731
                              for k, (p, vec) in found.items()}
    same_points(unmarked(stored), unmarked(reference))
    # The marks are the mosaic the stored vectors choose. They may differ from the in-process
    # run's: vectors embedded in two worker threads differ from its by float rounding (1e-8),
    # which can tip k-means between two near-equal tiles of the tiny model.
    for slide in {p["slide_id"] for p, _ in stored.values()}:
        ids = sorted(k for k, (p, _) in stored.items() if p["slide_id"] == slide)
        chosen = set(choose_mosaic(ids, np.stack([stored[k][1] for k in ids])))
        assert {k for k in ids if stored[k][0].get("mosaic")} == chosen, slide
    assert records(server) == EXPECTED_RECORDS


def test_each_resend_counts_as_a_delivery(redis_server, cohort, encoder, tmp_path):
    """No worker takes the slides; stand-in heartbeats claim that each task is held by a lost
    worker. Every slide is sent again once, then recorded failed: the resend counted toward
    `max_deliveries` (2 here)."""
    client, queue = redis_server.client(), "nobody-home"
    now = server_time(client)

    def beat(node: str, age_s: float, running: list[dict[str, Any]]) -> None:
        doc = {"node": node, "host": "test", "pid": 0, "device": "cpu", "queue": queue, "model": encoder.describe(),
               "running": running, "started_at": 0, "updated_at": 0, "beat_at": server_time(client) - age_s}
        client.set(f"conchdb:worker:{node}", json.dumps(doc), ex=300)
        client.sadd("conchdb:workers", node)

    beat("alive@test", 0, [])  # lets the ingest start
    store = EdgeStore(tmp_path / "store")
    try:
        background = Background(broker_run(cohort, store, redis_server.url, queue=queue, max_deliveries=2,
                                           lost_s=LOST_S, watch_s=0.2))
        sent: set[bytes] = set()
        deadline = time.monotonic() + 120
        while background.thread.is_alive():
            assert time.monotonic() < deadline, "the ingest did not give the slides up"
            live = {slide: task for key in client.scan_iter(match="conchdb:run:*:live")
                    for slide, task in client.hgetall(key).items()}
            sent |= set(live.values())
            running = [{"task": task.decode(), "slide": slide.decode(), "tiles": 12, "done": 2, "since": now}
                       for slide, task in live.items()]
            beat("lost@test", 2 * LOST_S, running)
            beat("alive@test", 0, [])
            time.sleep(0.2)
        background.join()
        assert background.error is None, background.error
        summary = background.summary
        assert len(sent) == 6  # three slides, each sent twice under two task ids
        assert sorted(slide for slide, _ in summary.resent) == sorted(EXPECTED_RECORDS)
        assert len(summary.failed) == 3
        assert all("sent 2 times and its worker was lost each time" in o.error for o in summary.failed)
        assert set(records(store).values()) == {"failed"}
    finally:
        store.close()
        client.delete(queue, "conchdb:worker:lost@test", "conchdb:worker:alive@test")
