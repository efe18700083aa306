"""Ingest fixtures: the real CMU slide, its tiling plan, and slides the tests write."""

from __future__ import annotations

import io
import itertools
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from conchdb.slides.grid import TileGrid, plan_tiles
from conchdb.slides.pyramid import write_pyramid_tiff
from conchdb.slides.slide import open_slide
from conchdb.slides.tissue import TissueMask

CMU_MPP = 0.499


@pytest.fixture(scope="session")
def cmu(slides_dir: Path) -> Path:
    return slides_dir / "cmu_small_region.svs"


@pytest.fixture(scope="session")
def cmu_plan(cmu: Path) -> tuple[TissueMask, TileGrid]:
    """Tissue mask and default grid (512 px at 0.5 µm/px) of the CMU slide."""
    with open_slide(cmu) as slide:
        return plan_tiles(slide)


@pytest.fixture(scope="session")
def cmu_pixels(cmu: Path) -> np.ndarray:
    with open_slide(cmu) as slide:
        return np.asarray(slide.read_region((0, 0), 0, slide.dimensions))


@pytest.fixture(scope="session")
def upsampled_cmu(cmu_pixels: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CMU region upsampled 2× (0.2495 µm/px) as a pyramidal TIFF whose level 1 holds the
    original pixels (0.499 µm/px)."""
    height, width = cmu_pixels.shape[:2]
    up = np.asarray(Image.fromarray(cmu_pixels).resize((width * 2, height * 2), Image.Resampling.LANCZOS))
    path = tmp_path_factory.mktemp("pyramid") / "cmu_2x.tif"
    return write_pyramid_tiff(path, [up, cmu_pixels], mpp=CMU_MPP / 2, quality=95, subsampling=(1, 1))


def write_image(path: Path, rgb: np.ndarray, mpp: float | None = None) -> Path:
    """A plain PNG, with a pixel size in its pHYs chunk when `mpp` is given."""
    image = Image.fromarray(rgb)
    if mpp is None:
        image.save(path)
    else:
        image.save(path, dpi=(25400 / mpp, 25400 / mpp))
    return path


def tissue_blob(size: int = 400, radius: int = 120, seed: int = 0) -> np.ndarray:
    """Glass (near white, with sensor noise) and one pink disc of tissue in the middle."""
    rng = np.random.default_rng(seed)
    rgb = np.full((size, size, 3), 242, dtype=np.float32) + rng.normal(0, 2, (size, size, 3))
    yy, xx = np.mgrid[:size, :size]
    disc = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < radius**2
    rgb[disc] = np.array([215, 120, 170]) + rng.normal(0, 8, (int(disc.sum()), 3))
    return rgb.clip(0, 255).astype(np.uint8)


def write_repeated_tile_slide(path: Path, side: int, mpp: float, tile: int = 512) -> Path:
    """A `side` × `side` one-level JPEG TIFF made of one encoded tile repeated: gigapixels
    written in a fraction of a second, still decoded tile by tile by OpenSlide."""
    yy, xx = np.mgrid[:tile, :tile]
    block = np.stack([200 + 40 * np.sin(xx / 40), 120 + 60 * np.cos(yy / 30), 170 + 50 * np.sin((xx + yy) / 50)], -1)
    buffer = io.BytesIO()
    options = {"tile": (tile, tile), "compression": "jpeg", "compressionargs": {"level": 60}, "photometric": "rgb"}
    tifffile.imwrite(buffer, block.clip(0, 255).astype(np.uint8), **options)
    buffer.seek(0)
    with tifffile.TiffFile(buffer) as tif:
        page = tif.pages[0]
        encoded = buffer.getvalue()[page.dataoffsets[0] : page.dataoffsets[0] + page.databytecounts[0]]
    count = (-(-side // tile)) ** 2
    tifffile.imwrite(
        path, itertools.repeat(encoded, count), shape=(side, side, 3), dtype=np.uint8, bigtiff=True,
        resolution=(1e4 / mpp, 1e4 / mpp), resolutionunit="CENTIMETER", **options,
    )
    return path
