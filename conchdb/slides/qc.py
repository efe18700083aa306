"""The quality-control picture: thumbnail, tissue mask and kept tiles on one PNG.

It is what a user looks at before a long ingest, to see at a glance whether the mask
found the tissue (green tint), missed some, or took glass and pen for tissue, and where
the tiles will be cut (blue squares).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from conchdb.slides.grid import TileGrid
from conchdb.slides.tissue import TissueMask

MIN_SIDE_PX = 800
"""Small thumbnails are enlarged (nearest neighbour) to at least this longer side."""

MASK_TINT = np.array([40, 200, 60], dtype=np.float32)
TILE_COLOUR = (20, 60, 230)


def qc_image(mask: TissueMask, grid: TileGrid) -> Image.Image:
    """The thumbnail with the mask tinted green and the kept tiles outlined in blue."""
    rgb = mask.thumbnail.astype(np.float32)
    tinted = np.where(mask.mask[..., None], 0.6 * rgb + 0.4 * MASK_TINT, rgb)
    image = Image.fromarray(tinted.round().astype(np.uint8))
    zoom = max(1, -(-MIN_SIDE_PX // max(image.size)))
    if zoom > 1:
        image = image.resize((image.width * zoom, image.height * zoom), Image.Resampling.NEAREST)
    draw = ImageDraw.Draw(image)
    scale = zoom / mask.downsample  # QC pixels per level-0 pixel
    for tile in grid.tiles:
        left, top = tile.x * scale, tile.y * scale
        side = tile.size * scale
        draw.rectangle((left, top, left + side - 1, top + side - 1), outline=TILE_COLOUR, width=max(1, zoom // 2))
    return image


def write_qc(path: str | Path, mask: TissueMask, grid: TileGrid) -> Path:
    """Write the QC picture as a PNG; returns the path written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    qc_image(mask, grid).save(path, format="PNG")
    return path
