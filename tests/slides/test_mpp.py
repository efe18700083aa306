"""Pixel size resolution: the order of sources, and the claims that are refused."""

from __future__ import annotations

import pytest

from conchdb.slides.mpp import resolve_image_mpp, resolve_slide_mpp, validate_override

APERIO = {"openslide.mpp-x": "0.2527", "openslide.mpp-y": "0.2527", "aperio.MPP": "0.2527",
          "openslide.objective-power": "40"}
GENERIC_72_DPI = {"openslide.mpp-x": "352.77777", "openslide.mpp-y": "352.77777",
                  "tiff.XResolution": "72", "tiff.YResolution": "72", "tiff.ResolutionUnit": "inch"}


def test_override_wins_and_is_recorded():
    resolved = resolve_slide_mpp(APERIO, override=0.5, override_source="manifest")
    assert (resolved.pixel_size.mpp, resolved.pixel_size.source) == (0.5, "manifest")


def test_openslide_mpp_before_vendor_and_objective():
    size = resolve_slide_mpp(APERIO).pixel_size
    assert (size.mpp, size.source, size.warning) == (0.2527, "openslide.mpp", None)


def test_vendor_property_when_openslide_has_none():
    size = resolve_slide_mpp({"aperio.MPP": "0.4990", "aperio.AppMag": "20"}).pixel_size
    assert (size.mpp, size.source) == (0.499, "aperio.MPP")
    philips = resolve_slide_mpp({"philips.DICOM_PIXEL_SPACING": '"0.000243" "0.000243"'}).pixel_size
    assert philips.mpp == pytest.approx(0.243)


def test_tiff_tags_in_cm_are_a_pixel_size():
    props = {"tiff.XResolution": "40000", "tiff.YResolution": "40000", "tiff.ResolutionUnit": "centimeter"}
    size = resolve_slide_mpp(props).pixel_size
    assert (size.mpp, size.source) == (pytest.approx(0.25), "tiff-resolution")


def test_openslide_mpp_copied_from_tiff_tags_is_judged_as_tags():
    """OpenSlide passes generic-TIFF tags through as openslide.mpp-x: a 72-dpi tag must not
    become a 352.8 µm/px slide by that route."""
    resolved = resolve_slide_mpp(GENERIC_72_DPI)
    assert resolved.pixel_size is None
    assert "352.8" in resolved.explain() and "72 dpi" in resolved.explain()


def test_tags_without_unit_are_refused():
    props = {"tiff.XResolution": "40000", "tiff.ResolutionUnit": "none"}
    resolved = resolve_slide_mpp(props)
    assert resolved.pixel_size is None and "no physical unit" in resolved.explain()


def test_objective_power_is_a_last_resort_with_a_warning():
    size = resolve_slide_mpp({**GENERIC_72_DPI, "openslide.objective-power": "20"}).pixel_size
    assert size.mpp == pytest.approx(0.5)
    assert size.source.startswith("objective-power") and "10 / 20" in size.warning


def test_nothing_usable():
    resolved = resolve_slide_mpp({"openslide.vendor": "generic-tiff"})
    assert resolved.pixel_size is None and resolved.explain() == "no pixel size in the file's metadata"


def test_non_square_pixels_are_averaged_with_a_warning():
    size = resolve_slide_mpp({"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.30"}).pixel_size
    assert size.mpp == pytest.approx(0.275) and "non-square" in size.warning


@pytest.mark.parametrize("bad", [0, -1, 40, "abc", float("nan")])
def test_override_must_be_a_plausible_pixel_size(bad):
    with pytest.raises(ValueError, match="not a pixel size"):
        validate_override(bad, "--slide-mpp")


def test_image_dpi():
    assert resolve_image_mpp({"dpi": (50800.0, 50800.0)}).pixel_size.mpp == pytest.approx(0.5)
    refused = resolve_image_mpp({"dpi": (72, 72)})
    assert refused.pixel_size is None and "72 dpi" in refused.explain()
    assert resolve_image_mpp({}).pixel_size is None
