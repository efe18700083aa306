"""Distributed ingest end to end: a real redis-server, `conchdb worker` processes, a tiny CONCH.

Every run is compared with the in-process ingest of the same cohort: the same point ids,
the same vectors, the same payloads (but the run id), the same slide records.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from qdrant_client import QdrantClient
from typer.testing import CliRunner

from conchdb.cli import app
from conchdb.ingest.pipeline import Progress
from conchdb.store.edge import EdgeStore
from conchdb.store.server import ServerStore
from conchdb.workers.broker import BrokerError, server_time
from tests.slides.conftest import tissue_blob, write_image
from tests.workers.conftest import (
    BATCH,
    COLLECTION,
    Background,
    broker_run,
    free_port,
    mid_slide,
    points,
    records,
    same_points,
)

runner = CliRunner()


def test_two_workers_into_the_embedded_store_equal_the_in_process_ingest(
    redis_server, workers, cohort, reference, tmp_path
):
    workers.ensure(2)
    store = tmp_path / "store"
    args = ["ingest", str(cohort), "--broker", redis_server.url, "--store", str(store),
            "--batch-size", str(BATCH), "--readers", "1", "--json"]
    result = runner.invoke(app, args)
    assert "Traceback" not in result.output
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.exit_code == 3, result.output
    assert doc["ingested"] == 2 and doc["tiles_written"] == len(reference)
    # The damaged slide failed once, with its reason, and was not tried again.
    assert [Path(f["slide"]).name for f in doc["failed"]] == ["unreadable.svs"]
    assert "Bogus marker length" in doc["failed"][0]["error"]
    assert len(re.findall(r"slide task \w+: failed", workers.logs())) == 1
    opened = EdgeStore(store)
    try:
        same_points(points(opened), reference)
        assert records(opened) == {"cmu_small_region.svs": "done", "boxes.png": "done", "unreadable.svs": "failed"}
    finally:
        opened.close()
    # A rerun skips what is done, as in-process; the failed slide is tried again by that rerun.
    result = runner.invoke(app, args)
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    assert result.exit_code == 3 and doc["skipped"] == 2 and doc["tiles_written"] == 0
    assert not list(redis_server.client().scan_iter(match="conchdb:run:*"))  # a finished run leaves no keys

    status = runner.invoke(app, ["workers", "status", "--broker", redis_server.url, "--json"])
    assert status.exit_code == 0, status.output
    state = json.loads(status.stdout)
    assert state["queued"] == 0 and state["running"] == 0
    assert {w["pid"] for w in state["workers"]} == {p.pid for p in workers.alive()}
    assert all(w["device"] == "cpu" for w in state["workers"])


def test_a_worker_killed_mid_slide_leaves_it_to_the_other(redis_server, workers, cohort, reference, tmp_path):
    workers.ensure(2)
    store = EdgeStore(tmp_path / "store")
    try:
        background = Background(broker_run(cohort, store, redis_server.url))
        victim = mid_slide(redis_server)
        os.kill(victim["pid"], signal.SIGKILL)
        background.join()
        assert background.error is None, background.error
        summary = background.summary
        assert summary.count("done") == 2 and len(summary.failed) == 1
        same_points(points(store), reference)  # none missing, none twice (ids are the point's identity)
        assert store.count(COLLECTION) == len(reference)
    finally:
        store.close()
    assert victim["pid"] not in {p.pid for p in workers.alive()}
    assert "cmu_small_region.svs" in victim["running"][0]["slide"]


def test_redis_stopped_and_started_during_an_ingest(redis_server, workers, cohort, reference, tmp_path):
    workers.ensure(2)
    store = EdgeStore(tmp_path / "store")
    try:
        background = Background(broker_run(cohort, store, redis_server.url))
        mid_slide(redis_server)
        redis_server.stop()
        time.sleep(2)
        redis_server.start()
        background.join()
        if background.error is not None:  # allowed: a clear message, and the rerun completes the ingest
            assert isinstance(background.error, BrokerError), background.error
            assert redis_server.url in background.error.message
            summary = broker_run(cohort, store, redis_server.url).run()
        else:
            summary = background.summary
        assert summary.count("done") + summary.count("skipped") == 2
        same_points(points(store), reference)
        assert records(store)["cmu_small_region.svs"] == "done"
    finally:
        store.close()
    assert len(workers.alive()) == 2, workers.logs()  # the workers waited for the broker and stayed


def test_interrupt_revokes_the_slides_not_started(redis_server, workers, tmp_path):
    workers.ensure(1)
    for proc in workers.alive()[1:]:  # one worker, so the later slides are still queued
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    many = tmp_path / "many"
    many.mkdir()
    for i in range(6):
        write_image(many / f"blob{i}.png", tissue_blob(96, 30, seed=i))

    def stop(_) -> None:
        raise KeyboardInterrupt

    store = EdgeStore(tmp_path / "store")
    before = len(re.findall(r"slide task \w+: (done|no_tissue)", workers.logs()))
    try:
        with pytest.raises(KeyboardInterrupt):
            broker_run(many, store, redis_server.url, Progress(on_outcome=stop)).run()
        deadline = time.monotonic() + 60
        while redis_server.client().llen("conchdb") and time.monotonic() < deadline:
            time.sleep(0.2)
        assert redis_server.client().llen("conchdb") == 0
        time.sleep(1)
        done = len(re.findall(r"slide task \w+: (done|no_tissue)", workers.logs())) - before
        assert done <= 2, workers.logs()  # the one reported and at most the one it had already taken
        assert re.search(r"dropped|revoked", workers.logs(), re.IGNORECASE)
        assert sum(s == "done" for s in records(store).values()) == 1
    finally:
        store.close()


def test_workers_writing_into_a_qdrant_server(redis_server, cohort, encoder, reference):
    """The direct path: the worker writes tiles and records itself (a worker thread here; Qdrant in
    local mode stands in for the server, which these machines cannot run)."""
    from celery.contrib.testing.worker import start_worker

    from conchdb.workers.app import make_app
    from conchdb.workers.broker import connect
    from conchdb.workers.task import Heartbeat, WorkerContext, register

    url = "http://qdrant.invalid:6333"
    server = ServerStore(client=QdrantClient(":memory:"))
    ctx = WorkerContext(encoder, connect(redis_server.url), "conchdb-thread@test", "cpu", "direct", 3)
    ctx.stores[url] = server
    worker_app = make_app(redis_server.url, "direct", 30)
    register(worker_app, ctx)
    heartbeat = Heartbeat(ctx)
    heartbeat.start()
    try:
        with start_worker(worker_app, pool="solo", perform_ping_check=False, shutdown_timeout=60, queues=["direct"]):
            summary = broker_run(cohort, server, redis_server.url, queue="direct", qdrant_url=url).run()
    finally:
        heartbeat.stop()
    assert summary.count("done") == 2 and [Path(o.path).name for o in summary.failed] == ["unreadable.svs"]
    assert "Bogus marker length" in summary.failed[0].error
    same_points(points(server), reference)
    assert records(server) == {"cmu_small_region.svs": "done", "boxes.png": "done", "unreadable.svs": "failed"}


def test_an_unreachable_broker_fails_fast_naming_the_url(cohort, tmp_path, tiny_ckpt):
    url = f"redis://127.0.0.1:{free_port()}/0"
    for args in (["ingest", str(cohort), "--broker", url, "--store", str(tmp_path / "s")],
                 ["worker", "--broker", url, "--checkpoint", str(tiny_ckpt), "--device", "cpu"],
                 ["workers", "status", "--broker", url]):
        start = time.monotonic()
        result = runner.invoke(app, args)
        assert time.monotonic() - start < 10
        assert result.exit_code == 2, result.output
        assert url in result.output and "Traceback" not in result.output
    assert not (tmp_path / "s").exists()


def test_a_worker_without_weights_exits_instead_of_taking_slides(redis_server, tmp_path):
    missing = tmp_path / "nowhere" / "pytorch_model.bin"
    args = [sys.executable, "-m", "conchdb.cli", "worker", "--broker", redis_server.url,
            "--checkpoint", str(missing), "--device", "cpu"]
    from tests.workers.conftest import worker_env

    done = subprocess.run(args, capture_output=True, text=True, timeout=120, env=worker_env(tmp_path))
    assert done.returncode == 2, done.stderr
    assert str(missing) in done.stderr and "Traceback" not in done.stderr
    assert "ready" not in done.stdout + done.stderr


def test_tasks_the_broker_lost_are_sent_again(redis_server, workers, cohort, encoder, reference, tmp_path):
    """A Redis that restarts without its data loses the queue: the ingest notices that nothing is
    queued, delivered or running, and sends the slides again."""
    for proc in workers.alive():
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    client = redis_server.client()
    stand_in = {"node": "stand-in@test", "host": "test", "pid": 0, "device": "cpu", "queue": "conchdb",
                "model": encoder.describe(), "running": [], "started_at": 0, "updated_at": 0,
                "beat_at": server_time(client)}
    client.set("conchdb:worker:stand-in@test", json.dumps(stand_in), ex=120)  # lets the ingest start
    client.sadd("conchdb:workers", "stand-in@test")
    store = EdgeStore(tmp_path / "store")
    try:
        background = Background(broker_run(cohort, store, redis_server.url, stall_s=2))
        deadline = time.monotonic() + 60
        while client.llen("conchdb") < 3:
            assert time.monotonic() < deadline and background.error is None, background.error
            time.sleep(0.05)
        client.delete("conchdb")  # the queue is gone, as after a restart without the append-only file
        client.delete("conchdb:worker:stand-in@test")
        workers.ensure(1)
        background.join()
        assert background.error is None, background.error
        assert background.summary.count("done") == 2 and len(background.summary.failed) == 1
        same_points(points(store), reference)
    finally:
        store.close()
