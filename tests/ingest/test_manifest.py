"""Manifest reading: joining rows to slides, per-column types, and errors with file, line, column."""

from __future__ import annotations

from pathlib import Path

import pytest

from conchdb.errors import ManifestError
from conchdb.ingest.cohort import Cohort, discover
from conchdb.ingest.manifest import read_manifest


@pytest.fixture
def cohort(tmp_path: Path) -> Cohort:
    for relative in ("TCGA-01.svs", "site b/TCGA-02.ndpi", "site b/deep/roi.png", "other/roi.png"):
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(relative.encode())
    return discover(tmp_path)


def _manifest(cohort: Cohort, text: str, name: str = "meta.csv") -> Path:
    path = cohort.root / name
    path.write_text(text, encoding="utf-8")
    return path


def test_rows_join_by_id_path_name_or_stem(cohort: Cohort):
    path = _manifest(cohort, "slide,grade\nTCGA-01,1\nsite b\\TCGA-02.ndpi,2\n./other/roi.png,3\nnowhere.svs,4\n")
    manifest = read_manifest(path, cohort)
    assert {k: r.payload["grade"] for k, r in manifest.rows.items()} == {
        "TCGA-01.svs": 1, "site b/TCGA-02.ndpi": 2, "other/roi.png": 3,
    }
    assert manifest.unmatched == ((5, "nowhere.svs"),)
    assert manifest.missing == ("site b/deep/roi.png",)
    assert manifest.rows["TCGA-01.svs"].line == 2


def test_types_are_inferred_per_column(cohort: Cohort):
    text = (
        "Slide,grade,score,her2,site,patient,note\n"
        "TCGA-01.svs,2,0.5,true,breast,007,\n"
        'TCGA-02.ndpi,3,1,FALSE,"lung, left",012,seen\n'
    )
    manifest = read_manifest(_manifest(cohort, text), cohort)
    assert manifest.columns == {"grade": "int", "score": "float", "her2": "bool", "site": "string",
                                "patient": "string", "note": "string"}
    assert manifest.payload_for("TCGA-01.svs") == {"grade": 2, "score": 0.5, "her2": True, "site": "breast",
                                                   "patient": "007"}  # empty cell: absent
    assert manifest.payload_for("site b/TCGA-02.ndpi")["site"] == "lung, left"
    assert manifest.payload_for("site b/TCGA-02.ndpi")["score"] == 1.0
    assert manifest.payload_for("no such slide") == {}


def test_mpp_column_overrides_and_is_not_payload(cohort: Cohort):
    manifest = read_manifest(_manifest(cohort, "slide;mpp;stain\nTCGA-01.svs;0.25;HE\nother/roi.png;;IHC\n"), cohort)
    assert manifest.mpp_for("TCGA-01.svs") == 0.25 and manifest.mpp_for("other/roi.png") is None
    assert "mpp" not in manifest.columns and manifest.payload_for("TCGA-01.svs") == {"stain": "HE"}


def test_default_manifest_at_the_root(cohort: Cohort):
    assert read_manifest(None, cohort).rows == {}
    _manifest(cohort, "\ufeffslide,x\nTCGA-01.svs,1\n", name="manifest.csv")  # with an Excel BOM
    assert read_manifest(None, cohort).payload_for("TCGA-01.svs") == {"x": 1}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name,grade\nTCGA-01.svs,1\n", r"meta\.csv, line 1: no 'slide' column"),
        ("slide,mpp\nTCGA-01.svs,0.25\nsite b/TCGA-02.ndpi,40\n", r"line 3, column 2 \('mpp'\): '40' is not a pixel"),
        ("slide,mpp\nTCGA-01.svs,abc\n", r"line 2, column 2 \('mpp'\)"),
        ("slide,g\nTCGA-01.svs,1\nTCGA-01,2\n", r"lines 2 and 3: two rows for slide 'TCGA-01.svs'"),
        ("slide,g\nroi.png,1\n", r"line 2, column 'slide': 'roi.png' matches several slides"),
        ('slide,g\nTCGA-01.svs,"unclosed\n', r"line \d+: unparsable CSV"),
        ("slide,g\nTCGA-01.svs,1,2\n", r"line 2: 3 cells but 2 columns"),
        ("slide,g,G\n", r"line 1: column 'G' appears twice"),
        ("slide,,g\n", r"line 1, column 2: empty column name"),
        ("slide,g\n,1\n", r"line 2, column 1 \('slide'\): empty"),
        ("", r"the manifest is empty"),
    ],
)
def test_malformed_manifests_name_file_line_and_column(cohort: Cohort, text: str, message: str):
    path = _manifest(cohort, text)
    with pytest.raises(ManifestError, match=message) as caught:
        read_manifest(path, cohort)
    assert str(path) in caught.value.message and caught.value.fix and caught.value.exit_code == 2


def test_unreadable_manifest(cohort: Cohort):
    path = cohort.root / "latin1.csv"
    path.write_bytes("slide,site\nTCGA-01.svs,Bogot\xe1\n".encode("latin-1"))
    with pytest.raises(ManifestError, match="not UTF-8"):
        read_manifest(path, cohort)
    with pytest.raises(ManifestError, match="cannot read"):
        read_manifest(cohort.root / "missing.csv", cohort)
