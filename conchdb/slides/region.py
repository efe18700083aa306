"""Read any level-0 rectangle of a slide at a requested resolution: the one place that picks
a pyramid level and resizes.

Tiles, query regions, hit tiles, galleries, thumbnails and heatmaps all need the same
step: a rectangle given in level-0 pixels, read from the coarsest pyramid level that still
has enough pixels (so a 4× reduction of a 40× scan decodes the 10× level, not the whole
40× area) and resized to the size asked for. Doing it in one function keeps a tile cut for
a gallery identical to the tile that was embedded.
"""

from __future__ import annotations

from PIL import Image

from conchdb.slides.slide import Slide

LEVEL_TOLERANCE = 0.01
"""A level up to 1 % coarser than the target still counts as fine enough (downsamples that
OpenSlide computes from rounded level sizes are rarely exact)."""

TILE_FILTER = Image.Resampling.BICUBIC
"""Resampling filter to the tile side: Pillow's bicubic widens its kernel with the scale, so
it antialiases when reducing; it is also the filter CONCH's own preprocessing uses."""


def choose_level(slide: Slide, downsample: float) -> int:
    """The cheapest level to read for `downsample` level-0 pixels per output pixel: the
    coarsest one not coarser than that (within `LEVEL_TOLERANCE`)."""
    return slide.best_level(max(downsample, 1.0), LEVEL_TOLERANCE)


def output_size(slide: Slide, w: float, h: float, mpp: float | None) -> tuple[int, int]:
    """Pixels of a level-0 `w` × `h` rectangle at `mpp` µm/px; level-0 pixels when the slide's
    or the requested pixel size is unknown (then no physical scale can be kept)."""
    scale = slide.mpp / mpp if slide.mpp and mpp else 1.0
    return max(1, round(w * scale)), max(1, round(h * scale))


def read_region(
    slide: Slide,
    x: int,
    y: int,
    w: float,
    h: float,
    *,
    mpp: float | None = None,
    out_size: tuple[int, int] | None = None,
    level: int | None = None,
    resample: Image.Resampling = TILE_FILTER,
) -> Image.Image:
    """RGB pixels of the level-0 rectangle at (x, y), `w` × `h` level-0 pixels wide and high.

    The result is `out_size` pixels when given (a tile's exact side), else the rectangle at
    `mpp` µm/px (see `output_size`). It is read from `level` when given (a tile grid fixes
    its level once for all tiles), else from `choose_level`, and resized with `resample`
    only when the level read does not already have the requested size. `w` and `h` may be
    fractional: a block of a thumbnail spans a fractional number of level-0 pixels, and
    rounding it first would shift the blocks against each other.
    """
    out = out_size or output_size(slide, w, h, mpp)
    if level is None:
        level = choose_level(slide, min(w / out[0], h / out[1]))
    factor = slide.level_downsamples[level]
    size = (max(1, round(w / factor)), max(1, round(h / factor)))
    image = slide.read_region((x, y), level, size)
    return image if image.size == out else image.resize(out, resample)
