"""Pixels from source slides for search: query regions, hit tiles, thumbnails.

Every read goes through `conchdb.slides.read_region`, so a region is read the way ingest
reads tiles: a level-0 square or rectangle, taken from the coarsest pyramid level that is
still fine enough, and resized to the requested resolution. A hit is cut at its own tile's
resolution (its `size` level-0 pixels to `tile_px`), so the JPEG shows what was embedded.

A slide's pixel size is the one its tiles were made with whenever the store knows it
(`open_source`, `recorded_mpp`): a slide whose size came from a manifest or an override
at ingest may have none in its file, and the same level-0 rectangle must mean the same
micrometres at query time as at ingest.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from conchdb.errors import QueryError, SlideError
from conchdb.slides import Slide, open_slide, output_size, read_region

MAX_REGION_PX = 4096
"""Largest side of a query region after resizing to the target resolution: the model sees
448 px anyway, and a bigger read only costs memory."""

_REGION = re.compile(r"^(?P<path>.+)\+(?P<x>\d+),(?P<y>\d+),(?P<w>\d+),(?P<h>\d+)$")


@dataclass(frozen=True)
class Region:
    """A rectangle of a slide in level-0 pixels: `path+x,y,w,h` on the command line."""

    path: Path
    x: int
    y: int
    w: int
    h: int


_STORED_REGION = re.compile(r"^(?P<slide>.+):(?P<x>\d+),(?P<y>\d+),(?P<w>\d+),(?P<h>\d+)$")


@dataclass(frozen=True)
class StoredRegion:
    """A rectangle of a stored slide in level-0 pixels: `SLIDE_ID:x,y,w,h` on the command line."""

    slide_id: str
    x: int
    y: int
    w: int
    h: int


def parse_stored_region(spec: str) -> StoredRegion:
    """`SLIDE_ID:x,y,w,h` (the last colon splits, so a slide id may hold colons)."""
    match = _STORED_REGION.match(spec.strip())
    if not match:
        raise QueryError(
            f"--region {spec!r} is not SLIDE_ID:x,y,w,h", parameter="region",
            fix="give a stored slide id and a level-0 rectangle, e.g. case01.svs:20480,11264,1024,1024",
        )
    region = StoredRegion(match["slide"], *(int(match[k]) for k in ("x", "y", "w", "h")))
    if region.w < 1 or region.h < 1:
        raise QueryError(f"region {spec!r} is empty", fix="give w and h of at least 1 level-0 pixel",
                         parameter="region")
    return region


def parse_region(spec: str) -> Region | None:
    """A `Region` when `spec` ends in `+x,y,w,h`, else None (it is then a plain image path)."""
    match = _REGION.match(spec.strip())
    if not match:
        return None
    region = Region(Path(match["path"]), *(int(match[k]) for k in ("x", "y", "w", "h")))
    if region.w < 1 or region.h < 1:
        raise QueryError(f"region {spec!r} is empty", fix="give w and h of at least 1 level-0 pixel", parameter="image")
    return region


def open_source(payload: Mapping[str, Any]) -> Slide:
    """The slide a stored point was cut from, opened with the pixel size ingest used.

    The stored `mpp` is passed as an override, so slides whose size came from a manifest
    or `--slide-mpp` open with the same geometry as at ingest.
    """
    path = payload.get("path")
    if not path:
        raise SlideError("the point has no `path` in its payload", fix="it was not written by conchdb ingest")
    mpp = payload.get("mpp")
    try:
        return open_slide(path, mpp if isinstance(mpp, (int, float)) else None, override_source="store")
    except SlideError as exc:
        raise SlideError(
            f"cannot open the source slide of '{payload.get('slide_id', path)}': {exc.message}",
            fix="the slide must still be at the path it was ingested from (run from the same folder, "
            "or ingest with an absolute path)",
        ) from None


def read_query_region(
    region: Region, target_mpp: float | None, slide_mpp: float | None = None, mpp_source: str = "override"
) -> Image.Image:
    """A query region at `target_mpp` (the collection's tile resolution), or at level 0 when
    the slide or the collection gives no pixel size.

    `slide_mpp` (µm per level-0 pixel) beats the file's own metadata, as at ingest; pass the
    size the store recorded for a stored slide, or the caller's for a slide whose file has
    none. `mpp_source` names where it came from in errors."""
    with open_slide(region.path, slide_mpp, override_source=mpp_source) as slide:
        width, height = slide.dimensions
        if region.x + region.w > width or region.y + region.h > height:
            raise QueryError(
                f"region {region.x},{region.y},{region.w},{region.h} lies outside {region.path} ({width}×{height})",
                fix="give x, y, w, h in level-0 pixels inside the slide",
                parameter="image",
            )
        out = output_size(slide, region.w, region.h, target_mpp)
        if max(out) > MAX_REGION_PX:
            raise QueryError(
                f"region {region.w}×{region.h} level-0 px is {out[0]}×{out[1]} px at the tile resolution",
                fix=f"choose a region under {MAX_REGION_PX} px a side at {target_mpp or 'level-0'} µm/px",
                parameter="image",
            )
        return read_region(slide, region.x, region.y, region.w, region.h, out_size=out)


def read_hit_tile(slide: Slide, payload: Mapping[str, Any]) -> Image.Image:
    """A stored tile's pixels: its `size` level-0 square at `(x, y)`, resized to `tile_px`."""
    x, y, size = int(payload["x"]), int(payload["y"]), int(payload["size"])
    tile_px = int(payload.get("tile_px") or size)
    return read_region(slide, x, y, size, size, out_size=(tile_px, tile_px))


def thumbnail(slide: Slide, max_side: int) -> tuple[Image.Image, float]:
    """The whole slide with its longer side at most `max_side` px, and its downsample
    (level-0 pixels per thumbnail pixel)."""
    downsample = max(1.0, max(slide.dimensions) / max_side)
    from conchdb.slides import read_thumbnail  # the tissue module loads scikit-image: only pictures need it

    return Image.fromarray(read_thumbnail(slide, downsample)), downsample
