"""A pyramid level's JPEG tiles as compressed bytes, for decoding somewhere else (the GPU).

A 40× slide read at 0.5 µm/px decodes about a megapixel of JPEG per tile, and on a big GPU
that CPU decoding is what limits. When a level is stored as tiled baseline JPEG, the bytes
of the tiles a region covers can be handed to a GPU decoder instead of to OpenSlide. This
module only finds and reads those bytes (tifffile), with the level's shared JPEG tables
spliced in, so each stream decodes alone; it imports no torch.

`JpegLevel.open` returns None when the level is not tiled JPEG or its colours cannot be
trusted (a JPEG of raw RGB components decodes wrong in decoders that assume YCbCr): it
decodes one tile on the CPU and compares it with OpenSlide's pixels, and the caller then
reads with OpenSlide as usual.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

from conchdb.slides.slide import Slide

JPEG = 7
PHOTOMETRIC_RGB = 2
ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"
"""An APP14 "Adobe" segment with transform 0: the components are R, G, B, not YCbCr. TIFF says
so in its PhotometricInterpretation tag (Aperio's RGB JPEG tiles), but a JPEG stream alone
does not, and decoders would otherwise convert colours that were never transformed."""
CHECK_TOLERANCE = 4.0
"""Mean absolute difference (0–255) between a CPU decode of one tile and OpenSlide's pixels
below which the level's JPEG streams are taken as decodable on their own."""


@dataclass(frozen=True)
class RegionTiles:
    """The JPEG tiles covering a level rectangle: `tiles[i]` is tile index `indices[i]`, placed
    at (`cols[i]`, `rows[i]`) in tile units; the rectangle starts at (`left`, `top`) inside the
    mosaic of those tiles whose top-left tile is (`col0`, `row0`)."""

    indices: tuple[int, ...]
    col0: int
    row0: int
    cols: int
    rows: int
    left: int
    top: int
    width: int
    height: int


class JpegLevel:
    """One tiled-JPEG pyramid level of a slide file, read as compressed tile streams."""

    def __init__(self, path: Path, page: tifffile.TiffPage, downsample: float):
        self.path = path
        self.downsample = downsample
        self.width, self.height = int(page.imagewidth), int(page.imagelength)
        self.tile_w, self.tile_h = int(page.tilewidth), int(page.tilelength)
        self.tiles_across = -(-self.width // self.tile_w)
        self._offsets = tuple(int(o) for o in page.dataoffsets)
        self._counts = tuple(int(c) for c in page.databytecounts)
        tables = page.jpegtables
        self._tables = bytes(tables)[2:-2] if tables else b""  # without their own SOI and EOI
        if int(page.photometric) == PHOTOMETRIC_RGB:
            self._tables = ADOBE_RGB + self._tables
        self._file = open(path, "rb")  # noqa: SIM115 -- kept open for the level's life, closed by close()

    @classmethod
    def open(cls, slide: Slide, level: int) -> JpegLevel | None:
        """The slide's `level` as JPEG tiles, or None where that does not apply (see the module)."""
        if slide.backend != "openslide":  # a plain image, or DICOM read through wsidicom
            return None
        try:
            with tifffile.TiffFile(slide.path) as tif:
                levels = tif.series[0].levels if tif.series else []
                if level >= len(levels):
                    return None
                page = levels[level].keyframe
                if not page.is_tiled or page.compression != JPEG or page.samplesperpixel != 3:
                    return None
                if (int(page.imagewidth), int(page.imagelength)) != tuple(slide.level_dimensions[level]):
                    return None
                opened = cls(slide.path, page, slide.level_downsamples[level])
        except (tifffile.TiffFileError, OSError, ValueError, IndexError):
            return None
        if not opened._decodes_like(slide, level):
            opened.close()
            return None
        return opened

    def _decodes_like(self, slide: Slide, level: int) -> bool:
        w, h = min(self.tile_w, self.width), min(self.tile_h, self.height)
        try:
            cpu = np.asarray(Image.open(io.BytesIO(self.stream(0))).convert("RGB"))[:h, :w].astype(np.float32)
        except (OSError, SyntaxError, ValueError):
            return False
        ref = np.asarray(slide.read_region((0, 0), level, (w, h))).astype(np.float32)
        return cpu.shape == ref.shape and float(np.abs(cpu - ref).mean()) < CHECK_TOLERANCE

    def stream(self, index: int) -> bytes:
        """Tile `index` (row-major) as one self-contained JPEG stream."""
        self._file.seek(self._offsets[index])
        data = self._file.read(self._counts[index])
        return data[:2] + self._tables + data[2:] if self._tables else data  # after SOI

    def region(self, x0: int, y0: int, size0: int) -> RegionTiles:
        """The tiles under the level-0 square (x0, y0, size0) at this level (clipped to the level)."""
        left, top = int(x0 / self.downsample), int(y0 / self.downsample)
        side = max(1, round(size0 / self.downsample))
        right, bottom = min(left + side, self.width), min(top + side, self.height)
        col0, row0 = left // self.tile_w, top // self.tile_h
        col1, row1 = (right - 1) // self.tile_w, (bottom - 1) // self.tile_h
        indices = tuple(r * self.tiles_across + c for r in range(row0, row1 + 1) for c in range(col0, col1 + 1))
        return RegionTiles(indices, col0, row0, col1 - col0 + 1, row1 - row0 + 1,
                           left - col0 * self.tile_w, top - row0 * self.tile_h, right - left, bottom - top)

    def close(self) -> None:
        self._file.close()
