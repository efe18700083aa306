"""Tile reading throughput: the TileReader with 1 and 2 workers beside a naive loop.

Writes a synthetic pyramidal 40× slide (0.25 µm/px, levels ×1, ×4, ×16, JPEG 256 px tiles
at quality 90 with 2×2 chroma subsampling, as scanners write them) whose pixels are real
H&E tissue: `cmu_small_region.svs` upsampled 2× and repeated. Then, in this one run, every
tile of its tissue grid (512 px at 0.5 µm/px) is delivered as uint8 batches three ways:

- naive: one process, `read_region` at level 0 for each tile, resized with PIL (Lanczos);
- TileReader with 1 worker and with 2 workers (batches of 32, the default prefetch).

Each figure includes its own start-up (opening the slide, starting workers). CPU time per tile
and peak memory count this process and its workers together, sampled every 0.1 s; CPU per
tile does not depend on what else the machine runs, tiles/s does (the load is printed).

    python benchmarks/tiling.py [--size 30000] [--source cmu_small_region.svs] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import openslide
import psutil
from PIL import Image

from conchdb.slides.pyramid import LevelSource, write_pyramid_tiff
from conchdb.slides.reader import TileReader
from conchdb.slides.region import TILE_FILTER
from conchdb.slides.slide import open_slide

if TYPE_CHECKING:
    from conchdb.slides.grid import TileGrid

# Worker processes re-import this script (multiprocessing does so for the main module, even
# under forkserver), so the tissue code (scikit-image) is imported inside main(), as the
# conchdb command imports its commands' code lazily.

MPP = 0.25
DOWNSAMPLES = (1, 4, 16)
TEXTURE = (4096, 5632)  # level-0 texture repeated over the slide; divisible by 16 × 256
TARGET_SPEEDUP = 1.8


def default_source() -> Path:
    assets = os.environ.get("CONCHDB_TEST_ASSETS") or str(Path(__file__).resolve().parents[2] / "shared")
    return Path(assets) / "fixtures" / "slides" / "cmu_small_region.svs"


def tissue_texture(source: Path) -> np.ndarray:
    """The source region upsampled 2× (0.499 -> 0.2495 µm/px) and cropped to TEXTURE."""
    with open_slide(source) as slide:
        region = slide.read_region((0, 0), 0, slide.dimensions)
    up = region.resize((region.width * 2, region.height * 2), Image.Resampling.LANCZOS)
    return np.asarray(up)[: TEXTURE[1], : TEXTURE[0]]


def repeated_level(texture: np.ndarray, width: int, height: int, tile: int) -> LevelSource:
    """A level of `width` × `height` that repeats `texture`, served tile by tile."""
    tex_h, tex_w = texture.shape[:2]

    def block(row: int, col: int) -> np.ndarray:
        rows = (np.arange(tile) + row * tile) % tex_h
        cols = (np.arange(tile) + col * tile) % tex_w
        return texture[np.ix_(rows, cols)]

    return LevelSource(width, height, block)


def write_slide(path: Path, size: int, source: Path) -> None:
    texture = tissue_texture(source)
    levels = []
    for d in DOWNSAMPLES:
        small = texture if d == 1 else np.asarray(
            Image.fromarray(texture).resize((TEXTURE[0] // d, TEXTURE[1] // d), Image.Resampling.LANCZOS)
        )
        levels.append(repeated_level(small, -(-size // d), -(-size // d), 256))
    write_pyramid_tiff(path, levels, mpp=MPP, tile=256, quality=90, subsampling=(2, 2))


class ProcessTreeMonitor:
    """Peak resident memory and CPU time of this process and its children (workers
    included), sampled in a thread every `interval` seconds."""

    def __init__(self, interval: float = 0.1):
        self.interval = interval
        self.peak_rss = 0
        self._cpu: dict[int, float] = {}
        self._cpu_start: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        rss = 0
        for proc in [me, *me.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # it may exit meanwhile
                rss += proc.memory_info().rss
                times = proc.cpu_times()
                self._cpu[proc.pid] = times.user + times.system
        self.peak_rss = max(self.peak_rss, rss)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.interval)

    @property
    def cpu_seconds(self) -> float:
        return sum(cpu - self._cpu_start.get(pid, 0.0) for pid, cpu in self._cpu.items())

    def __enter__(self) -> ProcessTreeMonitor:
        self._sample()
        self._cpu_start = dict(self._cpu)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def naive(path: Path, grid: TileGrid, batch_size: int = 32) -> int:
    """The loop most tools run: read_region at level 0, convert, resize with PIL, batch."""
    slide = openslide.OpenSlide(str(path))
    side, size0, count = grid.tile_px, grid.tile_size_level0, 0
    batch = np.empty((batch_size, side, side, 3), dtype=np.uint8)
    for i, tile in enumerate(grid.tiles):
        region = slide.read_region((tile.x, tile.y), 0, (size0, size0)).convert("RGB")
        batch[i % batch_size] = np.asarray(region.resize((side, side), TILE_FILTER))
        count += 1
    slide.close()
    return count


def reader(path: Path, grid: TileGrid, workers: int) -> int:
    with TileReader(path, grid, batch_size=32, workers=workers) as tiles:
        return sum(len(batch) for batch in tiles)


@dataclass(frozen=True)
class Measure:
    tiles_per_s: float
    cpu_ms_per_tile: float
    peak_rss_mb: float


def measure(fn: Callable[[], int]) -> Measure:
    """Throughput, CPU time per tile (all processes) and peak memory of one call."""
    with ProcessTreeMonitor() as monitor:
        start = time.perf_counter()
        count = fn()
        elapsed = time.perf_counter() - start
    return Measure(count / elapsed, 1e3 * monitor.cpu_seconds / count, monitor.peak_rss / 2**20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=30000, help="slide side in level-0 pixels (default 30000)")
    parser.add_argument("--source", type=Path, default=None, help="slide whose tissue fills the synthetic one")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    from conchdb.slides.grid import plan_tiles

    source = args.source or default_source()
    if not source.is_file():
        sys.exit(f"tissue source not found: {source}; pass --source or set CONCHDB_TEST_ASSETS")
    log = (lambda *a: None) if args.json else print

    with tempfile.TemporaryDirectory(prefix="conchdb-bench-") as tmp:
        path = Path(tmp) / "synthetic_40x.tif"
        start = time.perf_counter()
        write_slide(path, args.size, source)
        log(
            f"slide: {args.size}×{args.size} px at {MPP} µm/px (40×), levels ×{', ×'.join(map(str, DOWNSAMPLES))}, "
            f"JPEG q90 256 px tiles of real H&E, {path.stat().st_size / 2**20:.0f} MB, "
            f"written in {time.perf_counter() - start:.1f} s"
        )
        with open_slide(path) as slide:
            _, grid = plan_tiles(slide)
        if not grid.tiles:
            sys.exit(f"no tissue tiles on a {args.size} px slide; use a larger --size")
        log(
            f"grid: {len(grid)} tissue tiles of {grid.tile_px} px at {grid.target_mpp} µm/px "
            f"({grid.tile_size_level0} level-0 px, read at level {grid.read_level}); {os.cpu_count()} CPUs"
        )
        load_before = os.getloadavg()[0]
        naive_run = measure(lambda: naive(path, grid))
        runs = {w: measure(lambda w=w: reader(path, grid, w)) for w in (1, 2)}

    naive_rate = naive_run.tiles_per_s
    rates = {w: run.tiles_per_s for w, run in runs.items()}
    speedup = rates[2] / naive_rate
    reader_peak = max(run.peak_rss_mb for run in runs.values())
    if args.json:
        print(json.dumps({
            "reader_tiles_per_s": {"1": round(rates[1], 2), "2": round(rates[2], 2)},
            "naive_tiles_per_s": round(naive_rate, 2),
            "speedup_2_workers": round(speedup, 3),
            "peak_rss_mb": round(reader_peak, 1),
        }))
        return
    print(f"\n{'method':<24} {'tiles/s':>9} {'vs naive':>9} {'CPU ms/tile':>12} {'peak RSS MB':>12}")
    rows = {"naive loop, 1 process": naive_run, "TileReader, 1 worker": runs[1], "TileReader, 2 workers": runs[2]}
    for name, m in rows.items():
        print(f"{name:<24} {m.tiles_per_s:>9.1f} {m.tiles_per_s / naive_rate:>8.2f}× "
              f"{m.cpu_ms_per_tile:>12.1f} {m.peak_rss_mb:>12.0f}")
    verdict = "met" if speedup >= TARGET_SPEEDUP else "NOT met"
    print(f"\ntarget ≥ {TARGET_SPEEDUP}× the naive loop with 2 workers: {speedup:.2f}× ({verdict}); "
          f"load average before/after: {load_before:.2f} / {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
