"""Cohort discovery: ids, content identity, multi-file formats, skipped files, duplicates."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conchdb.errors import SlideError
from conchdb.ingest.cohort import IDENTITY_CHUNK, content_identity, dicom_series_uid, discover


def _file(path: Path, content: bytes | str = b"") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = content.encode() if isinstance(content, str) else content
    path.write_bytes(data or path.name.encode())  # distinct content per name by default
    return path


def _dicom(path: Path, series_uid: str, explicit: bool = True) -> Path:
    """Just enough of a DICOM file: preamble, DICM, and a (0020,000E) element."""
    value = series_uid.encode()
    value += b"\x00" * (len(value) % 2)
    if explicit:
        element = b"\x20\x00\x0e\x00UI" + len(value).to_bytes(2, "little") + value
    else:
        element = b"\x20\x00\x0e\x00" + len(value).to_bytes(4, "little") + value
    return _file(path, b"\x00" * 128 + b"DICM" + b"\x08\x00\x16\x00UI\x04\x001.2\x00" + element + path.name.encode())


def test_recursive_discovery_ids_and_skipped(tmp_path: Path):
    _file(tmp_path / "b.svs")
    _file(tmp_path / "case 1" / "a.ndpi")
    _file(tmp_path / "case 1" / "deep" / "roi.PNG")
    _file(tmp_path / "notes.txt")
    _file(tmp_path / "manifest.csv")
    _file(tmp_path / ".hidden.svs")
    _file(tmp_path / ".cache" / "x.svs")
    cohort = discover(tmp_path)
    assert [s.id for s in cohort.slides] == ["b.svs", "case 1/a.ndpi", "case 1/deep/roi.PNG"]
    assert sorted(p.name for p in cohort.skipped) == ["manifest.csv", "notes.txt"]
    assert cohort.root == tmp_path.resolve()
    assert discover(tmp_path).slides == cohort.slides  # stable


def test_single_file(tmp_path: Path):
    path = _file(tmp_path / "sub" / "x.svs")
    cohort = discover(path)
    assert [s.id for s in cohort.slides] == ["x.svs"] and cohort.root == path.parent.resolve()
    with pytest.raises(SlideError, match="not a slide"):
        discover(_file(tmp_path / "x.txt"))
    with pytest.raises(SlideError, match="no such file or folder"):
        discover(tmp_path / "missing")


def test_real_dicom_pair_is_one_slide(slides_dir: Path, tmp_path: Path):
    for name in ("boxes_0.dcm", "boxes_1.dcm", "cmu_small_region.svs"):
        shutil.copy(slides_dir / name, tmp_path / name)
    cohort = discover(tmp_path)
    assert [s.id for s in cohort.slides] == ["boxes_0.dcm", "cmu_small_region.svs"]
    assert [f.name for f in cohort.slides[0].files] == ["boxes_0.dcm", "boxes_1.dcm"]
    series = "1.3.6.1.4.1.5962.99.1.1747645553.419656796.1689669825649.4.0"  # as OpenSlide reports it
    assert dicom_series_uid(slides_dir / "boxes_1.dcm") == series


def test_dicom_series_are_told_apart(tmp_path: Path):
    _dicom(tmp_path / "s" / "a1.dcm", "1.2.3")
    _dicom(tmp_path / "s" / "a2.dcm", "1.2.3", explicit=False)
    _dicom(tmp_path / "s" / "b1.dcm", "1.2.4")
    _dicom(tmp_path / "t" / "c1.dcm", "1.2.3")  # same series uid, other folder: another slide
    cohort = discover(tmp_path)
    assert {s.id: [f.name for f in s.files] for s in cohort.slides} == {
        "s/a1.dcm": ["a1.dcm", "a2.dcm"], "s/b1.dcm": ["b1.dcm"], "t/c1.dcm": ["c1.dcm"],
    }


def test_mirax_data_folder_is_part_of_the_slide(tmp_path: Path):
    _file(tmp_path / "slide.mrxs")
    ini = _file(tmp_path / "slide" / "Slidedat.ini", "[GENERAL]\nSLIDE_ID = 1\n")
    _file(tmp_path / "slide" / "Data0000.dat")
    _file(tmp_path / "slide" / "Index.dat")
    cohort = discover(tmp_path)
    assert [s.id for s in cohort.slides] == ["slide.mrxs"] and not cohort.skipped
    before = cohort.slides[0].identity
    ini.write_text("[GENERAL]\nSLIDE_ID = 2\n")  # rescanned: the .mrxs itself is unchanged
    assert discover(tmp_path).slides[0].identity != before


def test_vms_images_are_not_slides(tmp_path: Path):
    _file(tmp_path / "h.vms", "[Virtual Microscope Specimen]\nImageFile=h.jpg\nImageFile(1,0)=h_1.jpg\nMapFile=h.map\n")
    for name in ("h.jpg", "h_1.jpg", "h.map"):
        _file(tmp_path / name)
    _file(tmp_path / "photo.jpg")
    cohort = discover(tmp_path)
    assert [s.id for s in cohort.slides] == ["h.vms", "photo.jpg"] and not cohort.skipped


def test_identity_notices_a_replaced_file(tmp_path: Path):
    path = tmp_path / "big.svs"
    data = bytearray(3 * IDENTITY_CHUNK)
    path.write_bytes(bytes(data))
    first = content_identity(path)
    assert content_identity(path) == first and first.startswith(f"{3 * IDENTITY_CHUNK}-")
    data[-1] = 1  # same size, last MiB changed
    path.write_bytes(bytes(data))
    assert content_identity(path) != first


def test_duplicates_are_refused_before_any_work(tmp_path: Path):
    _file(tmp_path / "a" / "x.svs", b"same bytes")
    _file(tmp_path / "b" / "y.svs", b"same bytes")
    with pytest.raises(SlideError, match="identical content") as caught:
        discover(tmp_path)
    assert "x.svs" in caught.value.message and "y.svs" in caught.value.message
    shutil.rmtree(tmp_path / "b")
    _file(tmp_path / "a" / "X.svs", b"other bytes")
    with pytest.raises(SlideError, match="differ only in case"):
        discover(tmp_path)
