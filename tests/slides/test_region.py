"""`read_region`: a level-0 rectangle at a requested resolution, from the cheapest level."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conchdb.slides import choose_level, open_slide, output_size, read_region

from .conftest import CMU_MPP


def _levels_read(slide, monkeypatch) -> list[tuple[int, tuple[int, int]]]:
    reads: list[tuple[int, tuple[int, int]]] = []
    original = slide.read_region

    def record(location, level, size):
        reads.append((level, size))
        return original(location, level, size)

    monkeypatch.setattr(slide, "read_region", record)
    return reads


def test_a_coarser_request_reads_the_coarser_level(upsampled_cmu: Path, monkeypatch):
    # level 0 is 0.2495 µm/px, level 1 0.499: a region at 0.5 µm/px is decoded from level 1
    with open_slide(upsampled_cmu) as slide:
        reads = _levels_read(slide, monkeypatch)
        image = read_region(slide, 400, 200, 1026, 514, mpp=0.5)
        assert image.size == output_size(slide, 1026, 514, 0.5) == (round(1026 * CMU_MPP / 2 / 0.5), 256)
        assert reads == [(1, (513, 257))]
        reads.clear()
        assert read_region(slide, 400, 200, 100, 100, mpp=CMU_MPP / 2).size == (100, 100)
        assert reads == [(0, (100, 100))], "at the scan's own resolution level 0 is read, not resized"


def test_the_same_square_from_either_level_gives_the_same_pixels(upsampled_cmu: Path):
    with open_slide(upsampled_cmu) as slide:
        coarse = read_region(slide, 1026, 1026, 1026, 1026, out_size=(256, 256))
        fine = read_region(slide, 1026, 1026, 1026, 1026, out_size=(256, 256), level=0)
    assert coarse.size == fine.size == (256, 256)
    assert np.abs(np.asarray(coarse, dtype=float) - np.asarray(fine, dtype=float)).mean() < 3.0


def test_without_a_pixel_size_the_rectangle_stays_in_level0_pixels(tmp_path: Path):
    from .conftest import tissue_blob, write_image

    path = write_image(tmp_path / "plain.png", tissue_blob(200))
    with open_slide(path) as slide:
        assert slide.mpp is None
        assert read_region(slide, 10, 20, 50, 30, mpp=0.5).size == (50, 30)
        assert np.array_equal(np.asarray(read_region(slide, 10, 20, 50, 30)),
                              np.asarray(slide.read_region((10, 20), 0, (50, 30))))


@pytest.mark.parametrize(("downsample", "level"), [(0.5, 0), (1.0, 0), (1.9, 0), (1.985, 1), (2.0, 1), (8.0, 1)])
def test_choose_level_is_the_coarsest_within_1_percent(upsampled_cmu: Path, downsample: float, level: int):
    with open_slide(upsampled_cmu) as slide:
        assert choose_level(slide, downsample) == level
