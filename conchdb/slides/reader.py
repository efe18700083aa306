"""Turn a tile grid into batches of uint8 pixels, in grid order, from worker processes.

Decoding JPEG tiles and resizing them is CPU work that one Python process cannot spread
over cores, so each worker process opens the slide once and reads whole batches. Workers
write pixels straight into a fixed set of shared-memory slots and say only "batch k is in
slot s", so no pixel is pickled, and because a batch is handed out only when a slot is
free, memory is bounded by the slot count, whatever the slide's size. Batches may finish
out of order; the reader yields them in grid order.

A region that cannot be decoded ends the slide with a `SlideError` naming the file and
the region; the reader then stops its workers, frees the shared memory and re-raises,
so the caller can go on with the next slide. A worker that dies outright (killed, out of
memory) is noticed within `POLL_S` and ends the slide the same way.

For a GPU feeder the reader can skip its last copy (`copy=False`: each batch is a view
into the shared slots, valid until the next batch is asked for), expose the slots so they
can be page-locked (`slots`), and `start()` reading before the first batch is asked for, so
the next slide's tiles are decoded while the current one is embedded. Ctrl-C is handled by the parent alone
(workers ignore SIGINT) and leads to the same orderly shutdown.
"""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import queue
import signal
import sys
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil
from PIL import Image

from conchdb.errors import SlideError
from conchdb.slides.region import read_region
from conchdb.slides.slide import DAMAGED_HINT, Slide, open_slide

if TYPE_CHECKING:  # workers import this module: keep the tissue code (scikit-image) out of them
    from conchdb.slides.grid import TileGrid

READ_BATCH = 32
"""Tiles a worker reads per task when feeding a GPU: the model's larger batches are joined on
the device, so shared memory (workers × prefetch × READ_BATCH tiles) and the wait for a
worker's first batch stay small whatever the model batch."""

POLL_S = 0.5
"""How often the parent checks that its workers are alive while waiting for a batch."""

OWNER_CHECK_S = 1.0
"""How often an idle worker checks that the reading process still exists."""


@dataclass(frozen=True)
class TileBatch:
    """Consecutive tiles of a grid: `tiles` (N, H, W, 3) uint8 and their level-0 `coords`
    (N, 2) int64 (x, y); they are `grid.tiles[start:start + N]`."""

    tiles: np.ndarray
    coords: np.ndarray
    start: int

    def __len__(self) -> int:
        return len(self.tiles)


@dataclass(frozen=True)
class ReadSpec:
    """What a worker needs to read tiles: the grid without its (possibly long) tile list."""

    read_level: int
    tile_size_level0: int
    tile_px: int
    whole_image: bool
    slide_dimensions: tuple[int, int]

    @classmethod
    def of(cls, grid: TileGrid) -> ReadSpec:
        return cls(grid.read_level, grid.tile_size_level0, grid.tile_px, grid.whole_image, grid.slide_dimensions)


def read_whole_image(slide: Slide, tile_px: int) -> Image.Image:
    """The whole image with its shorter side resized to `tile_px`, centre-cropped square
    (torchvision's Resize + CenterCrop arithmetic, which CONCH's preprocessing uses)."""
    width, height = slide.dimensions
    short = min(width, height)
    size = (max(tile_px, int(tile_px * width / short)), max(tile_px, int(tile_px * height / short)))
    image = read_region(slide, 0, 0, width, height, out_size=size, level=0)
    left = int(round((size[0] - tile_px) / 2.0))
    top = int(round((size[1] - tile_px) / 2.0))
    return image.crop((left, top, left + tile_px, top + tile_px))


def read_tile(slide: Slide, spec: ReadSpec, x: int, y: int) -> Image.Image:
    """One tile: the level-0 square at (x, y) read at the grid's level, resized to `tile_px`."""
    if spec.whole_image:
        return read_whole_image(slide, spec.tile_px)
    size0, side = spec.tile_size_level0, spec.tile_px
    return read_region(slide, x, y, size0, size0, out_size=(side, side), level=spec.read_level)


def read_batch(slide: Slide, spec: ReadSpec, coords: np.ndarray, out: np.ndarray) -> None:
    """Read the tiles at `coords` into `out[:len(coords)]` (several at once where the slide
    reads over a network: `Slide.map`)."""

    def one(i: int) -> None:
        out[i] = np.asarray(read_tile(slide, spec, int(coords[i][0]), int(coords[i][1])))

    slide.map(one, range(len(coords)))


def _check_same_slide(slide: Slide, spec: ReadSpec) -> None:
    if slide.dimensions != tuple(spec.slide_dimensions):
        raise SlideError(
            f"{slide.path}: the slide is {slide.dimensions[0]}×{slide.dimensions[1]} px but the grid was "
            f"made for {spec.slide_dimensions[0]}×{spec.slide_dimensions[1]}: the file changed",
            fix="make the grid again from the current file",
        )


def _attach(name: str) -> SharedMemory:
    """Attach to the parent's shared memory without making this process its owner."""
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)
    return SharedMemory(name=name)


def _owner_alive(owner: tuple[int, float]) -> bool:
    """Whether the reading process (pid, start time) still runs; a zombie or a reused pid
    does not count."""
    pid, started = owner
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == started and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _tasks(tasks: Any, results: Any, owner: tuple[int, float]) -> Iterator[tuple[int, int, np.ndarray]]:
    """The worker's tasks until the stop sign (None), or until the reading process is gone.

    A reader killed outright (SIGKILL, the OOM killer) sends no stop sign, and with
    forkserver the workers' own parent outlives it; so an idle worker checks the reading
    process itself and leaves, rather than wait forever holding the caller's stdout open."""
    while True:
        try:
            task = tasks.get(timeout=OWNER_CHECK_S)
        except queue.Empty:
            if not _owner_alive(owner):
                results.cancel_join_thread()  # nobody will read what is still buffered
                return
            continue
        if task is None:
            return
        yield task


def _worker(
    path: str,
    mpp_override: float | None,
    spec: ReadSpec,
    shm_name: str,
    shape: tuple[int, ...],
    tasks: Any,
    results: Any,
    owner: tuple[int, float],
) -> None:
    """Worker process: open the slide once, then fill slots until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    shm = _attach(shm_name)
    slots = np.ndarray(shape, dtype=np.uint8, buffer=shm.buf)
    slide: Slide | None = None
    try:
        slide = open_slide(path, mpp_override)
        _check_same_slide(slide, spec)
        for index, slot, coords in _tasks(tasks, results, owner):
            read_batch(slide, spec, coords, slots[slot])
            results.put(("ok", index, slot))
    except SlideError as exc:
        results.put(("slide-error", exc.message, exc.fix, exc.parameter))
    except BaseException:  # a bug: hand its traceback to the parent, which raises it
        results.put(("crash", traceback.format_exc()))
    finally:
        if slide is not None:
            slide.close()
        del slots
        shm.close()


def default_readers() -> int:
    """All cores but one: the remaining core runs the process that feeds the model and
    writes to the store."""
    return max(1, (os.cpu_count() or 2) - 1)


def _default_start_method() -> str:
    """forkserver where available: forking a parent that holds CUDA or threads is unsafe,
    and spawn starts a fresh interpreter and imports numpy, Pillow and OpenSlide per worker."""
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


class TileReader:
    """Iterate a grid's tiles as `TileBatch`es, in order, read by `workers` processes.

    `workers=0` reads in this process (for debugging and tiny slides). At most
    `workers × prefetch` batches are in flight, each in its own shared-memory slot, so
    memory is bounded by `batch_size × tile_px² × 3 × workers × prefetch` bytes plus
    each worker's OpenSlide cache. Use as a context manager, or exhaust or `close()` it.

    With `copy=False` a batch's `tiles` is a view into shared memory that is reused once
    the next batch is asked for (no copy on the hot path); `start()` begins reading ahead
    of iteration; `slots` is the shared array once started (to page-lock it).

    Workers are separate processes: a script that uses the reader must guard its entry
    point with `if __name__ == "__main__":`, as multiprocessing requires. If the reading
    process is killed outright, idle workers notice within a second and exit.
    """

    def __init__(
        self,
        path: str | Path,  # a file, or a DICOMweb source string (kept a string: a Path folds its //)
        grid: TileGrid,
        batch_size: int = 32,
        workers: int = 2,
        mpp_override: float | None = None,
        prefetch: int = 2,
        start_method: str | None = None,
        copy: bool = True,
    ):
        if batch_size < 1 or workers < 0 or prefetch < 1:
            raise ValueError("batch_size and prefetch must be ≥ 1 and workers ≥ 0")
        self.path = path if isinstance(path, str) and path.lower().startswith("dicomweb+") else Path(path)
        self.grid = grid
        self.batch_size = batch_size
        self.workers = workers
        self.mpp_override = mpp_override
        self.prefetch = prefetch
        self.start_method = start_method or _default_start_method()
        self.copy = copy
        self._coords = grid.coords()
        self._procs: list[Any] = []
        self._shm: SharedMemory | None = None
        self._queues: list[Any] = []
        self._active: Iterator[TileBatch] | None = None
        self._slots: np.ndarray | None = None
        self._free: list[int] = []
        self._submitted = 0

    @property
    def slots(self) -> np.ndarray | None:
        """The shared-memory slots (n_slots, batch, side, side, 3) while workers run, else None."""
        return self._slots

    def start(self) -> None:
        """Start the workers and hand out the first batches now, before iteration asks for
        them; a no-op when reading in-process, when already started or with nothing to read."""
        if self.workers == 0 or self.batch_count == 0 or self._slots is not None:
            return
        self._slots = self._start()
        self._free = list(range(len(self._slots)))
        self._submitted = 0
        self._hand_out()

    def _hand_out(self) -> None:
        """Give every free slot the next batch: the batch waited for is then always among
        those handed out, so waiting can never deadlock."""
        tasks = self._queues[0]
        while self._free and self._submitted < self.batch_count:
            start, stop = self._batch_bounds(self._submitted)
            tasks.put((self._submitted, self._free.pop(), self._coords[start:stop]))
            self._submitted += 1

    @property
    def batch_count(self) -> int:
        return math.ceil(len(self._coords) / self.batch_size)

    def __iter__(self) -> Iterator[TileBatch]:
        if self.batch_count == 0:
            return iter(())
        if self.workers == 0:
            return self._iter_in_process()
        self._active = self._iter_workers()
        return self._active

    def _batch_bounds(self, index: int) -> tuple[int, int]:
        start = index * self.batch_size
        return start, min(start + self.batch_size, len(self._coords))

    def _buffer(self, n: int) -> np.ndarray:
        side = self.grid.tile_px
        return np.empty((n, side, side, 3), dtype=np.uint8)

    def _iter_in_process(self) -> Iterator[TileBatch]:
        spec = ReadSpec.of(self.grid)
        with open_slide(self.path, self.mpp_override) as slide:
            _check_same_slide(slide, spec)
            for index in range(self.batch_count):
                start, stop = self._batch_bounds(index)
                out = self._buffer(stop - start)
                read_batch(slide, spec, self._coords[start:stop], out)
                yield TileBatch(out, self._coords[start:stop].copy(), start)

    def _start(self) -> np.ndarray:
        """Create the shared slots and queues, start the workers; return the slots array."""
        workers = min(self.workers, self.batch_count)
        n_slots = min(self.batch_count, workers * self.prefetch)
        side = self.grid.tile_px
        shape = (n_slots, self.batch_size, side, side, 3)
        self._shm = SharedMemory(create=True, size=max(1, int(np.prod(shape))))
        ctx = mp.get_context(self.start_method)
        if self.start_method == "forkserver":
            # This module (numpy, Pillow, OpenSlide) is imported once, in the server. The main
            # module is still re-run in each worker (CPython 3.10–3.12 give the server no main
            # path to preload), so a script's top-level imports are paid per worker: keep them light.
            ctx.set_forkserver_preload(["__main__", __name__])
        tasks, results = ctx.Queue(), ctx.Queue()
        self._queues = [tasks, results]
        owner = (os.getpid(), psutil.Process().create_time())
        spec = ReadSpec.of(self.grid)
        args = (str(self.path), self.mpp_override, spec, self._shm.name, shape, tasks, results, owner)
        for _ in range(workers):
            proc = ctx.Process(target=_worker, args=args, daemon=True, name="conchdb-tile-reader")
            proc.start()
            self._procs.append(proc)
        return np.ndarray(shape, dtype=np.uint8, buffer=self._shm.buf)

    def _receive(self) -> tuple[Any, ...]:
        """The next worker message; a dead worker or a worker's error becomes an exception."""
        results = self._queues[1]
        while True:
            try:
                message = results.get(timeout=POLL_S)
            except queue.Empty:
                codes = [p.exitcode for p in self._procs]
                failed = [c for c in codes if c not in (None, 0)]
                if failed or None not in codes:  # a crash, or every worker gone with work left
                    raise SlideError(
                        f"{self.path}: a tile reader process died (exit code {(failed or codes)[0]}) "
                        "while decoding this slide",
                        fix=DAMAGED_HINT,
                    ) from None
                continue
            if message[0] == "slide-error":
                raise SlideError(message[1], fix=message[2], parameter=message[3])
            if message[0] == "crash":
                raise RuntimeError(f"tile reader worker failed on {self.path}:\n{message[1]}")
            return message

    def _iter_workers(self) -> Iterator[TileBatch]:
        try:
            self.start()
            assert self._slots is not None
            ready: dict[int, int] = {}
            for index in range(self.batch_count):
                self._hand_out()
                while index not in ready:
                    _, done, slot = self._receive()
                    ready[done] = slot
                slot = ready.pop(index)
                start, stop = self._batch_bounds(index)
                tiles = self._slots[slot, : stop - start]
                if self.copy:
                    tiles = tiles.copy()
                    self._free.append(slot)
                yield TileBatch(tiles, self._coords[start:stop].copy(), start)
                if not self.copy:  # the consumer is done with the view once it asks again
                    self._free.append(slot)
                del tiles
        finally:
            self._slots = None  # release the view before the shared memory is closed
            self._shutdown()

    def close(self) -> None:
        """Stop the workers and free the shared memory; safe to call more than once."""
        active, self._active = self._active, None
        if active is not None:
            active.close()  # runs the generator's cleanup, which calls _shutdown
        self._shutdown()

    def _shutdown(self) -> None:
        self._slots = None  # a view into the shared memory would keep it from closing
        procs, self._procs = self._procs, []
        if procs:
            tasks = self._queues[0]
            for _ in procs:
                tasks.put(None)
            for proc in procs:
                proc.join(timeout=2.0)
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
                    proc.join(timeout=2.0)
        for q in self._queues:
            q.close()
            q.cancel_join_thread()
        self._queues = []
        if self._shm is not None:
            shm, self._shm = self._shm, None
            shm.close()
            shm.unlink()

    def __enter__(self) -> TileReader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
