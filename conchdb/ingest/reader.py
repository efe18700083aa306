"""Turn a tile grid into batches of uint8 pixels, in grid order, from worker processes.

Decoding JPEG tiles and resizing them is CPU work that one Python process cannot spread
over cores, so each worker process opens the slide once and reads whole batches. Workers
write pixels straight into a fixed set of shared-memory slots and say only "batch k is in
slot s", so no pixel is pickled, and because a batch is handed out only when a slot is
free, memory is bounded by the slot count, whatever the slide's size. Batches may finish
out of order; the reader yields them in grid order.

A region that cannot be decoded ends the slide with a `SlideError` naming the file and
the region; the reader then stops its workers, frees the shared memory and re-raises,
so the caller can go on with the next slide. Ctrl-C is handled by the parent alone
(workers ignore SIGINT) and leads to the same orderly shutdown.
"""

from __future__ import annotations

import math
import multiprocessing as mp
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
from PIL import Image

from conchdb.errors import SlideError
from conchdb.ingest.slide import DAMAGED_HINT, Slide, open_slide

if TYPE_CHECKING:  # workers import this module: keep the tissue code (scikit-image) out of them
    from conchdb.ingest.grid import TileGrid

TILE_FILTER = Image.Resampling.LANCZOS
"""Resampling filter from the read level to the tile side: antialiased and sharp."""

WHOLE_IMAGE_FILTER = Image.Resampling.BICUBIC
"""Whole images are resized as CONCH's evaluation resizes ROIs (shorter side, bicubic)."""

POLL_S = 0.5
"""How often the parent checks that its workers are alive while waiting for a batch."""


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
class _ReadSpec:
    """What a worker needs to read tiles: the grid without its (possibly long) tile list."""

    read_level: int
    read_size: int
    tile_px: int
    whole_image: bool
    slide_dimensions: tuple[int, int]

    @classmethod
    def of(cls, grid: TileGrid) -> _ReadSpec:
        return cls(grid.read_level, grid.read_size, grid.tile_px, grid.whole_image, grid.slide_dimensions)


def read_whole_image(slide: Slide, tile_px: int) -> Image.Image:
    """The whole image with its shorter side resized to `tile_px`, centre-cropped square
    (torchvision's Resize + CenterCrop arithmetic, which CONCH's preprocessing uses)."""
    width, height = slide.dimensions
    image = slide.read_region((0, 0), 0, (width, height))
    if width <= height:
        size = (tile_px, int(tile_px * height / width))
    else:
        size = (int(tile_px * width / height), tile_px)
    image = image.resize(size, WHOLE_IMAGE_FILTER)
    left = int(round((size[0] - tile_px) / 2.0))
    top = int(round((size[1] - tile_px) / 2.0))
    return image.crop((left, top, left + tile_px, top + tile_px))


def read_tile(slide: Slide, spec: _ReadSpec, x: int, y: int) -> Image.Image:
    """One tile: the level-0 square at (x, y) read at the grid's level, resized to `tile_px`."""
    if spec.whole_image:
        return read_whole_image(slide, spec.tile_px)
    region = slide.read_region((x, y), spec.read_level, (spec.read_size, spec.read_size))
    if region.size != (spec.tile_px, spec.tile_px):
        region = region.resize((spec.tile_px, spec.tile_px), TILE_FILTER)
    return region


def read_batch(slide: Slide, spec: _ReadSpec, coords: np.ndarray, out: np.ndarray) -> None:
    """Read the tiles at `coords` into `out[:len(coords)]`."""
    for i, (x, y) in enumerate(coords):
        out[i] = np.asarray(read_tile(slide, spec, int(x), int(y)))


def _check_same_slide(slide: Slide, spec: _ReadSpec) -> None:
    if slide.dimensions != tuple(spec.slide_dimensions):
        raise SlideError(
            f"{slide.path}: the slide is {slide.dimensions[0]}×{slide.dimensions[1]} px but the grid was "
            f"made for {spec.slide_dimensions[0]}×{spec.slide_dimensions[1]}: the file changed",
            hint="make the grid again from the current file",
        )


def _attach(name: str) -> SharedMemory:
    """Attach to the parent's shared memory without making this process its owner."""
    if sys.version_info >= (3, 13):
        return SharedMemory(name=name, track=False)
    return SharedMemory(name=name)


def _worker(
    path: str,
    mpp_override: float | None,
    spec: _ReadSpec,
    shm_name: str,
    shape: tuple[int, ...],
    tasks: Any,
    results: Any,
) -> None:
    """Worker process: open the slide once, then fill slots until told to stop (None)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    shm = _attach(shm_name)
    slots = np.ndarray(shape, dtype=np.uint8, buffer=shm.buf)
    slide: Slide | None = None
    try:
        slide = open_slide(path, mpp_override)
        _check_same_slide(slide, spec)
        while (task := tasks.get()) is not None:
            index, slot, coords = task
            read_batch(slide, spec, coords, slots[slot])
            results.put(("ok", index, slot))
    except SlideError as exc:
        results.put(("slide-error", exc.message, exc.hint))
    except BaseException:  # a bug: hand its traceback to the parent, which raises it
        results.put(("crash", traceback.format_exc()))
    finally:
        if slide is not None:
            slide.close()
        del slots
        shm.close()


def _default_start_method() -> str:
    """forkserver where available: forking a parent that holds CUDA or threads is unsafe,
    and spawn re-imports everything for every worker."""
    return "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"


class TileReader:
    """Iterate a grid's tiles as `TileBatch`es, in order, read by `workers` processes.

    `workers=0` reads in this process (for debugging and tiny slides). At most
    `workers × prefetch` batches are in flight, each in its own shared-memory slot, so
    memory is bounded by `batch_size × tile_px² × 3 × workers × prefetch` bytes plus
    each worker's OpenSlide cache. Use as a context manager, or exhaust or `close()` it.
    """

    def __init__(
        self,
        path: str | Path,
        grid: TileGrid,
        batch_size: int = 32,
        workers: int = 2,
        mpp_override: float | None = None,
        prefetch: int = 2,
        start_method: str | None = None,
    ):
        if batch_size < 1 or workers < 0 or prefetch < 1:
            raise ValueError("batch_size and prefetch must be ≥ 1 and workers ≥ 0")
        self.path = Path(path)
        self.grid = grid
        self.batch_size = batch_size
        self.workers = workers
        self.mpp_override = mpp_override
        self.prefetch = prefetch
        self.start_method = start_method or _default_start_method()
        self._coords = grid.coords()
        self._procs: list[Any] = []
        self._shm: SharedMemory | None = None
        self._queues: list[Any] = []
        self._active: Iterator[TileBatch] | None = None

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
        spec = _ReadSpec.of(self.grid)
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
            # Import the main module and this one once, in the server, not in every worker.
            ctx.set_forkserver_preload(["__main__", __name__])
        tasks, results = ctx.Queue(), ctx.Queue()
        self._queues = [tasks, results]
        args = (str(self.path), self.mpp_override, _ReadSpec.of(self.grid), self._shm.name, shape, tasks, results)
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
                dead = [p for p in self._procs if p.exitcode not in (None, 0)]
                if dead:
                    raise SlideError(
                        f"{self.path}: a tile reader process died (exit code {dead[0].exitcode}) "
                        "while decoding this slide",
                        hint=DAMAGED_HINT,
                    ) from None
                continue
            if message[0] == "slide-error":
                raise SlideError(message[1], hint=message[2])
            if message[0] == "crash":
                raise RuntimeError(f"tile reader worker failed on {self.path}:\n{message[1]}")
            return message

    def _iter_workers(self) -> Iterator[TileBatch]:
        slots = None
        try:
            slots = self._start()
            tasks = self._queues[0]
            free = list(range(len(slots)))
            ready: dict[int, int] = {}
            submitted = 0
            for index in range(self.batch_count):
                # Hand out batches in order while slots are free: the batch we wait for is
                # always among those handed out, so waiting can never deadlock.
                while free and submitted < self.batch_count:
                    start, stop = self._batch_bounds(submitted)
                    tasks.put((submitted, free.pop(), self._coords[start:stop]))
                    submitted += 1
                while index not in ready:
                    _, done, slot = self._receive()
                    ready[done] = slot
                slot = ready.pop(index)
                start, stop = self._batch_bounds(index)
                tiles = slots[slot, : stop - start].copy()
                free.append(slot)
                yield TileBatch(tiles, self._coords[start:stop].copy(), start)
        finally:
            slots = None  # release the view before the shared memory is closed
            self._shutdown()

    def close(self) -> None:
        """Stop the workers and free the shared memory; safe to call more than once."""
        active, self._active = self._active, None
        if active is not None:
            active.close()  # runs the generator's cleanup, which calls _shutdown
        self._shutdown()

    def _shutdown(self) -> None:
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
