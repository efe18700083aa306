"""The same tissue scanned at twice the resolution gives the same tiles.

The test slide is the CMU region upsampled 2× (0.2495 µm/px) with a pyramid level holding
the original pixels (0.499 µm/px). At 0.5 µm/px both slides must give the same grid in
micrometres and tiles with the same pixels; a tool that tiles by level or by rounded
magnification would cut tiles of half the physical size from the upsampled slide.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from conchdb.slides.grid import plan_tiles
from conchdb.slides.reader import TileReader
from conchdb.slides.slide import open_slide

from .conftest import CMU_MPP


def _tiles(path: Path, grid) -> np.ndarray:
    return np.concatenate([b.tiles for b in TileReader(path, grid, workers=0)]).astype(np.int16)


def test_same_grid_in_micrometres(upsampled_cmu: Path, cmu_plan):
    _, grid = cmu_plan
    with open_slide(upsampled_cmu) as slide:
        assert slide.mpp == CMU_MPP / 2 and slide.level_downsamples == (1.0, 2.0)
        _, up_grid = plan_tiles(slide)
    assert (up_grid.tile_size_level0, up_grid.read_level, up_grid.read_size) == (1026, 1, 513)
    assert up_grid.tile_size_level0 * slide.mpp == grid.tile_size_level0 * CMU_MPP

    def micrometres(g, mpp):
        return [(round(t.x * mpp, 3), round(t.y * mpp, 3)) for t in g.tiles]

    assert micrometres(up_grid, CMU_MPP / 2) == micrometres(grid, CMU_MPP)
    tissue = np.array([t.tissue for t in grid.tiles])
    np.testing.assert_allclose([t.tissue for t in up_grid.tiles], tissue, atol=0.02)


def test_same_pixels(cmu: Path, upsampled_cmu: Path, cmu_plan):
    _, grid = cmu_plan
    with open_slide(upsampled_cmu) as slide:
        _, up_grid = plan_tiles(slide)
    original = _tiles(cmu, grid)
    assert np.abs(_tiles(upsampled_cmu, up_grid) - original).mean() < 2.0  # JPEG re-encoding only
    # read from the 2× finer level 0 and resized: the other path to the same tissue
    from_level0 = replace(up_grid, read_level=0, read_size=1026)
    assert np.abs(_tiles(upsampled_cmu, from_level0) - original).mean() < 2.5
