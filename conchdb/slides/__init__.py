"""Slide pixels, the bottom layer: it knows no model, store, search or ingest.

One job per module: `slide` opens a slide (OpenSlide) or a plain image (Pillow), `mpp`
decides its pixel size, `region` reads any level-0 rectangle at a requested resolution,
`tissue` finds the tissue, `grid` chooses the tiles, `reader` reads them in worker
processes, `qc` draws the picture to check, `pyramid` writes pyramidal TIFFs.

The public names below are loaded on first use, not when the package is imported: tile
reader workers import `conchdb.slides.reader`, which imports this package first, and must
not pay for scikit-image (tissue) or tifffile (pyramid) that they never call. Nothing here
imports torch or a Qdrant client.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "Slide": "slide",
    "open_slide": "slide",
    "flatten_on_white": "slide",
    "PixelSize": "mpp",
    "validate_override": "mpp",
    "LEVEL_TOLERANCE": "region",
    "TILE_FILTER": "region",
    "choose_level": "region",
    "output_size": "region",
    "read_region": "region",
    "TissueMask": "tissue",
    "TissueParams": "tissue",
    "compute_tissue_mask": "tissue",
    "read_thumbnail": "tissue",
    "Tile": "grid",
    "TileGrid": "grid",
    "TilingParams": "grid",
    "make_grid": "grid",
    "plan_tiles": "grid",
    "TileBatch": "reader",
    "TileReader": "reader",
    "write_qc": "qc",
    "LevelSource": "pyramid",
    "write_pyramid_tiff": "pyramid",
}

__all__ = [
    "LEVEL_TOLERANCE",
    "LevelSource",
    "PixelSize",
    "Slide",
    "TILE_FILTER",
    "Tile",
    "TileBatch",
    "TileGrid",
    "TileReader",
    "TilingParams",
    "TissueMask",
    "TissueParams",
    "choose_level",
    "compute_tissue_mask",
    "flatten_on_white",
    "make_grid",
    "open_slide",
    "output_size",
    "plan_tiles",
    "read_region",
    "read_thumbnail",
    "validate_override",
    "write_pyramid_tiff",
    "write_qc",
]

if TYPE_CHECKING:
    from conchdb.slides.grid import Tile, TileGrid, TilingParams, make_grid, plan_tiles
    from conchdb.slides.mpp import PixelSize, validate_override
    from conchdb.slides.pyramid import LevelSource, write_pyramid_tiff
    from conchdb.slides.qc import write_qc
    from conchdb.slides.reader import TileBatch, TileReader
    from conchdb.slides.region import LEVEL_TOLERANCE, TILE_FILTER, choose_level, output_size, read_region
    from conchdb.slides.slide import Slide, flatten_on_white, open_slide
    from conchdb.slides.tissue import TissueMask, TissueParams, compute_tissue_mask, read_thumbnail


def __getattr__(name: str) -> Any:
    """Import the module that holds `name` on first access (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
