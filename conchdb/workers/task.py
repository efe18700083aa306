"""The worker's side of a slide: the Celery task, what it reports, and the worker's heartbeat.

The task runs the pipeline's per-slide code (`plan_slide`, `embed_slide`, and with a
Qdrant server `ingest_one_slide` through a `SlideWriter`, records and done rule included),
in the worker's main process or one of its threads, so the tile readers it starts are its
own child processes.

Failures are told apart by whether waiting helps: the broker or the Qdrant server being
unreachable is retried with backoff; a slide that cannot be read is recorded failed once
and never retried; a slide delivered more than `max_deliveries` times (the worker died on
it each time, e.g. out of memory) is recorded failed instead of killing the next worker.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import redis
from celery import Celery, Task

from conchdb.catalog import SlideStatus
from conchdb.errors import ConchdbError, SlideError
from conchdb.ingest.pipeline import (
    Progress,
    SlideJob,
    Writer,
    embed_slide,
    ingest_one_slide,
    plan_slide,
    writer_for_job,
)
from conchdb.model.encoder import Encoder
from conchdb.store import Store, open_store
from conchdb.workers import broker
from conchdb.workers.app import TASK_NAME
from conchdb.workers.messages import Event, batch_event, job_from_dict, pack_vectors

log = logging.getLogger("conchdb.workers")

RETRIES = 5  # transient errors: tried again after 5, 10, 20, 40, 80 s
# A slide's last event is named by the status it ends in.
DONE, FAILED, NO_TISSUE = SlideStatus.DONE.value, SlideStatus.FAILED.value, SlideStatus.NO_TISSUE.value


class RunGone(Exception):
    """The ingesting process no longer waits for this run (interrupted, or died)."""


@dataclass
class WorkerContext:
    """What one worker process holds for all its tasks: the model, the broker, open stores."""

    encoder: Encoder
    redis: redis.Redis
    node: str
    device: str
    queue: str
    max_deliveries: int
    qdrant_api_key: str | None = None
    reconnect_s: float = 120.0
    backlog: int = 64  # batches waiting unread in a run's events before the worker pauses
    stores: dict[str, Store] = field(default_factory=dict)
    running: dict[str, dict[str, Any]] = field(default_factory=dict)
    started_at: float = field(default_factory=time.time)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def store(self, url: str) -> Store:
        with self.lock:
            if url not in self.stores:
                self.stores[url] = open_store(None, url, self.qdrant_api_key)
            return self.stores[url]

    def describe(self) -> dict[str, Any]:
        """The heartbeat: who this worker is, its device and model, and what it is doing."""
        with self.lock:
            running = [dict(v) for v in self.running.values()]
        return {
            "node": self.node, "host": socket.gethostname(), "pid": os.getpid(), "device": self.device,
            "queue": self.queue, "model": self.encoder.describe(), "running": running,
            "started_at": self.started_at, "updated_at": time.time(),
        }

    def beat(self) -> None:
        self.redis.set(broker.worker_key(self.node), json.dumps(self.describe()), ex=broker.HEARTBEAT_TTL_S)

    def close(self) -> None:
        for store in self.stores.values():
            store.close()
        self.stores.clear()


class Heartbeat:
    """A thread that keeps the worker's heartbeat key fresh while it lives."""

    def __init__(self, ctx: WorkerContext, period_s: float = 5.0):
        self.ctx, self.period_s = ctx, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="conchdb-heartbeat", daemon=True)

    def start(self) -> None:
        self.ctx.beat()
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                self.ctx.beat()
            except (redis.ConnectionError, redis.TimeoutError) as exc:  # the broker restarts; beat again later
                log.warning("heartbeat: %s", exc)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):
            self.ctx.redis.delete(broker.worker_key(self.ctx.node))


class Reporter:
    """Sends one task's events to its run, waiting out broker restarts and a slow reader."""

    def __init__(self, ctx: WorkerContext, task_id: str, run_id: str):
        self.ctx, self.task_id, self.run_id = ctx, task_id, run_id
        self.key = broker.events_key(run_id)

    def call(self, fn: Callable[[redis.Redis], Any]) -> Any:
        """`fn(redis)`, waiting out a broker restart for up to the context's `reconnect_s`."""
        return broker.with_reconnect(lambda: fn(self.ctx.redis), self.ctx.reconnect_s)

    def alive(self) -> bool:
        return bool(self.call(lambda r: r.exists(broker.alive_key(self.run_id))))

    def send(self, kind: str, **data: Any) -> None:
        self._push(Event(self.task_id, kind, data))

    def _push(self, event: Event) -> None:
        raw = event.encode()

        def push(r: redis.Redis) -> None:
            pipe = r.pipeline()
            pipe.rpush(self.key, raw)
            pipe.expire(self.key, broker.EVENTS_TTL_S)
            pipe.execute()

        self.call(push)

    def batch(self, tiles: list[dict[str, Any]], vectors: np.ndarray) -> None:
        """Hand a batch to the ingesting process; pauses while it is `backlog` batches behind."""
        while self.call(lambda r: r.llen(self.key)) > self.ctx.backlog:
            if not self.alive():
                raise RunGone(self.run_id)
            time.sleep(0.05)
        if not self.alive():
            raise RunGone(self.run_id)
        self._push(batch_event(self.task_id, tiles, vectors))


def _track(ctx: WorkerContext, task_id: str, job: SlideJob) -> Progress:
    """Progress callbacks that keep the heartbeat's view of this task current."""
    entry = {"task": task_id, "run": job.run_id, "slide": job.slide.id, "tiles": 0, "done": 0,
             "since": time.time()}
    with ctx.lock:
        ctx.running[task_id] = entry

    def on_slide(_: str, n: int) -> None:
        entry["tiles"] = n
        _beat(ctx)

    def on_batch(n: int) -> None:
        entry["done"] += n
        _beat(ctx)

    return Progress(on_slide=on_slide, on_batch=on_batch)


def _beat(ctx: WorkerContext) -> None:
    with contextlib.suppress(redis.ConnectionError, redis.TimeoutError):  # the heartbeat thread tries again
        ctx.beat()


def _chain(first: Progress, second: Progress) -> Progress:
    def both(a: Callable[..., None] | None, b: Callable[..., None] | None) -> Callable[..., None]:
        def call(*args: Any) -> None:
            for fn in (a, b):
                if fn is not None:
                    fn(*args)
        return call

    return Progress(on_slide=both(first.on_slide, second.on_slide), on_batch=both(first.on_batch, second.on_batch))


def run_slide(ctx: WorkerContext, task_id: str, retries: int, kwargs: dict[str, Any]) -> str:
    """One delivery of a slide's task; returns what became of it (for the worker's log)."""
    job = job_from_dict(kwargs["job"])
    report = Reporter(ctx, task_id, job.run_id)
    key = broker.deliveries_key(task_id, retries)

    def count(r: redis.Redis) -> int:
        pipe = r.pipeline()
        pipe.incr(key)
        pipe.expire(key, broker.DELIVERIES_TTL_S)
        return int(pipe.execute()[0])

    deliveries = report.call(count)
    if not report.alive():
        return "dropped: the ingest that sent it has stopped"
    if deliveries > ctx.max_deliveries:
        error = (f"{job.slide.path}: delivered {deliveries} times without finishing (a worker died on it each "
                 "time, e.g. out of memory); raise the broker's visibility timeout if slides take that long")
        report.send(FAILED, error=error, info={}, recorded=False)
        return f"{FAILED}: too many deliveries"
    if kwargs["fingerprint"] != ctx.encoder.fingerprint:
        error = (f"{job.slide.path}: worker {ctx.node} has model {ctx.encoder.fingerprint}, the collection holds "
                 f"{kwargs['fingerprint']}; give every worker the same weights")
        report.send(FAILED, error=error, info={}, recorded=False)
        return f"{FAILED}: another model"
    progress = _track(ctx, task_id, job)
    try:
        if kwargs.get("qdrant_url"):
            return _run_direct(ctx, job, kwargs, report, progress)
        return _run_streamed(ctx, job, report, progress)
    finally:
        with ctx.lock:
            ctx.running.pop(task_id, None)
        _beat(ctx)


def _run_direct(ctx: WorkerContext, job: SlideJob, kwargs: dict[str, Any], report: Reporter,
                progress: Progress) -> str:
    """The worker writes tiles and records into the Qdrant server itself."""
    store = ctx.store(kwargs["qdrant_url"])
    collection = kwargs["collection"]
    slide_writer = writer_for_job(store, collection, ctx.encoder, job)
    events = Progress(on_slide=lambda _, n: report.send("start", tiles=n),
                      on_batch=lambda n: report.send("progress", n=n))
    writer = Writer(store, collection, {})
    try:
        outcome = ingest_one_slide(job, plan_slide(job), ctx.encoder, slide_writer, writer, kwargs.get("previous"),
                                   _chain(progress, events))
    finally:
        writer.close()
    report.send(outcome.status.value, tiles=outcome.tiles, error=outcome.error, recorded=True)
    return outcome.status.value


def _run_streamed(ctx: WorkerContext, job: SlideJob, report: Reporter, progress: Progress) -> str:
    """The worker embeds; vectors and payloads go back to the ingesting process, which writes."""
    plan = plan_slide(job)
    if plan.error is not None or plan.grid is None:
        report.send(FAILED, error=plan.error, info=plan.info, recorded=False)
        return FAILED
    if len(plan.grid) == 0:
        report.send(NO_TISSUE, info=plan.info, recorded=False)
        return NO_TISSUE
    report.send("start", tiles=len(plan.grid), size=plan.grid.tile_size_level0, info=plan.info)
    try:
        mean = embed_slide(job, plan.grid, ctx.encoder, report.batch, progress)
    except SlideError as exc:
        report.send(FAILED, error=str(exc), info=plan.info, recorded=False)
        return FAILED
    except RunGone:
        return "dropped: the ingest that sent it has stopped"
    report.send(DONE, mean=pack_vectors(mean[None, :]), tiles=len(plan.grid), info=plan.info, recorded=False)
    return DONE


def register(app: Celery, ctx: WorkerContext) -> None:
    """Add the slide task to `app`, bound to this worker's context."""

    @app.task(bind=True, name=TASK_NAME, max_retries=RETRIES, acks_late=True, reject_on_worker_lost=True)
    def ingest_slide(self: Task, **kwargs: Any) -> str:
        task_id, retries = self.request.id, self.request.retries
        try:
            result = run_slide(ctx, task_id, retries, kwargs)
        except Exception as exc:
            if broker.is_transient(exc) and retries < RETRIES:
                log.warning("slide task %s: %s; trying again", task_id, exc)
                raise self.retry(exc=exc, countdown=5 * 2**retries) from None
            if isinstance(exc, ConchdbError):
                message = exc.message
            else:
                message = f"worker {ctx.node}: {type(exc).__name__}: {exc}"
            log.exception("slide task %s failed", task_id)
            _report_failure(ctx, task_id, kwargs, message)
            return FAILED
        log.info("slide task %s: %s", task_id, result)
        return result


def _report_failure(ctx: WorkerContext, task_id: str, kwargs: dict[str, Any], message: str) -> None:
    """Tell the ingesting process, so the slide is recorded failed once; the broker may be gone."""
    try:
        run_id = kwargs["job"]["run_id"]
        slide = kwargs["job"]["slide"]["path"]
        Reporter(ctx, task_id, run_id).send(FAILED, error=f"{slide}: {message}", info={}, recorded=False)
    except (redis.ConnectionError, redis.TimeoutError, KeyError, TypeError) as exc:
        log.error("slide task %s: could not report its failure: %s", task_id, exc)
