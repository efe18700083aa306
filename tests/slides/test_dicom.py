"""DICOM whole-slide images through wsidicom: sources, checked pixel spacing, folders that
OpenSlide refuses, malformed series."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import openslide
import pytest

from conchdb.errors import SlideError
from conchdb.ingest.cohort import discover
from conchdb.slides.dicom import dicom_pixel_size, is_dicomweb, parse_source, source_text
from conchdb.slides.slide import open_slide

STUDY, SERIES = "1.2.3", "1.2.3.4"


def test_a_dicomweb_source_names_one_series_and_survives_a_path():
    text = f"dicomweb+http://127.0.0.1:8042/dicom-web/studies/{STUDY}/series/{SERIES}"
    source = parse_source(text)
    assert (source.base, source.study, source.series) == ("http://127.0.0.1:8042/dicom-web", STUDY, SERIES)
    assert str(source) == text and source_text(Path(text)) == text and is_dicomweb(Path(text))
    assert parse_source("dicomweb+https://pacs.example/wado").study is None


def test_credentials_in_a_dicomweb_url_are_refused():
    with pytest.raises(SlideError, match="carries credentials") as caught:
        parse_source("dicomweb+https://alice:secret@pacs.example/dicom-web")
    assert "secret" not in str(caught.value) and "CONCHDB_DICOMWEB_PASSWORD" in caught.value.fix


class _Spacing:
    """The attributes `dicom_pixel_size` reads, as pydicom would give them."""

    def __init__(self, spacing, volume, matrix=(2000, 1000)):
        class Measures:
            PixelSpacing = spacing  # noqa: N815 - DICOM keywords

        class Group:
            PixelMeasuresSequence = [Measures]  # noqa: N815

        self.SharedFunctionalGroupsSequence = [Group] if spacing else []
        if volume:
            self.ImagedVolumeWidth, self.ImagedVolumeHeight = volume
        self.TotalPixelMatrixColumns, self.TotalPixelMatrixRows = matrix


def test_pixel_size_comes_from_pixel_spacing_or_the_imaged_volume():
    assert dicom_pixel_size(_Spacing([0.0005, 0.0005], (1.0, 0.5)), "s").mpp == pytest.approx(0.5)
    size = dicom_pixel_size(_Spacing(None, (0.5, 0.25)), "s")
    assert size.mpp == pytest.approx(0.25) and size.source == "dicom.ImagedVolume"
    assert dicom_pixel_size(_Spacing(None, None), "s") is None


def test_non_square_or_inconsistent_spacing_is_refused_with_both_values():
    # OrthancWSIDicomizer's trap: width and height swapped (0.667 × 0.373 µm for 0.499 µm/px)
    with pytest.raises(SlideError, match=r"series-x: non-square pixels .* 0\.373 µm wide × 0\.667 µm high"):
        dicom_pixel_size(_Spacing([0.000667, 0.000373], None), "series-x")
    with pytest.raises(SlideError, match=r"series-y: Pixel Spacing says 0\.5 × 0\.5 µm/px .* gives 0\.25 × 0\.25"):
        dicom_pixel_size(_Spacing([0.0005, 0.0005], (0.5, 0.25)), "series-y")


def test_a_folder_series_openslide_refuses_is_read_through_wsidicom(cmu_dicom_rle, slides_dir):
    volume = _volume(cmu_dicom_rle)
    with pytest.raises(openslide.OpenSlideError, match="Unsupported transfer syntax"):
        openslide.OpenSlide(str(volume))
    with open_slide(volume) as slide, open_slide(slides_dir / "cmu_small_region.svs") as source:
        assert slide.backend == "wsidicom" and slide.dimensions == source.dimensions
        assert slide.mpp == pytest.approx(0.499) and slide.mpp_source == "dicom.PixelSpacing"
        for location in ((0, 0), (1700, 2500), (2000, 2800)):  # the last one reaches past the edge
            mine = np.asarray(slide.read_region(location, 0, (512, 512)))
            theirs = np.asarray(source.read_region(location, 0, (512, 512)))
            assert np.array_equal(mine, theirs)  # RLE is lossless


def test_a_converted_folder_is_one_slide_its_label_and_overview_are_part_of_it(cmu_dicom, tmp_path):
    folder = tmp_path / "case"
    folder.mkdir()
    for file in cmu_dicom:
        shutil.copy(file, folder / file.name)
    cohort = discover(tmp_path)
    (slide,) = cohort.slides
    assert "ACC-0001" in slide.aliases and len(slide.files) == len(cmu_dicom)
    with open_slide(slide.path) as opened:
        assert opened.attributes["dicom_accession_number"] == "ACC-0001"
        assert opened.attributes["dicom_patient_id"] == "P-0001"


def test_a_label_only_series_is_passed_over_with_its_reason(cmu_dicom, tmp_path):
    from tests.dicom import only_label

    only_label(cmu_dicom, tmp_path / "labels")
    cohort = discover(tmp_path)
    assert cohort.slides == () and cohort.passed_over == (("labels/label.dcm", "no VOLUME image, only label"),)


def _volume(files: list[Path]) -> Path:
    import pydicom

    return next(f for f in files if "VOLUME" in pydicom.dcmread(f, stop_before_pixels=True).ImageType)


@pytest.mark.parametrize(("change", "reason"), [
    ("no-image-type", "no Image Type"),
    ("non-square", "non-square pixels"),
    ("inconsistent", "Pixel Spacing says 0.499 × 0.499 µm/px but the Imaged Volume"),
    ("no-frames", "frames|not a whole-slide image|cannot|no Image Type|NumberOfFrames"),
])
def test_a_malformed_series_is_refused_with_the_file_and_the_reason(cmu_dicom, tmp_path, change, reason):
    import pydicom

    dataset = pydicom.dcmread(_volume(cmu_dicom))
    if change == "no-image-type":
        del dataset.ImageType
    elif change == "non-square":
        dataset.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing = [0.000667, 0.000373]
    elif change == "inconsistent":
        dataset.ImagedVolumeWidth = dataset.ImagedVolumeWidth * 2
        dataset.ImagedVolumeHeight = dataset.ImagedVolumeHeight * 2
    else:
        del dataset.PixelData
        dataset.NumberOfFrames = 0
    path = tmp_path / "bad.dcm"
    dataset.save_as(path)
    with pytest.raises(SlideError, match=reason) as caught:
        open_slide(path).close()
    assert str(path) in caught.value.message
