"""Write a tiled, JPEG-compressed pyramidal TIFF that OpenSlide opens as a generic TIFF.

Tests and benchmarks need slides of known pixel size and pyramid shape (and a plain
image too large for Pillow can be converted this way). OpenSlide's generic-TIFF reader
takes every tiled page as a level when the reduced ones are marked as such
(`subfiletype=1`), and reads the pixel size from level 0's resolution tags in cm.
Levels are written tile by tile from arrays or from a function, so a slide larger than
memory can be produced.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile


@dataclass(frozen=True)
class LevelSource:
    """A level of `width` × `height` pixels given tile by tile: `tile(row, col)` returns the
    (tile, tile, 3) uint8 block whose top-left is (col·tile, row·tile); what lies beyond
    the level's edge is ignored by readers."""

    width: int
    height: int
    tile: Callable[[int, int], np.ndarray]


def _tiles(source: LevelSource, tile: int) -> Iterator[np.ndarray]:
    for row in range(-(-source.height // tile)):
        for col in range(-(-source.width // tile)):
            yield source.tile(row, col)


def write_pyramid_tiff(
    path: str | Path,
    levels: Sequence[np.ndarray | LevelSource],
    mpp: float | None,
    tile: int = 256,
    quality: int = 90,
    subsampling: tuple[int, int] = (2, 2),
) -> Path:
    """Write `levels` (finest first, (H, W, 3) uint8 arrays or `LevelSource`s) as one TIFF.

    `mpp` (µm per level-0 pixel) goes into each level's resolution tags, scaled by the
    level's downsample; None writes no physical unit (a file without a pixel size).
    `quality` and chroma `subsampling` are the JPEG settings (scanners use about 70–90, 2×2).
    """
    path = Path(path)
    width0 = levels[0].shape[1] if isinstance(levels[0], np.ndarray) else levels[0].width
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for index, level in enumerate(levels):
            if isinstance(level, np.ndarray):
                data, (height, width) = level, level.shape[:2]
            else:
                data, height, width = _tiles(level, tile), level.height, level.width
            options = {}
            if mpp is not None:
                per_cm = 1e4 / (mpp * width0 / width)
                options = {"resolution": (per_cm, per_cm), "resolutionunit": "CENTIMETER"}
            tif.write(
                data,
                shape=(height, width, 3),
                dtype=np.uint8,
                tile=(tile, tile),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": quality},
                subsampling=subsampling,
                subfiletype=1 if index else 0,
                **options,
            )
    return path
