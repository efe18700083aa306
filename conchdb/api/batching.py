"""The server's model work: each tower on a thread of its own, inputs that wait together as one batch.

Why threads of their own: a request that waits for the model should hold nothing that
tiles, thumbnails, Deep Zoom or searches by stored point need. Requests that use the model
run on threads of their own (`Service.model_route`), submit their inputs here and wait for
their vectors; Starlette's thread pool is left to the rest. Why one per tower: a tower runs
one batch at a time anyway (a second caller would only split the cores or the GPU), and with
a thread each, a text query never waits behind a batch of images, which on a CPU can take
seconds. Other model work (`call`: vocabulary vectors, zero-shot classes, the text noise
floor) takes turns with its tower's batches.

Why batches: on a GPU a tower costs about the same for one input as for a small batch, so
the inputs that arrive while a batch runs are encoded together as the next one (at most the
tower's `max_batch`). Texts are keyed, so a text asked for by several requests is encoded
once, and their vectors are cached (a runner is made for one model, so its cache never
serves another model's vectors). Images are not keyed.

Every waiter has a future of its own. A request whose client went away cancels its futures
(`Waiting`); an input whose waiters are all cancelled is dropped when its batch is taken,
so the model never works for nobody. An encode already running is not interrupted.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


@dataclass(kw_only=True)
class Tower:
    """One kind of model input: how a batch of them is encoded, how large a batch may be, and
    (keyed inputs only) how many vectors to keep."""

    encode: Callable[[list[Any]], np.ndarray]
    max_batch: int
    cache_size: int = 0


class Waiting:
    """The model work one request waits for, cancelled together when its client goes away."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._futures: list[Future[Any]] = []
        self.cancelled = False

    def add(self, futures: Sequence[Future[Any]]) -> None:
        with self._lock:
            self._futures.extend(futures)
            cancelled = self.cancelled
        if cancelled:  # the client left before this work was asked for
            for future in futures:
                future.cancel()

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            futures = list(self._futures)
        for future in futures:
            future.cancel()  # False, and no effect, for work already running or done


WAITING: contextvars.ContextVar[Waiting | None] = contextvars.ContextVar("conchdb_model_waiting", default=None)
"""The current request's `Waiting` (set by `run_while_connected` for the thread it runs a request
on): model calls deep in the service register their futures with it without passing it down."""


class ModelRunner:
    """Runs every model call of a server, each tower on a thread of its own: `vectors(tower,
    items)` batched, `call(fn, tower)` as is, in turn with the tower's batches.

    `batches[tower]`: the size of each batch encoded; `skipped`: inputs and calls dropped
    because every request waiting for them had gone (what the tests and the benchmark read)."""

    def __init__(self, towers: Mapping[str, Tower]):
        self._lanes = {name: _Lane(tower) for name, tower in towers.items()}

    @property
    def batches(self) -> dict[str, list[int]]:
        return {name: list(lane.sizes) for name, lane in self._lanes.items()}

    @property
    def skipped(self) -> int:
        return sum(lane.skipped for lane in self._lanes.values())

    def pending(self, tower: str) -> int:
        """Inputs of `tower` waiting for a batch with at least one waiter still there."""
        lane = self._lanes[tower]
        with lane.cond:
            return sum(any(not f.cancelled() for f in futures) for _, futures, _ in lane.waiting.values())

    # -- asking ----------------------------------------------------------------------------

    def submit(
        self, tower: str, items: Sequence[Any], keys: Sequence[Hashable] | None = None
    ) -> list[Future[np.ndarray]]:
        """A future per item; with `keys`, equal keys share one encode and vectors are cached."""
        if keys is not None and len(keys) != len(items):
            raise ValueError(f"{len(keys)} keys for {len(items)} items; give one key per item")
        lane = self._lanes[tower]
        futures: list[Future[np.ndarray]] = []
        with lane.cond:
            for i, item in enumerate(items):
                future: Future[np.ndarray] = Future()
                futures.append(future)
                key: Hashable = keys[i] if keys is not None else object()
                cached = lane.cache.get(key) if keys is not None else None
                if cached is not None:
                    lane.cache.move_to_end(key)
                    future.set_result(cached)
                elif key in lane.waiting:
                    lane.waiting[key][1].append(future)
                else:
                    lane.waiting[key] = (item, [future], keys is not None)
            lane.wake()
        return futures

    def call(self, fn: Callable[[], T], tower: str) -> T:
        """`fn()` on `tower`'s thread, between its batches; waits for it (see `vectors`)."""
        lane = self._lanes[tower]
        future: Future[T] = Future()
        with lane.cond:
            lane.calls.append((fn, future))
            lane.wake()
        return self._wait([future])[0]

    def vectors(self, tower: str, items: Sequence[Any], keys: Sequence[Hashable] | None = None) -> np.ndarray:
        """(N, D) vectors of `items`, in order; waits for them. The futures join the current
        request's `Waiting`, so a client that leaves cancels them (`CancelledError` here)."""
        futures = self.submit(tower, items, keys)
        return np.stack(self._wait(futures)) if futures else np.zeros((0, 0), dtype=np.float32)

    def _wait(self, futures: list[Future[T]]) -> list[T]:
        waiting = WAITING.get()
        if waiting is not None:
            waiting.add(futures)
        return [f.result() for f in futures]

    def close(self) -> None:
        """Stop the threads after the batch each runs; whatever waits is cancelled. Work asked
        for later starts new threads (an app's lifespan may end and begin again, as in tests)."""
        for lane in self._lanes.values():
            lane.close()


class _Lane:
    """One tower's inputs, cache, calls and thread."""

    def __init__(self, tower: Tower):
        self.tower = tower
        self.waiting: OrderedDict[Hashable, tuple[Any, list[Future[np.ndarray]], bool]] = OrderedDict()
        self.cache: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self.calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self.sizes: list[int] = []
        self.skipped = 0
        self.cond = threading.Condition()
        self._stop: threading.Event | None = None  # the running thread's; None: no thread
        self._call_next = True

    def wake(self) -> None:
        """(With `cond` held.) Start the thread if there is none, and tell it there is work."""
        if self._stop is None:
            self._stop = threading.Event()
            threading.Thread(target=self._loop, args=(self._stop,), name="conchdb-model", daemon=True).start()
        self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            if self._stop is not None:
                self._stop.set()
                self._stop = None
            for _, futures, _ in self.waiting.values():
                for future in futures:
                    future.cancel()
            self.waiting.clear()
            for _, future in self.calls:
                future.cancel()
            self.calls.clear()
            self.cond.notify_all()

    def _loop(self, stop: threading.Event) -> None:
        while True:
            with self.cond:
                while not stop.is_set() and not self.calls and not self.waiting:
                    self.cond.wait()
                if stop.is_set():
                    return
                job = self._next_job()
            if job is not None:
                job()

    def _next_job(self) -> Callable[[], None] | None:
        """A call or a batch, taking turns when both wait (called with `cond` held)."""
        if self.calls and (self._call_next or not self.waiting):
            self._call_next = False
            return functools.partial(self._run_call, *self.calls.popleft())
        self._call_next = True
        batch = []
        while self.waiting and len(batch) < self.tower.max_batch:
            key, (item, futures, keyed) = self.waiting.popitem(last=False)
            live = [f for f in futures if f.set_running_or_notify_cancel()]
            if live:
                batch.append((key, item, live, keyed))
            else:
                self.skipped += 1
        return functools.partial(self._run_batch, batch) if batch else None

    def _run_call(self, fn: Callable[[], Any], future: Future[Any]) -> None:
        if not future.set_running_or_notify_cancel():
            self.skipped += 1  # its request is gone
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # the waiter raises it; the thread goes on
            future.set_exception(exc)

    def _run_batch(self, batch: list[tuple[Hashable, Any, list[Future[np.ndarray]], bool]]) -> None:
        try:
            out = self.tower.encode([item for _, item, _, _ in batch])
        except BaseException as exc:
            for _, _, futures, _ in batch:
                for future in futures:
                    future.set_exception(exc)
            return
        self.sizes.append(len(batch))
        for (key, _, futures, keyed), vector in zip(batch, out, strict=True):
            vector = np.asarray(vector, dtype=np.float32)
            if keyed and self.tower.cache_size:
                with self.cond:
                    self.cache[key] = vector
                    while len(self.cache) > self.tower.cache_size:
                        self.cache.popitem(last=False)
            for future in futures:
                future.set_result(vector)


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def run_while_connected(receive: Callable[[], Any], pool: Executor, fn: Callable[[], T]) -> T:
    """`fn()` on a thread of `pool`, while the client is there. If it disconnects first, `fn`
    is dropped if it has not started, the model work it waits for is cancelled (its encodes
    dropped if they have not started), and `ClientGone` is raised.

    `receive` is the request's ASGI receive, called after the body was read: from then on it
    only answers when the client disconnects (or the response is complete)."""
    waiting = Waiting()
    context = contextvars.copy_context()
    context.run(WAITING.set, waiting)
    job = asyncio.wrap_future(pool.submit(context.run, fn))
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not job.done():
            waiting.cancel()
            job.cancel()  # drops fn if it has not started; a running fn ends when its waits are cancelled
            job.add_done_callback(_ignore_outcome)
        gone.cancel()
    if waiting.cancelled:
        raise ClientGone
    return job.result()


async def _disconnected(receive: Callable[[], Any]) -> None:
    while (await receive()).get("type") != "http.disconnect":
        pass


def _ignore_outcome(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # retrieved, so that asyncio does not log it: the client it was for is gone
