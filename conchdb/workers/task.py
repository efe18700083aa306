"""The worker's side of a slide: the Celery task, what it reports, and the worker's heartbeat.

The task runs the pipeline's per-slide code (`plan_slide`, `embed_slide`, and with a
Qdrant server `ingest_one_slide` through a `SlideWriter`, records and done rule included),
in the worker's main process or one of its threads, so the tile readers it starts are its
own child processes.

Failures are told apart by whether waiting helps: the broker or the Qdrant server being
unreachable is retried with backoff; a slide that cannot be read is recorded failed once
and never retried; a slide delivered more than `max_deliveries` times (the worker died on
it each time, e.g. out of memory) is recorded failed instead of killing the next worker.

A worker taken for lost (its heartbeat stopped: the process was paused, or its machine
stalled) may come back after the ingesting process sent its slide again under a new task
id. Before each batch and before each slide record it writes, the task checks that its id
is still the live one for the slide (`broker.live_key`) and otherwise stops: it writes no
failure and no stale record over the new delivery's work.
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

from conchdb.archive import SlideWriter
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
from conchdb.workers.messages import (
    Batch,
    Embedded,
    Event,
    Finished,
    MessageError,
    SlideTask,
    Started,
)
from conchdb.workers.status import heartbeat_model

log = logging.getLogger("conchdb.workers")

RETRIES = 5  # transient errors: tried again after 5, 10, 20, 40, 80 s
# A slide's last event is named by the status it ends in.
DONE, FAILED, NO_TISSUE = SlideStatus.DONE.value, SlideStatus.FAILED.value, SlideStatus.NO_TISSUE.value


class RunGone(Exception):
    """The ingesting process no longer waits for this run (interrupted, or died)."""


class Superseded(Exception):
    """The slide was sent again under another task id (this worker was taken for lost)."""

    def __init__(self, live: str):
        super().__init__(live)
        self.live = live


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
            "queue": self.queue, "model": heartbeat_model(self.encoder), "running": running,
            "started_at": self.started_at, "updated_at": time.time(),
        }

    def beat(self) -> None:
        """Rewrite the heartbeat, stamped with the broker's clock (`beat_at`), by which readers age it."""
        doc = self.describe()
        doc["beat_at"] = broker.server_time(self.redis)
        pipe = self.redis.pipeline()
        pipe.set(broker.worker_key(self.node), json.dumps(doc), ex=broker.HEARTBEAT_KEEP_S)
        pipe.sadd(broker.workers_key(), self.node)
        pipe.execute()

    def close(self) -> None:
        for store in self.stores.values():
            store.close()
        self.stores.clear()


class Heartbeat:
    """A thread that keeps the worker's heartbeat key fresh while it lives."""

    def __init__(self, ctx: WorkerContext, period_s: float = broker.HEARTBEAT_PERIOD_S):
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
            pipe = self.ctx.redis.pipeline()
            pipe.delete(broker.worker_key(self.ctx.node))
            pipe.srem(broker.workers_key(), self.ctx.node)
            pipe.execute()


class Reporter:
    """Sends one task's events to its run, waiting out broker restarts and a slow reader."""

    def __init__(self, ctx: WorkerContext, task_id: str, job: SlideJob):
        self.ctx, self.task_id, self.run_id, self.slide_id = ctx, task_id, job.run_id, job.slide.id
        self.key = broker.events_key(job.run_id)

    def call(self, fn: Callable[[redis.Redis], Any]) -> Any:
        """`fn(redis)`, waiting out a broker restart for up to the context's `reconnect_s`."""
        return broker.with_reconnect(lambda: fn(self.ctx.redis), self.ctx.reconnect_s)

    def check(self, run_gone: bool = True) -> None:
        """Raise `Superseded` when the slide was sent again under another task id, and (with
        `run_gone`) `RunGone` when the ingesting process no longer waits for the run."""

        def read(r: redis.Redis) -> list[Any]:
            pipe = r.pipeline()
            pipe.exists(broker.alive_key(self.run_id))
            pipe.hget(broker.live_key(self.run_id), self.slide_id)
            return pipe.execute()

        alive, live = self.call(read)
        # No live entry: the run is over (its keys are gone) or its dispatcher predates them.
        if live is not None and live.decode() != self.task_id:
            raise Superseded(live.decode())
        if run_gone and not alive:
            raise RunGone(self.run_id)

    def send(self, event: Event) -> None:
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
            self.check()
            time.sleep(0.05)
        self.check()
        self.send(Batch(task=self.task_id, tiles=tiles, vectors=vectors))


class _LiveSlideWriter(SlideWriter):
    """A worker's `SlideWriter` that checks that its task is still the one live for the slide
    before every slide record it writes (in progress, done, failed) and before the done rule's
    cleanup and mosaic (`delete_stale` comes first in `finish`, after the last tile is written):
    a worker taken for lost that comes back must not record a failure, a stale status or its
    own mosaic marks over the new delivery's work. Its tiles need no check: they are the same
    points (the same ids; vectors equal to float rounding)."""

    check: Callable[[], None] | None = None

    def write_record(self, *args: Any, **kwargs: Any) -> None:
        if self.check is not None:
            self.check()
        super().write_record(*args, **kwargs)

    def delete_stale(self, *args: Any, **kwargs: Any) -> None:
        if self.check is not None:
            self.check()
        super().delete_stale(*args, **kwargs)


def _track(ctx: WorkerContext, task_id: str, job: SlideJob) -> Progress:
    """Progress callbacks that keep the heartbeat's view of this task current."""
    entry = {"task": task_id, "run": job.run_id, "slide": job.slide.id, "tiles": 0, "done": 0,
             "since": time.time()}
    with ctx.lock:
        ctx.running[task_id] = entry
    _beat(ctx)  # at once: a worker lost from now on is known to have held this slide

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


def run_slide(ctx: WorkerContext, task_id: str, retries: int, task: SlideTask) -> str:
    """One delivery of a slide's task; returns what became of it (for the worker's log)."""
    job = task.job
    report = Reporter(ctx, task_id, job)
    key = broker.deliveries_key(task_id, retries)

    def count(r: redis.Redis) -> int:
        pipe = r.pipeline()
        pipe.incr(key)
        pipe.expire(key, broker.DELIVERIES_TTL_S)
        return int(pipe.execute()[0])

    # Deliveries of this task id (the visibility timeout, a pool child lost) and of the ids the
    # slide was sent under before (its worker was lost).
    deliveries = task.sent_before + report.call(count)
    try:
        report.check()
    except RunGone:
        return "dropped: the ingest that sent it has stopped"
    except Superseded as exc:
        return f"dropped: the slide was sent again as task {exc.live}"
    if deliveries > ctx.max_deliveries:
        error = (f"{job.slide.path}: delivered {deliveries} times without finishing (a worker died on it or was "
                 "lost each time, e.g. out of memory); raise the broker's visibility timeout if slides take that long")
        report.send(Finished(task=task_id, status=SlideStatus.FAILED, error=error))
        return f"{FAILED}: too many deliveries"
    if not ctx.encoder.answers_to(task.fingerprint):
        error = (f"{job.slide.path}: worker {ctx.node} has model {ctx.encoder.fingerprint}, the collection holds "
                 f"{task.fingerprint}; give every worker the same weights")
        report.send(Finished(task=task_id, status=SlideStatus.FAILED, error=error))
        return f"{FAILED}: another model"
    progress = _track(ctx, task_id, job)
    try:
        if task.qdrant_url:
            return _run_direct(ctx, task, report, progress)
        return _run_streamed(ctx, job, report, progress)
    except RunGone:
        return "dropped: the ingest that sent it has stopped"
    except Superseded as exc:
        log.warning("slide task %s: %s was sent again as task %s while this worker was silent; stopping it",
                    task_id, job.slide.id, exc.live)
        return f"dropped: the slide was sent again as task {exc.live}"
    finally:
        with ctx.lock:
            ctx.running.pop(task_id, None)
        _beat(ctx)


def _run_direct(ctx: WorkerContext, task: SlideTask, report: Reporter, progress: Progress) -> str:
    """The worker writes tiles and records into the Qdrant server itself.

    The slide is given up (`Superseded`) at the next batch or record once it was sent again;
    an interrupted ingest does not stop it: the slide is finished and recorded done."""
    assert task.qdrant_url is not None
    job, task_id = task.job, report.task_id
    store = ctx.store(task.qdrant_url)
    slide_writer = writer_for_job(store, task.collection, ctx.encoder, job, cls=_LiveSlideWriter)
    slide_writer.check = lambda: report.check(run_gone=False)

    def on_batch(n: int) -> None:
        report.check(run_gone=False)
        report.send(Embedded(task=task_id, n=n))

    events = Progress(on_slide=lambda _, n: report.send(Started(task=task_id, tiles=n)), on_batch=on_batch)
    writer = Writer(store, task.collection, {})
    try:
        outcome = ingest_one_slide(job, plan_slide(job), ctx.encoder, slide_writer, writer, task.previous,
                                   _chain(progress, events))
    finally:
        writer.close()
    report.send(Finished(task=task_id, status=outcome.status, tiles=outcome.tiles, error=outcome.error,
                         recorded=True))
    return outcome.status.value


def _run_streamed(ctx: WorkerContext, job: SlideJob, report: Reporter, progress: Progress) -> str:
    """The worker embeds; vectors and payloads go back to the ingesting process, which writes."""
    task_id = report.task_id
    plan = plan_slide(job)
    if plan.error is not None or plan.grid is None:
        report.send(Finished(task=task_id, status=SlideStatus.FAILED, error=plan.error, info=plan.info))
        return FAILED
    if len(plan.grid) == 0:
        report.send(Finished(task=task_id, status=SlideStatus.NO_TISSUE, info=plan.info))
        return NO_TISSUE
    report.send(Started(task=task_id, tiles=len(plan.grid), size=plan.grid.tile_size_level0, info=plan.info))
    try:
        mean = embed_slide(job, plan.grid, ctx.encoder, report.batch, progress)
    except SlideError as exc:
        report.check()  # a failure of a slide sent again since is the new delivery's to report
        report.send(Finished(task=task_id, status=SlideStatus.FAILED, error=str(exc), info=plan.info))
        return FAILED
    report.send(Finished(task=task_id, status=SlideStatus.DONE, tiles=len(plan.grid), info=plan.info, mean=mean))
    return DONE


def register(app: Celery, ctx: WorkerContext) -> None:
    """Add the slide task to `app`, bound to this worker's context."""

    # Not `shared`: a task bound to this context must not reach other apps made in the process.
    @app.task(bind=True, name=TASK_NAME, max_retries=RETRIES, acks_late=True, reject_on_worker_lost=True,
              shared=False)
    def ingest_slide(self: Task, **kwargs: Any) -> str:
        task_id, retries = self.request.id, self.request.retries
        try:
            task = SlideTask.from_dict(kwargs)
        except MessageError as exc:  # no run to tell: the message does not say which
            log.error("slide task %s: cannot read its message: %s", task_id, exc)
            return FAILED
        try:
            result = run_slide(ctx, task_id, retries, task)
        except Exception as exc:
            if broker.is_transient(exc) and retries < RETRIES:
                log.warning("slide task %s: %s; trying again", task_id, exc)
                raise self.retry(exc=exc, countdown=5 * 2**retries) from None
            if isinstance(exc, ConchdbError):
                message = exc.message
            else:
                message = f"worker {ctx.node}: {type(exc).__name__}: {exc}"
            log.exception("slide task %s failed", task_id)
            _report_failure(ctx, task_id, task, message)
            return FAILED
        log.info("slide task %s: %s", task_id, result)
        return result


def _report_failure(ctx: WorkerContext, task_id: str, task: SlideTask, message: str) -> None:
    """Tell the ingesting process, so the slide is recorded failed once; the broker may be gone."""
    error = f"{task.job.slide.path}: {message}"
    try:
        Reporter(ctx, task_id, task.job).send(Finished(task=task_id, status=SlideStatus.FAILED, error=error))
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        log.error("slide task %s: could not report its failure: %s", task_id, exc)
