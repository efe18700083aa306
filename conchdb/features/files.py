"""TRIDENT and CLAM feature files: find them, read and check them, and write TRIDENT's layout.

What the two tools write (read from their writer code):

- TRIDENT (`<job>/<mag>x_<px>px_<overlap>px_overlap/features_conch_v1/<slide>.h5`): a
  `features` dataset (N, 512) with attributes `name`, `savetodir`, and a `coords` dataset
  (N, 2) of level-0 top-left corners whose attributes describe the patching:
  `patch_size` (pixels at the target magnification), `patch_size_level0`,
  `level0_magnification`, `target_magnification`, `overlap` (pixels at the target
  magnification), `name`, `savetodir`, and in newer versions `level0_width`,
  `level0_height`. `None` values are stored as the string "None", dicts as JSON.
- CLAM (`<feat_dir>/h5_files/<slide>.h5` and `<feat_dir>/pt_files/<slide>.pt`): the h5 file
  holds `features` and `coords` without attributes; the `.pt` file is the features tensor
  alone. The patching attributes (`patch_size` at `patch_level`, `downsample` of that level,
  `level_dim`, `name`) are on `coords` of the patch file `create_patches_fp.py` wrote,
  `<patch_dir>/patches/<slide>.h5`, whose coordinates are in the same order.

Both store CONCH v1's pre-projection image features (`proj_contrast=False,
normalize=False`); anything else is refused here, before a model or store is touched.
This module knows no model and no store.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conchdb.errors import ConchdbError

FORMATS = ("trident", "clam")
TRIDENT_FOLDER = "features_conch_v1"
CLAM_H5, CLAM_PT, CLAM_PATCHES = "h5_files", "pt_files", "patches"
UNIT_NORM_TOLERANCE = 1e-3
"""Rows whose L2 norms all lie this close to 1 are already-normalized projections: CONCH's
pre-projection features are far longer (about 20 on the goldens)."""

_OTHER_ENCODERS = {
    768: "the width of CONCH v1.5 and other ViT-B encoders",
    1024: "the width of UNI and other ViT-L encoders",
    1536: "the width of UNI2-h and other ViT-H encoders",
}


class FeatureFileError(ConchdbError):
    """A feature file cannot be imported; the message names the file and what was found."""


@dataclass
class FeatureFile:
    """One slide's pre-projection features and where each row's patch lies.

    `coords` are level-0 top-left corners; `patch_px` is the patch side as the encoder saw
    it (at the tiling's resolution), `patch_size_level0` the same square in level-0 pixels
    (None when only the slide's pyramid can tell: CLAM patches at a level > 0 without a
    recorded downsample). Magnifications are the tool's own labels, kept as recorded.
    """

    path: Path
    name: str
    source: str
    features: np.ndarray
    coords: np.ndarray
    patch_px: int
    patch_size_level0: int | None
    magnification: float | None = None
    level0_magnification: float | None = None
    overlap: int = 0
    patch_level: int | None = None
    level0_size: tuple[int, int] | None = None
    attrs: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.features.shape[0])

    @property
    def stride_px(self) -> int:
        return self.patch_px - self.overlap


def attr_value(value: Any) -> Any:
    """An HDF5 attribute as a plain Python value: numpy scalars and arrays unwrapped, bytes
    decoded, TRIDENT's "None" strings as None and its JSON-encoded dicts parsed."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray):
        return [attr_value(v) for v in value.tolist()] if value.ndim else attr_value(value.item())
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, str):
        if value == "None":
            return None
        if value.startswith("{") and value.endswith("}"):
            try:
                return json.loads(value)
            except ValueError:
                return value
    return value


def _attrs(dataset: Any) -> dict[str, Any]:
    return {key: attr_value(dataset.attrs[key]) for key in dataset.attrs}


# -- finding files --------------------------------------------------------------------------


def find_feature_files(root: str | Path, fmt: str) -> tuple[list[Path], list[Path]]:
    """The feature files under `root` in the tool's layout, by slide name, and the other
    files passed over.

    TRIDENT: the `.h5` files of every `features_conch_v1` folder at or under `root`, else
    those directly in `root`. CLAM: `root/h5_files/*.h5`, plus `root/pt_files/*.pt` for
    slides without an h5 file; or the `.h5`/`.pt` files directly in `root`.
    """
    if fmt not in FORMATS:
        raise FeatureFileError(f"unknown feature format {fmt!r}", fix="use trident or clam", parameter="fmt")
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise FeatureFileError(
            f"{root}: no such folder", fix="give the folder the feature files were written to", parameter="path"
        )
    if fmt == "trident":
        folders = [root] if root.name == TRIDENT_FOLDER else sorted(p for p in root.rglob(TRIDENT_FOLDER) if p.is_dir())
        folders = folders or [root]
        files = [f for folder in folders for f in sorted(folder.glob("*.h5"))]
        skipped = [f for folder in folders for f in sorted(folder.iterdir()) if f.is_file() and f.suffix != ".h5"]
        return files, skipped
    h5_dir = root / CLAM_H5 if (root / CLAM_H5).is_dir() else root
    pt_dir = root / CLAM_PT if (root / CLAM_PT).is_dir() else root
    h5 = sorted(h5_dir.glob("*.h5"))
    names = {f.stem for f in h5}
    pt = sorted(f for f in pt_dir.glob("*.pt") if f.stem not in names)
    skipped = [
        f for folder in {h5_dir, pt_dir} for f in sorted(folder.iterdir())
        if f.is_file() and f.suffix not in (".h5", ".pt")
    ]
    return sorted(h5 + pt, key=lambda f: f.stem), skipped


def clam_patch_file(feature_file: Path, patches: Path | None) -> Path | None:
    """The `create_patches_fp.py` output that holds a CLAM slide's patching attributes:
    `patches/<slide>.h5` in `patches` (or in it directly), else beside or above the
    feature folder."""
    name = f"{feature_file.stem}.h5"
    folder = feature_file.parent
    candidates = []
    if patches is not None:
        candidates += [patches / CLAM_PATCHES / name, patches / name]
    candidates += [folder.parent / CLAM_PATCHES / name, folder.parent.parent / CLAM_PATCHES / name]
    return next((c for c in candidates if c.is_file() and c.resolve() != feature_file.resolve()), None)


# -- reading --------------------------------------------------------------------------------


def _read_h5(path: Path) -> tuple[np.ndarray | None, np.ndarray | None, dict[str, Any]]:
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            features = np.asarray(fh["features"][()]) if "features" in fh else None
            coords = np.asarray(fh["coords"][()]) if "coords" in fh else None
            attrs = _attrs(fh["coords"]) if "coords" in fh else {}
    except (OSError, KeyError, ValueError, RuntimeError) as exc:
        raise FeatureFileError(
            f"{path}: cannot read the HDF5 file ({exc})",
            fix="the file is corrupt or truncated; extract this slide's features again",
        ) from None
    return features, coords, attrs


def _read_pt(path: Path) -> np.ndarray:
    import torch

    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged pickle or zip
        raise FeatureFileError(
            f"{path}: cannot read the .pt file ({type(exc).__name__}: {exc})",
            fix="the file is corrupt or truncated; extract this slide's features again",
        ) from None
    if not isinstance(data, torch.Tensor):
        raise FeatureFileError(
            f"{path}: holds a {type(data).__name__}, not a features tensor",
            fix="give the pt_files that CLAM's extract_features_fp.py writes",
        )
    return data.float().numpy()


def check_features(path: Path, features: np.ndarray | None, coords: np.ndarray | None, dim: int) -> None:
    """Refuse what are not CONCH v1 pre-projection features with one patch corner per row."""
    if features is None:
        raise FeatureFileError(f"{path}: no 'features' dataset", fix="give feature files written by TRIDENT or CLAM")
    if coords is None:
        raise FeatureFileError(
            f"{path}: no 'coords' dataset", fix="give the h5 files that hold features and coords together"
        )
    if features.ndim != 2:
        raise FeatureFileError(
            f"{path}: 'features' has shape {features.shape}, not (patches, {dim})",
            fix="give patch features (one row per patch), not slide-level features",
        )
    width = features.shape[1]
    if width != dim:
        known = f" ({_OTHER_ENCODERS[width]})" if width in _OTHER_ENCODERS else ""
        raise FeatureFileError(
            f"{path}: features are {width}-d{known}; CONCH v1 pre-projection features are {dim}-d",
            fix=f"import the {TRIDENT_FOLDER} features (TRIDENT) or conch_v1 features (CLAM)",
        )
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise FeatureFileError(
            f"{path}: 'coords' has shape {coords.shape}, not (patches, 2)", fix="extract this slide's features again"
        )
    if coords.shape[0] != features.shape[0]:
        raise FeatureFileError(
            f"{path}: {features.shape[0]} feature rows but {coords.shape[0]} coordinates",
            fix="the features and coordinates come from different runs; extract this slide's features again",
        )
    if not np.issubdtype(features.dtype, np.floating) or not np.isfinite(features).all():
        raise FeatureFileError(
            f"{path}: features are not finite floating-point numbers ({features.dtype})",
            fix="extract this slide's features again",
        )
    if len(coords) and (not np.all(np.equal(np.mod(coords, 1), 0)) or coords.min() < 0):
        raise FeatureFileError(
            f"{path}: coordinates are not non-negative whole level-0 pixels",
            fix="give the coords the tool wrote (level-0 top-left corners)",
        )
    norms = np.linalg.norm(features.astype(np.float64), axis=1)
    if len(norms) and np.all(np.abs(norms - 1.0) < UNIT_NORM_TOLERANCE):
        raise FeatureFileError(
            f"{path}: every feature row has length 1: these are already projected and normalized embeddings",
            fix="import the pre-projection features (CONCH's encode_image with proj_contrast=False, "
            "normalize=False), which is what TRIDENT's conch_v1 and CLAM's conch_v1 write",
        )


def _int_attr(path: Path, attrs: Mapping[str, Any], key: str) -> int | None:
    value = attrs.get(key)
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise FeatureFileError(f"{path}: attribute {key}={value!r} is not a number") from None
    if number <= 0 and key != "overlap" and key != "patch_level":
        raise FeatureFileError(f"{path}: attribute {key}={value!r} must be positive")
    return int(round(number))


def _float_attr(attrs: Mapping[str, Any], key: str) -> float | None:
    value = attrs.get(key)
    try:
        return float(value) if value is not None and float(value) > 0 else None
    except (TypeError, ValueError):
        return None


def _geometry(path: Path, source: str, attrs: Mapping[str, Any]) -> dict[str, Any]:
    """Patch size, level-0 size, magnifications and overlap from either tool's attributes."""
    patch_px = _int_attr(path, attrs, "patch_size")
    if patch_px is None:
        where = "" if source == "trident" else " (nor in a patches/ file from create_patches_fp.py)"
        raise FeatureFileError(
            f"{path}: 'coords' has no patch_size attribute{where}",
            fix="give files written by TRIDENT, or for CLAM the folder of its patches/ files",
        )
    level0 = _int_attr(path, attrs, "patch_size_level0")
    magnification = _float_attr(attrs, "target_magnification")
    level0_mag = _float_attr(attrs, "level0_magnification")
    patch_level = _int_attr(path, attrs, "patch_level")
    if level0 is None and magnification and level0_mag:
        level0 = int(patch_px * level0_mag // magnification)
    if level0 is None and patch_level is not None:
        downsample = attrs.get("downsample")
        factor = downsample[0] if isinstance(downsample, list) and downsample else downsample
        if isinstance(factor, (int, float)) and factor > 0:
            level0 = int(round(patch_px * float(factor)))
        elif patch_level == 0:
            level0 = patch_px
    overlap = _int_attr(path, attrs, "overlap") or 0
    if not 0 <= overlap < patch_px:
        raise FeatureFileError(f"{path}: overlap {overlap} is not between 0 and the patch size {patch_px}")
    width, height = _int_attr(path, attrs, "level0_width"), _int_attr(path, attrs, "level0_height")
    return {
        "patch_px": patch_px,
        "patch_size_level0": level0,
        "magnification": magnification,
        "level0_magnification": level0_mag,
        "overlap": overlap,
        "patch_level": patch_level,
        "level0_size": (width, height) if width and height else None,
    }


def read_feature_file(path: str | Path, fmt: str, dim: int = 512, patches: Path | None = None) -> FeatureFile:
    """Read and check one slide's feature file; `FeatureFileError` names the file and the problem."""
    path = Path(path)
    if path.suffix == ".pt":
        features: np.ndarray | None = _read_pt(path)
        coords, attrs = None, {}
    else:
        features, coords, attrs = _read_h5(path)
    if fmt == "clam" and "patch_size" not in attrs:
        patch_file = clam_patch_file(path, patches)
        if patch_file is not None:
            _, patch_coords, attrs = _read_h5(patch_file)
            if coords is None:
                coords = patch_coords
    if features is not None and coords is None and path.suffix == ".pt":
        raise FeatureFileError(
            f"{path}: no coordinates for these features (no h5_files/{path.stem}.h5 and no patches/{path.stem}.h5)",
            fix="give the CLAM folder that holds h5_files/, or the folder of create_patches_fp.py's patches/",
        )
    check_features(path, features, coords, dim)
    assert features is not None and coords is not None
    name = str(attrs.get("name") or path.stem) if fmt == "trident" else path.stem
    return FeatureFile(
        path=path,
        name=name,
        source=fmt,
        features=features.astype(np.float32, copy=False),
        coords=coords.astype(np.int64),
        attrs=dict(attrs),
        **_geometry(path, fmt, attrs),
    )


# -- writing --------------------------------------------------------------------------------


def write_trident(
    path: str | Path,
    features: np.ndarray,
    coords: np.ndarray,
    coords_attrs: Mapping[str, Any],
    features_attrs: Mapping[str, Any] | None = None,
) -> Path:
    """Write one slide in TRIDENT's layout: `features` and `coords` with their attributes
    (None as "None" and dicts as JSON, as TRIDENT stores them), so its readers take it."""
    import h5py

    path = Path(path)
    with h5py.File(path, "w") as fh:
        feats = fh.create_dataset("features", data=np.asarray(features, dtype=np.float32))
        corners = fh.create_dataset("coords", data=np.asarray(coords, dtype=np.int64).reshape(-1, 2))
        for dataset, attrs in ((feats, features_attrs or {}), (corners, coords_attrs)):
            for key, value in attrs.items():
                dataset.attrs[key] = (
                    "None" if value is None else json.dumps(value) if isinstance(value, dict) else value
                )
    return path
