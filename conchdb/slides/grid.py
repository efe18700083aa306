"""The tile grid: which level-0 squares become tiles, and from which level they are read.

The grid is anchored at level-0 (0, 0) and measured in level-0 pixels, so a tile's
coordinates mean the same thing on every slide and in every run: (x, y, size) is a square
of the scan, whatever level the pixels are later read from. Its side is the target
physical size (`tile_px` × `target_mpp` µm) in level-0 pixels, rounded to a whole pixel.
Tiles that would cross the slide's right or bottom edge are dropped, never padded.

Pixels are read from the coarsest level still at least as fine as the target (within
1 %, which absorbs the rounding in OpenSlide's level downsamples) and resized to
`tile_px`: never from a level chosen by a rounded magnification.

A plain image with no pixel size cannot be cut at a physical size: it becomes one tile,
its centred square, embedded whole (resized and centre-cropped as CONCH evaluates ROI
datasets). So does a plain image with a pixel size too small to hold two tiles.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from conchdb.errors import ConchdbError
from conchdb.slides.region import LEVEL_TOLERANCE, choose_level
from conchdb.slides.slide import Slide
from conchdb.slides.tissue import TissueMask, TissueParams, compute_tissue_mask


@dataclass(frozen=True)
class Tile:
    """A square of the slide in level-0 pixels and the fraction of it that is tissue."""

    x: int
    y: int
    size: int
    tissue: float


@dataclass(frozen=True)
class TilingParams:
    """Everything that decides which pixels a tile holds; recorded with the vectors."""

    target_mpp: float = 0.5
    tile_px: int = 512
    stride_px: int | None = None
    min_tissue: float = 0.25
    tissue: TissueParams = field(default_factory=TissueParams)

    def __post_init__(self) -> None:
        if not (self.target_mpp > 0 and np.isfinite(self.target_mpp)):
            raise ConchdbError(
                f"the tile resolution must be a positive number of µm/px, got {self.target_mpp}",
                "give the µm per pixel that tiles are cut at, e.g. 0.5",
                parameter="target_mpp",
            )
        if self.tile_px < 16:
            raise ConchdbError(f"the tile side must be at least 16 px, got {self.tile_px}", parameter="tile_px")
        if self.stride_px is not None and self.stride_px < 1:
            raise ConchdbError(
                f"the stride between tiles must be at least 1 px, got {self.stride_px}", parameter="stride_px"
            )
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ConchdbError(
                f"the smallest tissue fraction must lie between 0 and 1, got {self.min_tissue}",
                "give a fraction such as 0.25",
                parameter="min_tissue",
            )

    @property
    def stride(self) -> int:
        """Stride in output pixels (the tile side unless set)."""
        return self.stride_px if self.stride_px is not None else self.tile_px

    def to_dict(self) -> dict[str, Any]:
        """Plain data for recording in the store."""
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> TilingParams:
        """The inverse of `to_dict`: every field, the tissue settings as a nested object.

        A missing or unknown field is an error naming it, not a silent default: what
        comes back must be the tiling that was written."""
        values = dict(_exact(doc, cls, "tiling"))
        values["tissue"] = TissueParams(**_exact(values["tissue"], TissueParams, "tiling.tissue"))
        return cls(**values)


def _exact(doc: Any, kind: type, what: str) -> Mapping[str, Any]:
    """`doc` when its keys are exactly the fields of dataclass `kind`; else a `ConchdbError` naming them."""
    if not isinstance(doc, Mapping):
        raise ConchdbError(f"{what}: expected an object of {kind.__name__} fields, got {type(doc).__name__}",
                           parameter=what)
    names = {f.name for f in fields(kind)}
    missing, unknown = sorted(names - set(doc)), sorted(set(doc) - names)
    if missing or unknown:
        said = [f"missing {', '.join(missing)}"] * bool(missing) + [f"unknown {', '.join(unknown)}"] * bool(unknown)
        raise ConchdbError(f"{what}: {'; '.join(said)} (fields of {kind.__name__}: {', '.join(sorted(names))})",
                           parameter=what)
    return doc


@dataclass(frozen=True)
class TileGrid:
    """The tiles of one slide, in row-major order, and how to read them.

    `read_size` is the side of the square read at `read_level` for each tile, later
    resized to `tile_px`. `whole_image` grids hold one tile: the image's centred
    square, delivered by resizing the shorter side to `tile_px` and centre-cropping.
    """

    tiles: tuple[Tile, ...]
    params: TilingParams
    slide_dimensions: tuple[int, int]
    mpp: float | None
    tile_size_level0: int
    stride_level0: int
    read_level: int
    read_size: int
    whole_image: bool = False
    warnings: tuple[str, ...] = ()

    @property
    def tile_px(self) -> int:
        return self.params.tile_px

    @property
    def target_mpp(self) -> float:
        return self.params.target_mpp

    def __len__(self) -> int:
        return len(self.tiles)

    def coords(self) -> np.ndarray:
        """(N, 2) int64 array of the tiles' level-0 (x, y)."""
        return np.array([(t.x, t.y) for t in self.tiles], dtype=np.int64).reshape(-1, 2)


def _axis(length: int, size: int, stride: int) -> np.ndarray:
    """Origins of the squares that fit inside [0, length) on one axis."""
    if length < size:
        return np.zeros(0, dtype=np.int64)
    return np.arange((length - size) // stride + 1, dtype=np.int64) * stride


def _whole_image_grid(slide: Slide, mask: TissueMask | None, params: TilingParams, why: str) -> TileGrid:
    width, height = slide.dimensions
    side = min(width, height)
    x, y = (width - side) // 2, (height - side) // 2
    tissue = 1.0 if mask is None else float(mask.fractions(np.array([x]), np.array([y]), side)[0])
    return TileGrid(
        tiles=(Tile(x, y, side, round(tissue, 4)),),
        params=params,
        slide_dimensions=(width, height),
        mpp=slide.mpp,
        tile_size_level0=side,
        stride_level0=side,
        read_level=0,
        read_size=side,
        whole_image=True,
        warnings=(f"embedded whole as one {params.tile_px} px tile: {why}",),
    )


def make_grid(
    slide: Slide,
    mask: TissueMask | None,
    target_mpp: float = 0.5,
    tile_px: int = 512,
    stride_px: int | None = None,
    min_tissue: float = 0.25,
    params: TilingParams | None = None,
) -> TileGrid:
    """The tiles of `slide` at `target_mpp` whose tissue fraction is at least `min_tissue`.

    Pass either the keyword settings or a `TilingParams` (which wins). `mask` is
    required for slides with a pixel size; a plain image without one needs none.
    """
    params = params or TilingParams(target_mpp, tile_px, stride_px, min_tissue)
    mpp = slide.mpp
    if mpp is None:
        return _whole_image_grid(slide, mask, params, "the image has no pixel size")
    width, height = slide.dimensions
    size0 = max(1, round(params.tile_px * params.target_mpp / mpp))
    stride0 = size0 if params.stride_px is None else max(1, round(params.stride * params.target_mpp / mpp))
    xs, ys = _axis(width, size0, stride0), _axis(height, size0, stride0)
    if slide.is_plain_image and len(xs) * len(ys) < 2:
        return _whole_image_grid(slide, mask, params, "the image holds fewer than two tiles")
    if mask is None:
        raise ValueError("make_grid needs a tissue mask for a slide with a pixel size")
    grid_x, grid_y = np.meshgrid(xs, ys)  # row-major: y outer, x inner
    grid_x, grid_y = grid_x.ravel(), grid_y.ravel()
    fractions = mask.fractions(grid_x, grid_y, size0)
    keep = fractions >= params.min_tissue
    tiles = tuple(
        Tile(int(x), int(y), size0, round(float(f), 4))
        for x, y, f in zip(grid_x[keep], grid_y[keep], fractions[keep], strict=True)
    )
    level = choose_level(slide, params.target_mpp / mpp)
    warnings = []
    if mpp > params.target_mpp * (1 + LEVEL_TOLERANCE):
        warnings.append(
            f"the target {params.target_mpp:g} µm/px is finer than the scan ({mpp:.4g} µm/px): "
            f"tiles are upsampled {mpp / params.target_mpp:.2f}×"
        )
    if slide.pixel_size is not None and slide.pixel_size.warning:
        warnings.append(slide.pixel_size.warning)
    return TileGrid(
        tiles=tiles,
        params=params,
        slide_dimensions=(width, height),
        mpp=mpp,
        tile_size_level0=size0,
        stride_level0=stride0,
        read_level=level,
        read_size=max(1, round(size0 / slide.level_downsamples[level])),
        warnings=tuple(warnings),
    )


def plan_tiles(slide: Slide, params: TilingParams | None = None) -> tuple[TissueMask, TileGrid]:
    """Tissue mask and tile grid of an open slide: everything before the pixels are read."""
    params = params or TilingParams()
    mask = compute_tissue_mask(slide, params.tissue)
    return mask, make_grid(slide, mask, params=params)
