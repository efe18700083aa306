"""The server's model work: one thread of its own runs every encode, inputs that wait together as one batch.

Why a thread of its own: the model runs one batch at a time anyway (a second caller would
only split the cores or the GPU), and a request that waits for it should hold nothing that
tiles, thumbnails, Deep Zoom or searches by stored point need. Requests that use the model
run on threads of their own (`Service.model_route`), submit their inputs here and wait for
their vectors; Starlette's thread pool is left to the rest.

Why batches: a tower costs about the same for one input as for a small batch, so the inputs
that arrive while a batch runs are encoded together as the next one (at most the tower's
`max_batch`); the towers take turns. Texts are keyed, so a text asked for by several
requests is encoded once, and their vectors are cached (a runner is made for one model, so
its cache never serves another model's vectors). Images are not keyed.

Every waiter has a future of its own. A request whose client went away cancels its futures
(`Waiting`); an input whose waiters are all cancelled is dropped when its batch is taken,
so the model never works for nobody. An encode already running is not interrupted.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import threading
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Mapping, Sequence
from concurrent.futures import Executor, Future
from dataclasses import dataclass, field
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


@dataclass
class _Queue:
    tower: Tower
    waiting: OrderedDict[Hashable, tuple[Any, list[Future[np.ndarray]], bool]] = field(default_factory=OrderedDict)
    cache: OrderedDict[Hashable, np.ndarray] = field(default_factory=OrderedDict)
    sizes: list[int] = field(default_factory=list)


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
    """Runs every model call of a server on one thread: `vectors(tower, items)` batched, `call(fn)` as is.

    `batches[tower]`: the size of each batch encoded; `skipped`: inputs dropped because every
    request waiting for them had gone (what the tests and the benchmark look at)."""

    def __init__(self, towers: Mapping[str, Tower]):
        self._queues = {name: _Queue(tower) for name, tower in towers.items()}
        self._calls: deque[tuple[Callable[[], Any], Future[Any]]] = deque()
        self._turns = itertools.cycle([None, *self._queues])  # None: the calls' turn
        self._cond = threading.Condition()
        self._stop: threading.Event | None = None  # the running thread's; None: no thread
        self.skipped = 0

    @property
    def batches(self) -> dict[str, list[int]]:
        return {name: list(q.sizes) for name, q in self._queues.items()}

    def pending(self, tower: str) -> int:
        """Inputs of `tower` waiting for a batch with at least one waiter still there."""
        with self._cond:
            entries = self._queues[tower].waiting.values()
            return sum(any(not f.cancelled() for f in futures) for _, futures, _ in entries)

    # -- asking ----------------------------------------------------------------------------

    def submit(
        self, tower: str, items: Sequence[Any], keys: Sequence[Hashable] | None = None
    ) -> list[Future[np.ndarray]]:
        """A future per item; with `keys`, equal keys share one encode and vectors are cached."""
        if keys is not None and len(keys) != len(items):
            raise ValueError(f"{len(keys)} keys for {len(items)} items; give one key per item")
        futures: list[Future[np.ndarray]] = []
        with self._cond:
            queue = self._queues[tower]
            for i, item in enumerate(items):
                future: Future[np.ndarray] = Future()
                futures.append(future)
                key: Hashable = keys[i] if keys is not None else object()
                cached = queue.cache.get(key) if keys is not None else None
                if cached is not None:
                    queue.cache.move_to_end(key)
                    future.set_result(cached)
                elif key in queue.waiting:
                    queue.waiting[key][1].append(future)
                else:
                    queue.waiting[key] = (item, [future], keys is not None)
            self._wake()
        return futures

    def call(self, fn: Callable[[], T]) -> T:
        """`fn()` on the model thread, in its turn; waits for it (see `vectors`)."""
        future: Future[T] = Future()
        with self._cond:
            self._calls.append((fn, future))
            self._wake()
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

    def _wake(self) -> None:
        if self._stop is None:
            self._stop = threading.Event()
            threading.Thread(target=self._loop, args=(self._stop,), name="conchdb-model", daemon=True).start()
        self._cond.notify_all()

    def close(self) -> None:
        """Stop the thread after the batch it runs; whatever waits is cancelled. Work asked for
        later starts a new thread (an app's lifespan may end and begin again, as in tests)."""
        with self._cond:
            if self._stop is not None:
                self._stop.set()
                self._stop = None
            self._cond.notify_all()
            for queue in self._queues.values():
                for _, futures, _ in queue.waiting.values():
                    for future in futures:
                        future.cancel()
                queue.waiting.clear()
            for _, future in self._calls:
                future.cancel()
            self._calls.clear()

    # -- the model thread --------------------------------------------------------------------

    def _loop(self, stop: threading.Event) -> None:
        while True:
            with self._cond:
                while not stop.is_set() and not self._calls and not any(q.waiting for q in self._queues.values()):
                    self._cond.wait()
                if stop.is_set():
                    return
                job = self._next_job()
            if job is not None:
                job()

    def _next_job(self) -> Callable[[], None] | None:
        """The next source with work, in turn (called with the lock held)."""
        for turn in itertools.islice(self._turns, len(self._queues) + 1):
            if turn is None and self._calls:
                fn, future = self._calls.popleft()
                return functools.partial(_run_call, fn, future)
            if turn is not None and self._queues[turn].waiting:
                queue = self._queues[turn]
                batch = self._take(queue)
                return functools.partial(_run_batch, queue, batch) if batch else None
        return None

    def _take(self, queue: _Queue) -> list[tuple[Hashable, Any, list[Future[np.ndarray]], bool]]:
        batch = []
        while queue.waiting and len(batch) < queue.tower.max_batch:
            key, (item, futures, keyed) = queue.waiting.popitem(last=False)
            live = [f for f in futures if f.set_running_or_notify_cancel()]
            if live:
                batch.append((key, item, live, keyed))
            else:
                self.skipped += 1
        return batch


def _run_call(fn: Callable[[], Any], future: Future[Any]) -> None:
    if not future.set_running_or_notify_cancel():
        return  # its request is gone
    try:
        future.set_result(fn())
    except BaseException as exc:  # the waiter raises it; the model thread goes on
        future.set_exception(exc)


def _run_batch(queue: _Queue, batch: list[tuple[Hashable, Any, list[Future[np.ndarray]], bool]]) -> None:
    try:
        out = queue.tower.encode([item for _, item, _, _ in batch])
    except BaseException as exc:
        for _, _, futures, _ in batch:
            for future in futures:
                future.set_exception(exc)
        return
    queue.sizes.append(len(batch))
    for (key, _, futures, keyed), vector in zip(batch, out, strict=True):
        vector = np.asarray(vector, dtype=np.float32)
        if keyed and queue.tower.cache_size:
            queue.cache[key] = vector
            while len(queue.cache) > queue.tower.cache_size:
                queue.cache.popitem(last=False)
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
