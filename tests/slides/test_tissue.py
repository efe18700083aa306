"""Tissue detection on synthetic slides with a known answer, and exact tissue fractions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from conchdb.errors import ConchdbError
from conchdb.slides.slide import open_slide
from conchdb.slides.tissue import TissueMask, TissueParams, compute_tissue_mask, read_thumbnail

from .conftest import tissue_blob, write_image


def _mask(path: Path, **params) -> TissueMask:
    with open_slide(path) as slide:
        return compute_tissue_mask(slide, TissueParams(**params))


def test_disc_of_tissue_is_found_and_glass_is_not(tmp_path: Path):
    # 400 px at 2 µm/px: an 800 µm field, mask at 8 µm/px -> 100 px, disc radius 30 px
    mask = _mask(write_image(tmp_path / "disc.png", tissue_blob(), mpp=2.0))
    assert mask.mask.shape == (100, 100) and mask.downsample == 4
    yy, xx = np.mgrid[:100, :100]
    truth = (yy + 0.5 - 50) ** 2 + (xx + 0.5 - 50) ** 2 < 30**2
    iou = (mask.mask & truth).sum() / (mask.mask | truth).sum()
    assert iou > 0.9


def test_blank_glass_has_no_tissue(tmp_path: Path):
    rng = np.random.default_rng(1)
    glass = (np.full((300, 300, 3), 240.0) + rng.normal(0, 3, (300, 300, 3))).clip(0, 255).astype(np.uint8)
    assert not _mask(write_image(tmp_path / "glass.png", glass, mpp=2.0)).mask.any()


def test_specks_are_removed_and_holes_kept(tmp_path: Path):
    rgb = tissue_blob(size=600, radius=200)
    rgb[290:310, 290:310] = 245  # a 40 µm lumen inside the tissue: a hole to keep
    rgb[20:24, 20:24] = (200, 60, 120)  # an 8 µm speck of dust on the glass
    mask = _mask(write_image(tmp_path / "holes.png", rgb, mpp=2.0), closing_um=4.0).mask
    assert not mask[:10, :10].any()
    assert not mask[73:77, 73:77].any()  # the lumen (mask px 72.5–77.5) stays empty
    assert mask[60:70, 60:70].all()


def test_thumbnail_read_in_blocks_equals_one_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    path = write_image(tmp_path / "disc.png", tissue_blob(), mpp=2.0)
    with open_slide(path) as slide:
        whole = read_thumbnail(slide, 4.0)
        monkeypatch.setattr("conchdb.slides.tissue.READ_BLOCK_PX", 40)  # 10×10 blocks
        blocks = read_thumbnail(slide, 4.0)
    np.testing.assert_array_equal(whole, blocks)


def test_fractions_are_area_weighted():
    rng = np.random.default_rng(2)
    fine = rng.random((40, 40)) > 0.5
    mask = TissueMask(mask=fine, thumbnail=np.zeros((40, 40, 3), np.uint8), downsample=4.0, threshold=0.0)
    level0 = np.kron(fine, np.ones((4, 4), bool))  # the same mask at level 0
    xs, ys = np.array([0, 3, 17, 101]), np.array([0, 9, 30, 57])
    got = mask.fractions(xs, ys, 23)
    expected = [level0[y : y + 23, x : x + 23].mean() for x, y in zip(xs, ys, strict=True)]
    np.testing.assert_allclose(got, expected, atol=1e-9)


def test_params_are_checked():
    with pytest.raises(ConchdbError, match="min_saturation"):
        TissueParams(min_saturation=1.5)
