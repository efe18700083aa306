"""The TileReader: every tile once and in order, bounded memory, and clean failure."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from multiprocessing.shared_memory import SharedMemory
from pathlib import Path

import numpy as np
import psutil
import pytest

from conchdb.errors import SlideError
from conchdb.slides.grid import Tile, TileGrid, TilingParams, make_grid
from conchdb.slides.reader import TileReader
from conchdb.slides.slide import open_slide

from .conftest import write_repeated_tile_slide

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def slots(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the shared memory blocks readers create during the test."""
    created: list[str] = []

    def record(*args, **kwargs) -> SharedMemory:
        shm = SharedMemory(*args, **kwargs)
        if kwargs.get("create"):
            created.append(shm.name)
        return shm

    monkeypatch.setattr("conchdb.slides.reader.SharedMemory", record)
    return created


def _alive(names: list[str]) -> list[str]:
    return [n for n in names if os.path.exists(f"/dev/shm/{n.lstrip('/')}")]


@pytest.fixture(scope="module")
def small_tiles(cmu: Path, cmu_plan) -> TileGrid:
    """Every 128 px square of the CMU slide: 17 × 23 = 391 tiles."""
    mask, _ = cmu_plan
    with open_slide(cmu) as slide:
        return make_grid(slide, mask, tile_px=128, min_tissue=0.0)


@pytest.fixture(scope="module")
def in_process(cmu: Path, small_tiles: TileGrid) -> np.ndarray:
    return np.concatenate([b.tiles for b in TileReader(cmu, small_tiles, batch_size=7, workers=0)])


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_every_tile_once_in_order(cmu: Path, small_tiles: TileGrid, in_process: np.ndarray, workers: int):
    assert len(small_tiles) == 391 and in_process.shape == (391, 128, 128, 3)
    with TileReader(cmu, small_tiles, batch_size=7, workers=workers) as reader:
        batches = list(reader)
    assert [b.start for b in batches] == list(range(0, 391, 7))
    np.testing.assert_array_equal(np.concatenate([b.coords for b in batches]), small_tiles.coords())
    np.testing.assert_array_equal(np.concatenate([b.tiles for b in batches]), in_process)


def test_tiles_are_the_slide_pixels(cmu: Path, small_tiles: TileGrid, in_process: np.ndarray, cmu_pixels):
    """At 0.5 µm/px on a 0.499 µm/px slide a 128 px tile is the 128 px square, unresized."""
    for i in (0, 200, 390):
        tile = small_tiles.tiles[i]
        np.testing.assert_array_equal(in_process[i], cmu_pixels[tile.y : tile.y + 128, tile.x : tile.x + 128])


def _unreadable_grid() -> TileGrid:
    return TileGrid(
        tiles=(Tile(0, 0, 16, 1.0),), params=TilingParams(tile_px=16), slide_dimensions=(16, 16), mpp=0.499,
        tile_size_level0=16, stride_level0=16, read_level=0, read_size=16,
    )


@pytest.mark.parametrize("workers", [0, 2])
def test_unreadable_region_fails_the_slide_cleanly(slides_dir: Path, cmu: Path, small_tiles, workers: int, slots):
    path = slides_dir / "unreadable.svs"
    reader = TileReader(path, _unreadable_grid(), workers=workers)
    with pytest.raises(SlideError) as caught:
        list(reader)
    assert str(path) in caught.value.message and "Bogus marker length" in caught.value.message
    assert not reader._procs and len(slots) == (workers > 0) and not _alive(slots)
    # the process goes on with the next slide
    assert sum(len(b) for b in TileReader(cmu, small_tiles, batch_size=64, workers=workers)) == 391


def test_a_changed_file_is_noticed(cmu: Path, small_tiles: TileGrid):
    stale = replace(small_tiles, slide_dimensions=(2220, 3000))
    with pytest.raises(SlideError, match="the file changed"):
        list(TileReader(cmu, stale, workers=1))


def test_leaving_early_stops_workers_and_frees_memory(cmu: Path, small_tiles: TileGrid, slots):
    with TileReader(cmu, small_tiles, batch_size=8, workers=2) as reader:
        first = next(iter(reader))
        procs = list(reader._procs)
        assert len(first) == 8 and procs and _alive(slots) == slots
    assert not any(p.is_alive() for p in procs) and not _alive(slots)


def test_a_dead_worker_fails_the_slide(cmu: Path, small_tiles: TileGrid):
    with TileReader(cmu, small_tiles, batch_size=8, workers=2, prefetch=1) as reader:
        batches = iter(reader)
        next(batches)
        for proc in reader._procs:
            proc.kill()
        with pytest.raises(SlideError, match="process died"):
            list(batches)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "killed"])
def test_interrupted_or_killed_reader_leaves_nothing_behind(cmu: Path, tmp_path: Path, sig: int):
    """Ctrl-C: the reader stops its workers and frees its memory. Killed outright: the
    workers notice and exit (they would otherwise hold the caller's stdout open forever)."""
    script = tmp_path / "read.py"
    script.write_text(textwrap.dedent(f"""
        import signal
        import time
        from conchdb.slides.grid import plan_tiles, make_grid
        from conchdb.slides.reader import TileReader
        from conchdb.slides.slide import open_slide

        if __name__ == "__main__":
            # Ctrl-C as in a terminal, also when this run was started in the background, where
            # the shell ignores SIGINT and every process it starts inherits that.
            signal.signal(signal.SIGINT, signal.default_int_handler)
            with open_slide({str(cmu)!r}) as slide:
                mask, _ = plan_tiles(slide)
                grid = make_grid(slide, mask, tile_px=128, min_tissue=0.0)
            reader = TileReader({str(cmu)!r}, grid, batch_size=4, workers=2)
            for i, batch in enumerate(reader):
                if i == 0:
                    print("pids", reader._shm.name, *[p.pid for p in reader._procs], flush=True)
                time.sleep(0.2)
    """))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)
    line = proc.stdout.readline()
    assert line.startswith("pids"), proc.stderr.read()
    shm_name, *pids = line.split()[1:]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)  # returns once every holder of stdout has exited
    assert proc.returncode == -sig
    if sig == signal.SIGINT:
        assert "KeyboardInterrupt" in err and not _alive([shm_name])
    for pid in map(int, pids):
        with contextlib.suppress(psutil.NoSuchProcess):
            assert psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, "a worker outlived its reader"


def _tree_rss() -> int:
    me = psutil.Process()
    total = 0
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):  # it may exit meanwhile
            total += proc.memory_info().rss
    return total


def test_memory_is_bounded_on_a_large_slide(tmp_path: Path):
    """A 32768² slide (3.2 GB decoded): reading tiles from all over it keeps the reader's
    memory at its slots and caches, and it does not grow while reading."""
    path = write_repeated_tile_slide(tmp_path / "large.tif", 32768, mpp=0.5)
    with open_slide(path) as slide:
        assert slide.dimensions == (32768, 32768)
    every = [Tile(x, y, 512, 1.0) for y in range(0, 32768, 512) for x in range(0, 32768, 512)]
    grid = TileGrid(
        tiles=tuple(every[::20]), params=TilingParams(), slide_dimensions=(32768, 32768), mpp=0.5,
        tile_size_level0=512, stride_level0=512, read_level=0, read_size=512,
    )
    baseline = _tree_rss()
    samples: list[int] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(_tree_rss())
            time.sleep(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    read = 0
    try:
        with TileReader(path, grid, batch_size=8, workers=2) as reader:
            for batch in reader:
                read += len(batch)
    finally:
        stop.set()
        sampler.join()
    assert read == len(grid) == 205
    growth_mb = (max(samples) - baseline) / 2**20
    assert growth_mb < 400, f"reader used {growth_mb:.0f} MB for a 3.2 GB slide"
    half = len(samples) // 2
    assert max(samples[half:]) < max(samples[:half]) + 32 * 2**20, "memory grew while reading"


def test_views_and_reading_ahead_give_the_same_tiles(cmu: Path, small_tiles: TileGrid, in_process: np.ndarray, slots):
    """`copy=False` hands out views into the shared slots (copied here before the next is asked
    for), `start()` reads before iteration; the tiles are the same, and closing frees the slots."""
    reader = TileReader(cmu, small_tiles, batch_size=7, workers=2, copy=False)
    reader.start()
    assert reader.slots is not None and reader._procs
    time.sleep(0.5)  # the workers fill their slots before anyone asks
    with reader:
        got = []
        for batch in reader:
            assert np.shares_memory(batch.tiles, reader.slots)
            got.append(batch.tiles.copy())
    np.testing.assert_array_equal(np.concatenate(got), in_process)
    assert reader.slots is None and not _alive(slots)


def test_started_but_never_read_is_closed_cleanly(cmu: Path, small_tiles: TileGrid, slots):
    reader = TileReader(cmu, small_tiles, batch_size=7, workers=2, copy=False)
    reader.start()
    procs = list(reader._procs)
    reader.close()
    assert not any(p.is_alive() for p in procs) and not _alive(slots)
