"""The GPU-decoding tile source: a slide's JPEG tile bytes read here, decoded on the model's device.

It has the reader's interface (`start`, `close`, iteration over batches with `.tiles` and
`.start`, `slots`), but its batches are already on the device, so the feed skips the copy.
`open_jpeg_source` returns None wherever it does not apply (not tiled JPEG, a whole-image
grid, tiles reaching past the level's edge, colours that do not check out): the pipeline
then uses the CPU `TileReader`, which stays the path for every other compression.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import numpy as np
import torch

from conchdb.errors import SlideError
from conchdb.model.jpeg import cut_tiles, decode_streams
from conchdb.slides.grid import TileGrid
from conchdb.slides.jpeg import CHECK_TOLERANCE, JpegLevel
from conchdb.slides.slide import DAMAGED_HINT, Slide, open_slide


@dataclass(frozen=True)
class DeviceBatch:
    """Consecutive grid tiles, decoded: `tiles` (N, side, side, 3) uint8 on the device."""

    tiles: torch.Tensor
    start: int

    def __len__(self) -> int:
        return len(self.tiles)


class JpegTileSource:
    """A grid's tiles in batches, decoded from the slide's JPEG tiles on `device`."""

    slots = None  # nothing to page-lock: the bytes go to the device decoder directly

    def __init__(self, level: JpegLevel, grid: TileGrid, batch_size: int, device: torch.device):
        self.level, self.grid, self.batch_size, self.device = level, grid, batch_size, device
        self._coords = grid.coords()

    @property
    def path(self) -> Path:
        return self.level.path

    def start(self) -> None:
        """Nothing to start ahead: reading bytes and launching the decoder is quick."""

    def __iter__(self) -> Iterator[DeviceBatch]:
        for first in range(0, len(self._coords), self.batch_size):
            coords = self._coords[first : first + self.batch_size]
            regions = [self.level.region(int(x), int(y), self.grid.tile_size_level0) for x, y in coords]
            needed = sorted({i for r in regions for i in r.indices})
            try:
                decoded = dict(zip(needed, decode_streams([self.level.stream(i) for i in needed], self.device),
                                   strict=True))
            except RuntimeError as exc:
                raise SlideError(f"{self.path}: a JPEG tile near level-0 ({coords[0][0]}, {coords[0][1]}) "
                                 f"cannot be decoded ({exc})", fix=DAMAGED_HINT) from exc
            tiles = cut_tiles(regions, decoded, self.level.tile_w, self.level.tile_h, self.grid.tile_px, self.device)
            yield DeviceBatch(tiles, first)

    @property
    def batch_count(self) -> int:
        return math.ceil(len(self._coords) / self.batch_size)

    def close(self) -> None:
        self.level.close()

    def __enter__(self) -> JpegTileSource:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


def _device_decodes_like(level: JpegLevel, slide: Slide, index: int, device: torch.device) -> bool:
    """The device's decoder gives OpenSlide's colours on the level's first tile (decoders differ
    in how they read colour-space markers, so the CPU check alone is not enough)."""
    w, h = min(level.tile_w, level.width), min(level.tile_h, level.height)
    try:
        decoded = decode_streams([level.stream(0)], device)[0][:, :h, :w].permute(1, 2, 0).float().cpu().numpy()
    except RuntimeError:
        return False
    reference = np.asarray(slide.read_region((0, 0), index, (w, h)), dtype=np.float32)
    return decoded.shape == reference.shape and float(np.abs(decoded - reference).mean()) < CHECK_TOLERANCE


def open_jpeg_source(
    path: str | Path, grid: TileGrid, batch_size: int, device: torch.device, mpp_override: float | None = None
) -> JpegTileSource | None:
    """The GPU-decoding source for the grid, or None where the CPU reader must be used."""
    if grid.whole_image or len(grid) == 0:
        return None
    with open_slide(path, mpp_override) as slide:
        level = JpegLevel.open(slide, grid.read_level)
        if level is not None and not _device_decodes_like(level, slide, grid.read_level, device):
            level.close()
            level = None
    if level is None:
        return None
    coords = grid.coords()
    side = grid.tile_size_level0 / level.downsample
    inside = (np.floor(coords / level.downsample) + round(side) <= np.array([level.width, level.height])).all()
    if not inside:
        level.close()
        return None
    return JpegTileSource(level, grid, batch_size, device)
