"""Feature-file fixtures: files written the way TRIDENT and CLAM write them, and models.

The writers here follow the tools' own writer code (TRIDENT's `save_h5` with the patching
attributes on `coords`; CLAM's `extract_features_fp.py`, whose h5 file has no attributes,
beside `create_patches_fp.py`'s patch file), independently of `conchdb.features.files`,
so that a reader which only round-trips its own writer would fail.
"""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from conchdb.model.checkpoint import fit_state_dict
from conchdb.model.conch import ConchModel
from conchdb.model.config import ConchConfig
from conchdb.model.encoder import Encoder
from tests.search.conftest import checkpoint, encoder  # noqa: F401  (fixtures shared with search tests)


def _trident_attr(value):
    return "None" if value is None else json.dumps(value) if isinstance(value, dict) else value


def write_trident_file(
    folder: Path,
    name: str,
    features: np.ndarray,
    coords: np.ndarray,
    *,
    patch_size: int = 512,
    target_mag: int = 20,
    level0_mag: int | None = 40,
    overlap: int = 0,
    width: int | None = None,
    height: int | None = None,
) -> Path:
    """`<folder>/features_conch_v1/<name>.h5` as TRIDENT's extract_patch_features writes it."""
    out = folder / "features_conch_v1"
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.h5"
    coords_attrs = {
        "patch_size": patch_size,
        "patch_size_level0": None if level0_mag is None else patch_size * level0_mag // target_mag,
        "level0_magnification": level0_mag,
        "target_magnification": target_mag,
        "overlap": overlap,
        "name": name,
        "savetodir": str(folder),
        "level0_width": width,
        "level0_height": height,
    }
    with h5py.File(path, "w") as fh:
        for key, value, attrs in (
            ("features", features, {"name": name, "savetodir": str(out)}),
            ("coords", coords, coords_attrs),
        ):
            dset = fh.create_dataset(key, shape=value.shape, maxshape=(None, *value.shape[1:]),
                                     chunks=(1, *value.shape[1:]), dtype=value.dtype)
            dset[:] = value
            for attr_key, attr_value in attrs.items():
                dset.attrs[attr_key] = _trident_attr(attr_value)
    return path


def write_clam_files(
    folder: Path, name: str, features: np.ndarray, coords: np.ndarray, *, patch_size: int = 256, h5: bool = True
) -> Path:
    """CLAM's outputs for one slide: `patches/<name>.h5` (coords with the patching attributes,
    level 0), `feats/h5_files/<name>.h5` (features and coords, no attributes) and
    `feats/pt_files/<name>.pt` (the features tensor). Returns the `feats` folder."""
    feats = folder / "feats"
    for sub in ("patches", "feats/h5_files", "feats/pt_files"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    with h5py.File(folder / "patches" / f"{name}.h5", "w") as fh:
        dset = fh.create_dataset("coords", data=coords)
        for key, value in {"patch_size": patch_size, "patch_level": 0, "downsample": np.array([1.0, 1.0]),
                           "downsampled_level_dim": np.array([4096, 4096]), "level_dim": np.array([4096, 4096]),
                           "name": name, "save_path": str(folder / "patches")}.items():
            dset.attrs[key] = value
    if h5:
        with h5py.File(feats / "h5_files" / f"{name}.h5", "w") as fh:
            fh.create_dataset("features", data=features.astype(np.float32))
            fh.create_dataset("coords", data=coords.astype(np.int32))
    torch.save(torch.from_numpy(features.astype(np.float32)), feats / "pt_files" / f"{name}.pt")
    return feats


@pytest.fixture(scope="session")
def golden(conch_assets: Path) -> dict[str, np.ndarray]:
    with np.load(conch_assets / "golden" / "golden.npz") as data:
        return {key: data[key] for key in data.files}


@pytest.fixture(scope="session")
def golden_encoder(synthetic_state) -> Encoder:
    """CONCH with the synthetic checkpoint's weights, which made the goldens."""
    model = ConchModel(ConchConfig())
    state = fit_state_dict(synthetic_state, model, "synthetic")
    model.load_state_dict(state)
    return Encoder.from_model(model, device="cpu", precision="fp32")


def grid_coords(n: int, step: int = 512, columns: int = 3) -> np.ndarray:
    return np.array([((i % columns) * step, (i // columns) * step) for i in range(n)], dtype=np.int64)
