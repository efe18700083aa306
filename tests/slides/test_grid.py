"""The tile grid: tissue only, anchored at level-0 (0, 0), the right read level, plain images."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conchdb.errors import ConchdbError
from conchdb.slides.grid import TilingParams, make_grid, plan_tiles
from conchdb.slides.mpp import PixelSize
from conchdb.slides.reader import TileReader
from conchdb.slides.slide import Slide, open_slide
from conchdb.slides.tissue import saturation

from .conftest import CMU_MPP, tissue_blob, write_image


def test_cmu_tiles_lie_on_tissue(cmu: Path, cmu_plan):
    mask, grid = cmu_plan
    assert (grid.tile_size_level0, grid.read_level, grid.read_size) == (513, 0, 513)
    assert 5 <= len(grid) < 20  # of the 4 × 5 = 20 squares that fit
    assert all(t.tissue >= 0.25 for t in grid.tiles)
    with open_slide(cmu) as slide:
        everything = make_grid(slide, mask, min_tissue=0.0)
    kept = {(t.x, t.y) for t in grid.tiles}
    dropped = [t for t in everything.tiles if (t.x, t.y) not in kept]
    assert len(everything) == 20 and dropped

    def stained(tiles) -> np.ndarray:
        """Fraction of clearly stained pixels in each tile, read from the slide."""
        pixels = np.concatenate([b.tiles for b in TileReader(cmu, replace(everything, tiles=tuple(tiles)), workers=0)])
        return (saturation(pixels.reshape(-1, 512, 3)) > 0.15).reshape(len(pixels), -1).mean(axis=1)

    assert stained(grid.tiles).min() > 0.15
    background = [t for t in dropped if t.tissue < 0.05]
    assert background and stained(background).max() < 0.05


def test_grid_is_anchored_at_the_origin_and_inside_the_slide(cmu: Path, cmu_plan):
    mask, _ = cmu_plan
    with open_slide(cmu) as slide:
        grid = make_grid(slide, mask, target_mpp=0.5, tile_px=256, stride_px=192, min_tissue=0.0)
    assert grid.tile_size_level0 == round(256 * 0.5 / CMU_MPP) and grid.stride_level0 == round(192 * 0.5 / CMU_MPP)
    xs, ys = {t.x for t in grid.tiles}, {t.y for t in grid.tiles}
    assert min(xs) == 0 and min(ys) == 0
    assert all(x % grid.stride_level0 == 0 for x in xs) and all(y % grid.stride_level0 == 0 for y in ys)
    assert max(xs) + grid.tile_size_level0 <= 2220 < max(xs) + grid.stride_level0 + grid.tile_size_level0
    assert max(ys) + grid.tile_size_level0 <= 2967
    order = [(t.y, t.x) for t in grid.tiles]
    assert order == sorted(order)  # row-major


@dataclass
class _FakePyramid:
    """Just the geometry of a four-level 0.25 µm/px slide, for level choice."""

    dimensions: tuple[int, int] = (40000, 40000)
    level_count: int = 4
    level_downsamples: tuple[float, ...] = (1.0, 2.0, 4.0006, 16.01)
    level_dimensions: tuple = ()
    properties: dict = field(default_factory=dict)

    def close(self) -> None:
        pass


@pytest.mark.parametrize(
    ("target", "level"),
    [(0.25, 0), (0.3, 0), (0.5, 1), (0.9, 1), (1.0, 2), (2.0, 2), (4.0, 3), (0.2, 0)],
)
def test_read_level_is_the_coarsest_at_least_as_fine_as_the_target(target: float, level: int):
    slide = Slide(Path("fake.tif"), "openslide", "generic-tiff", PixelSize(0.25, "test"), (), _FakePyramid())
    assert slide.best_level(target / 0.25, 0.01) == level


def test_target_finer_than_the_scan_warns(cmu: Path, cmu_plan):
    mask, _ = cmu_plan
    with open_slide(cmu) as slide:
        grid = make_grid(slide, mask, target_mpp=0.25)
    assert grid.read_level == 0 and any("upsampled" in w for w in grid.warnings)


def test_plain_image_without_pixel_size_is_one_whole_tile(slides_dir: Path):
    path = slides_dir / "boxes.png"
    with open_slide(path) as slide:
        mask, grid = plan_tiles(slide)
    assert grid.whole_image and len(grid) == 1
    tile = grid.tiles[0]
    assert (tile.x, tile.y, tile.size) == (25, 0, 250)  # the centred square of 300 × 250
    (batch,) = list(TileReader(path, grid, workers=0))
    assert batch.tiles.shape == (1, 512, 512, 3)
    with open_slide(path) as slide:
        whole = slide.read_region((0, 0), 0, (300, 250))
    # torchvision's Resize(512) + CenterCrop(512) arithmetic: 614 × 512, left edge round(102 / 2)
    expected = np.asarray(whole.resize((614, 512), Image.Resampling.BICUBIC).crop((51, 0, 563, 512)))
    np.testing.assert_array_equal(batch.tiles[0], expected)


def test_plain_image_with_pixel_size_is_tiled_when_it_holds_two_tiles(tmp_path: Path):
    small = write_image(tmp_path / "small.png", tissue_blob(400), mpp=0.5)  # 400 px < one 512 px tile
    large = write_image(tmp_path / "large.png", tissue_blob(1200, 500), mpp=0.5)
    for path, whole in ((small, True), (large, False)):
        with open_slide(path) as slide:
            _, grid = plan_tiles(slide)
        assert grid.whole_image is whole
    assert len(grid) == 4 and grid.tile_size_level0 == 512


def test_params_are_checked():
    for bad in ({"target_mpp": 0}, {"tile_px": 8}, {"stride_px": 0}, {"min_tissue": 1.5}):
        with pytest.raises(ConchdbError):
            TilingParams(**bad)
    assert TilingParams().to_dict()["tissue"]["mask_mpp"] == 8.0
