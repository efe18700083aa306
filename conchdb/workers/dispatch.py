"""`conchdb ingest --broker`: the same run as in-process, with the slides embedded by workers.

The ingesting process keeps every decision of the in-process run: discovery, manifest,
collections, which slides are done (`Ingest.pending`), the summary and its exit codes.
It sends one task per slide still to do and reads the run's events list. Two ways to write:

- with a Qdrant server, the workers write tiles and slide records themselves
  (`ingest_one_slide`); the events carry only progress and outcomes;
- with the embedded store, which one process owns, the workers send vectors and payloads
  back in batches and this process names and writes them, applying the pipeline's record
  rules (`SlideWriter`: in progress, stale-tile cleanup, done) as the events arrive.

The model fingerprint and dimensions recorded in the collection are those of the workers
online (they must agree), so the ingesting machine needs neither weights nor a GPU.

A lost worker costs `lost_s` (30 s), not the broker's visibility timeout: every couple of
seconds this process reads the heartbeats, and a slide held by a worker whose heartbeat is
older than `lost_s` is sent again at once under a new task id (a delivery toward
`max_deliveries`). The run's live-task hash (`broker.live_key`) then names the new id, so
the old task, should its worker come back, stops at its next batch or record; its events
are ignored here (they carry the old id); it is revoked and its unacknowledged message is
dropped, so the visibility timeout does not hand it out again. The visibility timeout
remains for the case where this process is gone too.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import kombu.exceptions
import numpy as np
import redis

from conchdb.catalog import SlideStatus
from conchdb.ingest.cohort import Cohort
from conchdb.ingest.manifest import Manifest
from conchdb.ingest.pipeline import (
    Ingest,
    IngestOptions,
    IngestSummary,
    Progress,
    SlideJob,
    SlideOutcome,
    Writer,
)
from conchdb.store import Store
from conchdb.workers import broker
from conchdb.workers.app import TASK_NAME, make_app
from conchdb.workers.messages import Batch, Embedded, Event, SlideTask, Started, decode_event
from conchdb.workers.status import ALIASES, WORKER_LOST_S, heartbeats, online_workers, queued, unacknowledged


@dataclass
class BrokerOptions:
    """Where the workers are and how long to wait for them and for the broker."""

    broker_url: str
    queue: str = "conchdb"
    visibility_timeout: int = 21600
    max_deliveries: int = 3
    qdrant_url: str | None = None  # set: workers write into this server; None: this process writes
    worker_wait_s: float = 30.0  # for a first worker to come online
    reconnect_s: float = 60.0  # a broker restart waited out before giving up
    stall_s: float = 30.0  # silence after which the broker is checked for lost tasks
    lost_s: float = WORKER_LOST_S  # a worker silent this long is lost; its slides are sent again
    watch_s: float = 2.0  # how often the workers' heartbeats are read while slides run


@dataclass
class RemoteModel:
    """The model the workers hold, as their heartbeats describe it; stands in for an `Encoder`
    where the run only records what built the vectors."""

    description: dict[str, Any]

    @property
    def dim(self) -> int:
        return int(self.description["embed_dim"])

    @property
    def fingerprint(self) -> str:
        return str(self.description["model_fingerprint"])

    @property
    def aliases(self) -> tuple[str, ...]:
        """The fingerprints an earlier conchdb gave the same weights (`Encoder.aliases`)."""
        return tuple(str(a) for a in self.description.get(ALIASES, ()))

    def answers_to(self, fingerprint: str | None) -> bool:
        return fingerprint == self.fingerprint or fingerprint in self.aliases

    def describe(self) -> dict[str, Any]:
        """What a collection records: the description less the aliases, which are the workers' own."""
        return {k: v for k, v in self.description.items() if k != ALIASES}


def recorded_model(store: Store, collection: str) -> RemoteModel | None:
    """The model a collection records having been built by (None: no such collection yet)."""
    meta = store.collection_metadata(collection)
    if not meta or "model_fingerprint" not in meta or "embed_dim" not in meta:
        return None
    return RemoteModel({k: v for k, v in meta.items() if k != "payload_schema"})


def workers_model(client: redis.Redis, queue: str, wait_s: float, url: str,
                  lost_s: float = WORKER_LOST_S) -> RemoteModel:
    """The one model every worker on `queue` holds; waits up to `wait_s` for a first worker."""
    deadline = time.monotonic() + wait_s
    while True:
        workers = online_workers(client, queue, lost_s)
        if workers:
            break
        if time.monotonic() > deadline:
            raise broker.BrokerError(
                f"no worker is online on queue {queue!r} at {broker.redact(url)} (waited {wait_s:g} s)",
                fix="start at least one worker (the `conchdb worker` command) on the same broker and queue",
            )
        time.sleep(0.5)
    models = {w["model"]["model_fingerprint"]: w["model"] for w in workers}
    if len(models) > 1:
        names = ", ".join(f"{w['node']}: {w['model']['model_fingerprint']}" for w in workers)
        raise broker.BrokerError(
            f"the workers on queue {queue!r} hold different models ({names})",
            fix="give every worker the same CONCH weights, or put them on different queues",
        )
    # One fingerprint; the earlier versions' ones depend on each machine's thread count, so all are kept.
    aliases = sorted({str(a) for w in workers for a in w["model"].get(ALIASES, ())})
    return RemoteModel({**next(iter(models.values())), ALIASES: aliases})


@dataclass
class _Task:
    """One slide sent to the workers and what has come back for it."""

    job: SlideJob
    previous: str | None
    task_id: str
    started: bool = False
    since: float = field(default_factory=time.perf_counter)
    sends: int = 1
    embedded: int = 0  # tiles embedded by its current delivery
    counted: int = 0  # tiles of it shown on the progress display (a delivery redone adds none)
    # Where this process writes: the slide's batches go here, named by the run's `SlideWriter`.
    sink: Callable[[list[dict[str, Any]], np.ndarray], None] | None = None


class BrokerIngest:
    """One ingest run whose slides are embedded by Celery workers."""

    def __init__(
        self,
        cohort: Cohort,
        manifest: Manifest,
        store: Store,
        collection: str,
        options: IngestOptions,
        broker_options: BrokerOptions,
        progress: Progress | None = None,
    ):
        self.opts = broker_options
        self.client = broker.connect(broker_options.broker_url)  # unreachable: fails now, naming the URL
        # A rerun that only relabels, moves or finds slides missing needs no worker: the model the
        # collection records stands in until a slide is to be embedded (then workers are awaited).
        recorded = recorded_model(store, collection)
        try:
            model = workers_model(self.client, broker_options.queue,
                                  0.0 if recorded is not None else broker_options.worker_wait_s,
                                  broker_options.broker_url, broker_options.lost_s)
            self._workers_checked = True
        except broker.BrokerError:
            if recorded is None:
                raise
            model, self._workers_checked = recorded, False
        self.ingest = Ingest(cohort, manifest, model, store, collection, options, progress)  # type: ignore[arg-type]
        self.progress = self.ingest.progress
        self.app = make_app(broker_options.broker_url, broker_options.queue, broker_options.visibility_timeout)
        self.events = broker.events_key(self.ingest.run_id)
        self.alive = broker.alive_key(self.ingest.run_id)
        self.live = broker.live_key(self.ingest.run_id)
        self._alive_at = 0.0
        self._watched_at = 0.0
        self._running_said: tuple[tuple[str, str], ...] | None = None

    def _await_workers(self) -> None:
        """Before the first slide is sent by a run that started without a worker online: wait
        for one, and refuse workers whose model is not the one the collection records."""
        if self._workers_checked:
            return
        opts = self.opts
        online = workers_model(self.client, opts.queue, opts.worker_wait_s, opts.broker_url, opts.lost_s)
        if not online.answers_to(self.ingest.encoder.fingerprint):
            raise broker.BrokerError(
                f"the workers on queue {opts.queue!r} hold model {online.fingerprint}, but collection "
                f"'{self.ingest.collection}' was built by {self.ingest.encoder.fingerprint}",
                fix="give the workers the weights the collection was built with, or ingest into another collection",
            )
        if online.fingerprint != self.ingest.encoder.fingerprint:
            # The same weights, recorded by an earlier conchdb: the run goes on with the workers'
            # fingerprint (every worker knows it, not every one the earlier), renaming the record.
            self.ingest.encoder = self.ingest.slide_writer.model = online  # type: ignore[assignment]
            self.ingest.prepare()
        self._workers_checked = True

    # -- broker plumbing -----------------------------------------------------------------

    def _redis(self, call: Any) -> Any:
        try:
            return broker.with_reconnect(lambda: call(self.client), self.opts.reconnect_s)
        except (redis.ConnectionError, redis.TimeoutError) as exc:
            raise broker.BrokerError(
                f"lost the broker at {broker.redact(self.opts.broker_url)} for {self.opts.reconnect_s:g} s: {exc}",
                fix="start it again and run the same ingest again: slides already done are skipped, "
                     "the others are done again",
            ) from None

    def _keep_alive(self, force: bool = False) -> None:
        if force or time.monotonic() - self._alive_at > 1.0:
            self._redis(lambda r: r.set(self.alive, "1", ex=broker.ALIVE_TTL_S))
            self._alive_at = time.monotonic()

    def _send(self, task: _Task) -> None:
        message = SlideTask(job=task.job, collection=self.ingest.collection,
                            fingerprint=self.ingest.encoder.fingerprint, previous=task.previous,
                            qdrant_url=self.opts.qdrant_url, sent_before=task.sends - 1)

        def mark_live(r: redis.Redis) -> None:
            pipe = r.pipeline()
            pipe.hset(self.live, task.job.slide.id, task.task_id)
            pipe.expire(self.live, broker.EVENTS_TTL_S)
            pipe.execute()

        self._redis(mark_live)  # before the task exists, so no worker ever finds it stale by mistake
        try:
            self.app.send_task(TASK_NAME, kwargs=message.to_dict(), task_id=task.task_id, queue=self.opts.queue)
        except kombu.exceptions.OperationalError as exc:
            raise broker.BrokerError(
                f"cannot send slides to the broker at {broker.redact(self.opts.broker_url)}: {exc}",
                fix="check that Redis is running, then run the same ingest again",
            ) from None

    # -- the run -------------------------------------------------------------------------

    def run(self) -> IngestSummary:
        ingest = self.ingest
        summary = ingest.new_summary()
        frame = ingest.frame(summary)
        ingest.prepare()
        tasks: dict[str, _Task] = {}
        # Workers write into a Qdrant server themselves; else this process names and writes their vectors.
        with frame.running(len(ingest.cohort.slides), writer=self.opts.qdrant_url is None) as writer:
            try:
                self._keep_alive(force=True)
                pending = ingest.pending(summary)
                if pending:
                    self._await_workers()
                for slide, record in pending:
                    task = _Task(ingest.job(slide), record.get("status") if record else None, uuid.uuid4().hex)
                    tasks[task.task_id] = task
                    self._send(task)
                    self._keep_alive()
                self._collect(tasks, summary, writer)
            except BaseException:
                self._cancel(tasks)
                raise
        self._redis(lambda r: r.delete(self.alive, self.events, self.live))
        self.app.close()
        return frame.finish()

    def _cancel(self, tasks: dict[str, _Task]) -> None:
        """Stop: workers drop this run's tasks not started yet, and stop sending batches nobody reads."""
        try:
            self.client.delete(self.alive)
        except (redis.RedisError, OSError):
            self.app.close()  # the broker is gone too: the alive mark lapses by itself within a minute
            return
        with contextlib.suppress(kombu.exceptions.OperationalError, OSError):
            self.app.control.revoke(list(tasks))  # workers online discard these on sight
        self.app.close()

    def _collect(self, tasks: dict[str, _Task], summary: IngestSummary, writer: Writer | None) -> None:
        waiting = dict(tasks)
        quiet_since = time.monotonic()
        while waiting:
            self._keep_alive()
            if time.monotonic() - self._watched_at > self.opts.watch_s:
                self._watch(waiting, summary)
                self._watched_at = time.monotonic()
                if not waiting:
                    break
            popped = self._redis(lambda r: r.blpop([self.events], timeout=1))
            if popped is None:
                if time.monotonic() - quiet_since > self.opts.stall_s:
                    self._resend_lost(waiting, summary)
                    quiet_since = time.monotonic()
                continue
            quiet_since = time.monotonic()
            event = decode_event(popped[1])
            task = waiting.get(event.task)
            if task is None:  # a task resent since, or an event from before a redelivery finished it
                continue
            outcome = self._handle(task, event, writer)
            if outcome is not None:
                outcome.seconds = time.perf_counter() - task.since
                del waiting[event.task]
                self.ingest.emit(summary, outcome)

    def _handle(self, task: _Task, event: Event, writer: Writer | None) -> SlideOutcome | None:
        """Apply one event; returns the slide's outcome when the event is its last."""
        job, sw = task.job, self.ingest.slide_writer
        slide, tiling = job.slide, job.tiling
        flush = writer.flush if writer is not None else None
        if isinstance(event, Started):
            task.embedded = 0
            if not task.started:  # a redelivered slide starts again; its tiles are counted once
                task.started = True
                task.since = time.perf_counter()
                if self.progress.on_slide:
                    self.progress.on_slide(slide.id, event.tiles)
            if writer is not None:
                assert event.size is not None, "a start without the tile size, in a run where this process writes"
                sw.begin(slide, tiling, event.tiles, **event.info)
                task.sink = sw.sink(slide, tiling, event.size, event.info, writer)
            return None
        if isinstance(event, Batch):
            # Workers send `start` before any batch, and batches only when this process writes.
            assert task.sink is not None, "a batch came before its slide's start, or to a run whose workers write"
            task.sink(event.tiles, event.vectors)
            self._embedded(task, len(event.tiles))
            return None
        if isinstance(event, Embedded):
            self._embedded(task, event.n)
            return None
        if event.recorded:
            return SlideOutcome(slide.id, str(slide.path), event.status, event.tiles, event.error)
        if event.status == SlideStatus.DONE:
            assert event.mean is not None, "a slide done without its mean vector, in a run where this process writes"
            return sw.finish(slide, tiling, event.tiles, np.asarray(event.mean), flush, **event.info)
        if event.status == SlideStatus.NO_TISSUE:
            outcome = sw.begin(slide, tiling, 0, **event.info)
            assert outcome is not None
            return outcome
        return sw.fail(slide, tiling, str(event.error), task.previous, flush, **event.info)

    def _embedded(self, task: _Task, n: int) -> None:
        """Count tiles on the progress display once, however often their slide is redelivered."""
        task.embedded += n
        new = max(0, task.embedded - task.counted)
        task.counted += new
        if new and self.progress.on_batch and task.started:
            self.progress.on_batch(new)

    # -- lost workers --------------------------------------------------------------------

    def _notice(self, message: str, **data: Any) -> None:
        if self.progress.on_notice:
            self.progress.on_notice(message, data)

    def _watch(self, waiting: dict[str, _Task], summary: IngestSummary) -> None:
        """Read the heartbeats: send again at once the slides held by lost workers, and say
        which slides run on which worker when that changes."""
        beats = self._redis(lambda r: heartbeats(r, self.opts.queue))
        running: list[tuple[str, str]] = []
        for beat in beats:
            for entry in beat.running():
                task = waiting.get(entry.get("task", ""))
                if task is None:
                    continue
                if beat.lost(self.opts.lost_s):
                    reason = (f"worker {beat.node} lost: no heartbeat for {beat.age_s:.0f} s "
                              f"(CONCHDB_WORKER_LOST_S={self.opts.lost_s:g})")
                    self._resend(waiting, task, summary, reason, beat.node)
                else:
                    running.append((task.job.slide.id, beat.node))
        said = tuple(sorted(running))
        if said != self._running_said:
            self._running_said = said
            queued_n = len(waiting) - len(said)
            where = ", ".join(f"{slide} on {node}" for slide, node in said) or "none"
            self._notice(f"running: {where}; {queued_n} waiting for a worker", event="running",
                         running=[{"slide": slide, "worker": node} for slide, node in said], waiting=queued_n)

    def _resend(self, waiting: dict[str, _Task], task: _Task, summary: IngestSummary, reason: str,
                node: str) -> None:
        """Send a slide again under a new task id, its old task made stale; or, after
        `max_deliveries` sends, record it failed."""
        old = task.task_id
        del waiting[old]
        slide = task.job.slide
        self._drop(old)
        if task.sends >= self.opts.max_deliveries:
            error = f"{slide.path}: sent {task.sends} times and its worker was lost each time; last: {reason}"
            failed = self.ingest.slide_writer.fail(slide, task.job.tiling, error, task.previous)
            self._notice(f"failed {slide.id}: {error}", event="failed", slide=slide.id, error=error)
            self.ingest.emit(summary, failed)
            return
        task.task_id, task.sends = uuid.uuid4().hex, task.sends + 1
        waiting[task.task_id] = task
        self._send(task)
        summary.resent.append((slide.id, reason))
        self._notice(f"re-sent {slide.id}: {reason}", event="resent", slide=slide.id, path=str(slide.path),
                     worker=node, reason=reason, delivery=task.sends)

    def _drop(self, task_id: str) -> None:
        """Make a task whose worker is lost harmless: revoked (workers online discard it on
        sight) and its unacknowledged message dropped (the visibility timeout hands it out no more)."""
        with contextlib.suppress(kombu.exceptions.OperationalError, OSError):
            self.app.control.revoke(task_id)
        self._redis(lambda r: broker.drop_unacked(r, task_id))

    def _resend_lost(self, waiting: dict[str, _Task], summary: IngestSummary) -> None:
        """After a silence: tasks neither queued, nor delivered, nor running were lost by the
        broker (restarted without its data); send them again, at most `max_deliveries` times."""
        queue = self.opts.queue
        busy = self._redis(lambda r: queued(r, queue) + unacknowledged(r))
        lost_s = self.opts.lost_s
        running = self._redis(lambda r: [t for w in online_workers(r, queue, lost_s) for t in w["running"]])
        if busy or any(t["run"] == self.ingest.run_id for t in running):
            return
        for task_id, task in list(waiting.items()):
            del waiting[task_id]
            if task.sends >= self.opts.max_deliveries:
                error = f"{task.job.slide.path}: the broker lost this slide's task {task.sends} times"
                failed = self.ingest.slide_writer.fail(task.job.slide, task.job.tiling, error, task.previous)
                self.ingest.emit(summary, failed)
                continue
            task.task_id, task.sends, task.started = uuid.uuid4().hex, task.sends + 1, False
            waiting[task.task_id] = task
            self._send(task)
