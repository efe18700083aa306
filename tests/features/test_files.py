"""Reading TRIDENT and CLAM feature files, and refusing what is not CONCH v1 pre-projection features."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from conchdb.features.files import FeatureFileError, find_feature_files, read_feature_file, write_trident
from tests.features.conftest import grid_coords, write_clam_files, write_trident_file

RNG = np.random.default_rng(7)


def raw(n: int, dim: int = 512) -> np.ndarray:
    return (RNG.standard_normal((n, dim)) * 1.0).astype(np.float32)


def test_trident_file_geometry_is_read_from_its_coords_attributes(tmp_path):
    write_trident_file(tmp_path, "slide_a", raw(5), grid_coords(5, 1024), patch_size=512, target_mag=20,
                       level0_mag=40, overlap=64, width=4000, height=3000)
    (path,), _ = find_feature_files(tmp_path, "trident")
    got = read_feature_file(path, "trident")
    assert (got.name, got.source, got.patch_px, got.patch_size_level0) == ("slide_a", "trident", 512, 1024)
    assert (got.magnification, got.level0_magnification, got.overlap, got.stride_px) == (20, 40, 64, 448)
    assert got.level0_size == (4000, 3000)
    assert got.coords.tolist() == grid_coords(5, 1024).tolist() and got.features.dtype == np.float32


def test_trident_none_attributes_stay_unknown(tmp_path):
    write_trident_file(tmp_path, "s", raw(2), grid_coords(2), level0_mag=None)
    (path,), _ = find_feature_files(tmp_path, "trident")
    got = read_feature_file(path, "trident")
    assert got.level0_magnification is None and got.patch_size_level0 is None and got.level0_size is None


def test_clam_h5_gets_patch_size_from_the_patches_file_and_pt_needs_coords(tmp_path):
    feats = write_clam_files(tmp_path, "a", raw(4), grid_coords(4, 256), patch_size=256)
    write_clam_files(tmp_path, "b", raw(3), grid_coords(3, 256), patch_size=256, h5=False)
    files, _ = find_feature_files(feats, "clam")
    assert [f.name for f in files] == ["a.h5", "b.pt"]
    a, b = (read_feature_file(f, "clam") for f in files)
    assert (a.patch_px, a.patch_size_level0, a.patch_level, a.magnification) == (256, 256, 0, None)
    assert b.coords.tolist() == grid_coords(3, 256).tolist() and b.features.shape == (3, 512)


def test_clam_without_its_patches_file_is_refused_with_the_fix(tmp_path):
    feats = write_clam_files(tmp_path, "a", raw(2), grid_coords(2, 256))
    (tmp_path / "patches" / "a.h5").unlink()
    (path,), _ = find_feature_files(feats, "clam")
    with pytest.raises(FeatureFileError, match="no patch_size attribute") as err:
        read_feature_file(path, "clam")
    assert "patches" in err.value.fix


@pytest.mark.parametrize(
    ("make", "words"),
    [
        (lambda p: write_trident_file(p, "w768", raw(3, 768), grid_coords(3)), r"768-d \(the width of CONCH v1\.5"),
        (lambda p: write_trident_file(p, "w1024", raw(3, 1024), grid_coords(3)), r"1024-d \(the width of UNI"),
        (lambda p: write_trident_file(p, "unit", (lambda f: f / np.linalg.norm(f, axis=1, keepdims=True))(raw(4)),
                                      grid_coords(4)), "already projected and normalized"),
        (lambda p: write_trident_file(p, "short", raw(4), grid_coords(3)), "4 feature rows but 3 coordinates"),
        (lambda p: write_trident_file(p, "flat", raw(1)[0], grid_coords(1)), r"shape \(512,\)"),
        (lambda p: write_trident_file(p, "neg", raw(2), -grid_coords(2) - 1), "non-negative whole"),
    ],
)
def test_files_that_are_not_conch_v1_features_are_refused_naming_the_file(tmp_path, make, words):
    path = make(tmp_path)
    with pytest.raises(FeatureFileError, match=words) as err:
        read_feature_file(path, "trident")
    assert str(path) in err.value.message and err.value.fix


def test_missing_dataset_and_truncated_file_are_refused(tmp_path):
    missing = tmp_path / "missing.h5"
    with h5py.File(missing, "w") as fh:
        fh.create_dataset("coords", data=grid_coords(2))
    with pytest.raises(FeatureFileError, match="no 'features' dataset"):
        read_feature_file(missing, "trident")
    good = write_trident_file(tmp_path, "cut", raw(50), grid_coords(50))
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])
    with pytest.raises(FeatureFileError, match="cannot read the HDF5 file") as err:
        read_feature_file(good, "trident")
    assert "truncated" in err.value.fix


def test_written_trident_files_read_back_with_the_same_attributes(tmp_path):
    feats, coords = raw(3), grid_coords(3)
    path = write_trident(tmp_path / "x.h5", feats, coords, {"patch_size": 512, "patch_size_level0": 1024,
                         "level0_magnification": 40.0, "target_magnification": 20.0, "overlap": 0, "name": "x",
                         "level0_width": None})
    with h5py.File(path) as fh:
        assert fh["coords"].attrs["level0_width"] == "None"
    got = read_feature_file(path, "trident")
    assert np.array_equal(got.features, feats) and got.patch_size_level0 == 1024 and got.level0_size is None
