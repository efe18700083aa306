"""Start a worker: check the broker, load the model, then take slides from the queue.

The model is loaded before the worker subscribes to the queue, so a worker without
weights stops with the loader's message instead of taking slides it would fail. With one
task at a time (the default, one worker per GPU) Celery's `solo` pool runs the task in
this very process: the model is loaded once, and the tile readers a task starts are its
own child processes (a prefork pool child is a daemon process and may not have any).
More than one at a time uses threads sharing the one model.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from conchdb.model.encoder import Encoder
from conchdb.workers import broker
from conchdb.workers.app import make_app
from conchdb.workers.task import Heartbeat, WorkerContext, register


@dataclass
class WorkerConfig:
    """How a worker connects and behaves; every field has a `CONCHDB_*` setting behind it."""

    broker_url: str
    queue: str = "conchdb"
    concurrency: int = 1
    visibility_timeout: int = 21600
    max_deliveries: int = 3
    qdrant_api_key: str | None = None
    loglevel: str = "INFO"
    # Celery's pool; None: `solo` for one slide at a time, `threads` for more. A `prefork` child
    # is a daemon process and cannot start tile readers: its jobs need `readers=0`.
    pool: str | None = None


def node_name(device: str) -> str:
    """A name unique per worker process, saying which device it drives."""
    return f"conchdb-{device.replace(':', '')}-{os.getpid()}@{socket.gethostname()}"


def run_worker(config: WorkerConfig, encoder: Encoder) -> int:
    """Serve slide tasks until the worker is told to stop (SIGTERM, Ctrl-C); returns its exit code."""
    client = broker.connect(config.broker_url)
    device = str(encoder.device)
    ctx = WorkerContext(encoder, client, node_name(device), device, config.queue, config.max_deliveries,
                        config.qdrant_api_key)
    app = make_app(config.broker_url, config.queue, config.visibility_timeout)
    register(app, ctx)
    heartbeat = Heartbeat(ctx)
    heartbeat.start()
    worker = app.Worker(
        hostname=ctx.node,
        pool=config.pool or ("solo" if config.concurrency == 1 else "threads"),
        concurrency=config.concurrency,
        queues=[config.queue],
        loglevel=config.loglevel,
        without_gossip=True,
        without_mingle=True,
        optimization="fair",
    )
    try:
        worker.start()
    finally:
        heartbeat.stop()
        ctx.close()
    return int(worker.exitcode or 0)
