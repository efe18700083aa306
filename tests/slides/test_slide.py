"""Opening the real fixture slides, and what a slide read returns."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conchdb.errors import SlideError
from conchdb.slides.slide import flatten_on_white, open_slide

from .conftest import CMU_MPP, write_image


def test_aperio_slide(cmu: Path):
    with open_slide(cmu) as slide:
        assert slide.dimensions == (2220, 2967)
        assert (slide.mpp, slide.mpp_source) == (CMU_MPP, "openslide.mpp")
        assert slide.vendor == "aperio" and slide.level_count == 1
        region = slide.read_region((100, 200), 0, (64, 32))
        assert region.mode == "RGB" and region.size == (64, 32)


def test_72_dpi_tiff_is_refused_unless_overridden(slides_dir: Path):
    path = slides_dir / "boxes.tiff"
    with pytest.raises(SlideError) as caught:
        open_slide(path)
    assert str(path) in caught.value.message and "352.8" in caught.value.message
    assert caught.value.parameter == "slide_mpp" and "mpp" in caught.value.fix
    assert "--" not in caught.value.fix  # library fixes name no command-line flag
    with open_slide(path, mpp_override=0.25, override_source="--slide-mpp") as slide:
        assert (slide.mpp, slide.mpp_source, slide.level_count) == (0.25, "--slide-mpp", 4)


def test_bad_override_names_the_slide(cmu: Path):
    with pytest.raises(SlideError, match="cmu_small_region.svs.*not a pixel size"):
        open_slide(cmu, mpp_override=40)


def test_unopenable_slide(slides_dir: Path):
    path = slides_dir / "unopenable.tiff"
    with pytest.raises(SlideError) as caught:
        open_slide(path)
    assert str(path) in caught.value.message and "Unsupported TIFF compression" in caught.value.message
    assert caught.value.fix


def test_unreadable_slide_names_file_and_region(slides_dir: Path):
    path = slides_dir / "unreadable.svs"
    with open_slide(path) as slide, pytest.raises(SlideError) as caught:
        slide.read_region((0, 0), 0, (16, 16))
    assert str(path) in caught.value.message and "Bogus marker length" in caught.value.message
    assert "(0, 0)" in caught.value.message


def test_dicom_pair_opens_from_either_file(slides_dir: Path):
    pixels = []
    for name in ("boxes_0.dcm", "boxes_1.dcm"):
        with open_slide(slides_dir / name) as slide:
            assert slide.vendor == "dicom" and slide.mpp == CMU_MPP
            pixels.append(np.asarray(slide.read_region((0, 0), 0, slide.dimensions)))
    np.testing.assert_array_equal(pixels[0], pixels[1])


def test_plain_image_without_pixel_size(slides_dir: Path):
    with open_slide(slides_dir / "boxes.png") as slide:
        assert slide.backend == "image" and slide.is_plain_image
        assert (slide.mpp, slide.mpp_source) == (None, "none")
        assert slide.dimensions == (300, 250) and slide.level_count == 1


def test_plain_image_reads_outside_bounds_as_white(tmp_path: Path):
    path = write_image(tmp_path / "red.png", np.full((10, 10, 3), (200, 0, 0), np.uint8), mpp=0.5)
    with open_slide(path) as slide:
        assert (slide.mpp, slide.mpp_source) == (pytest.approx(0.5), "image-resolution")
        region = np.asarray(slide.read_region((5, 5), 0, (10, 10)))
    assert (region[:5, :5] == (200, 0, 0)).all() and (region[5:, :] == 255).all()


def test_transparency_is_composited_on_white():
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)  # opaque
    rgba[1, 1] = (0, 0, 0, 128)  # half-transparent black
    flat = np.asarray(flatten_on_white(Image.fromarray(rgba, "RGBA")))
    assert tuple(flat[0, 0]) == (10, 20, 30)
    assert tuple(flat[0, 1]) == (255, 255, 255)
    assert 120 <= flat[1, 1, 0] <= 135


def test_missing_and_non_image_files(tmp_path: Path):
    with pytest.raises(SlideError, match="no such file"):
        open_slide(tmp_path / "nope.svs")
    text = tmp_path / "notes.tif"
    text.write_text("not pixels")
    with pytest.raises(SlideError, match="notes.tif: not a slide"):
        open_slide(text)
