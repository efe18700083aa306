"""Export stored tiles as TRIDENT feature files, one `.h5` per slide, for MIL training.

Each file holds `features` (the stored normalized projections, or with `raw` the
pre-projection features an import kept) and `coords` (level-0 top-left corners), with the
attributes TRIDENT writes on `coords` (`patch_size`, `patch_size_level0`,
`level0_magnification`, `target_magnification`, `overlap`, `name`, `savetodir`,
`level0_width`, `level0_height`), so MIL code written for TRIDENT reads them unchanged.

Magnifications: an imported slide keeps the ones its tool recorded. For a slide ingested
from pixels, which has a pixel size but no magnification, they are written in TRIDENT's
own convention (10x = 1 µm/px, as TRIDENT turns magnifications into pixel sizes), and the
exact `mpp` and `target_mpp` are written beside them. Rows are in the order the raw
features were imported in, else by position (top to bottom, left to right).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conchdb.archive import SlideCatalog, scope
from conchdb.archive.records import select
from conchdb.catalog import SlideStatus
from conchdb.errors import ConchdbError, QueryError
from conchdb.features.files import FeatureFileError, read_feature_file, write_trident
from conchdb.store import Filter, Hit, Store

EXPORT_FORMATS = ("trident",)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


@dataclass
class ExportedSlide:
    slide_id: str
    file: str | None = None
    tiles: int = 0
    error: str | None = None


@dataclass
class ExportSummary:
    """What `export_features` wrote; `to_dict()` is the `--json` output."""

    folder: Path
    raw: bool
    slides: list[ExportedSlide] = field(default_factory=list)

    @property
    def failed(self) -> list[ExportedSlide]:
        return [s for s in self.slides if s.error]

    @property
    def exit_code(self) -> int:
        return 3 if self.failed else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "features": "pre-projection" if self.raw else "normalized projections",
            "written": [{"slide_id": s.slide_id, "file": s.file, "tiles": s.tiles} for s in self.slides if s.file],
            "failed": [{"slide_id": s.slide_id, "error": s.error} for s in self.failed],
        }


def slide_name(slide_id: str) -> str:
    """The file name TRIDENT would give the slide: its file name without the extension."""
    name = Path(str(slide_id)).name
    stem = name[: -len(Path(name).suffix)] if Path(name).suffix else name
    return _UNSAFE.sub("_", stem).strip("_") or "slide"


def _records(store: Store, collection: str, slide_ids: Sequence[str] | None) -> list[dict[str, Any]]:
    """The finished slide records to export: those of the given ids, or all of them."""
    catalog = SlideCatalog(store, collection)
    if not catalog.has_records():
        raise ConchdbError(
            f"collection '{collection}' in {store.location} has no slide records",
            fix="ingest or import slides into it first, or name the collection that holds them",
            parameter="collection",
        )
    return select(catalog, status=SlideStatus.DONE.value, slide_ids=slide_ids or ())


def _coords_attrs(record: dict[str, Any], tile: dict[str, Any], name: str, folder: Path) -> dict[str, Any]:
    mpp, target_mpp = record.get("mpp"), record.get("target_mpp")
    target_mag = record.get("magnification") or (10.0 / target_mpp if target_mpp else None)
    level0_mag = record.get("level0_magnification") or (10.0 / mpp if mpp else None)
    attrs = {
        "patch_size": int(tile.get("tile_px") or record.get("tile_px") or tile["size"]),
        "patch_size_level0": int(tile["size"]),
        "level0_magnification": level0_mag,
        "target_magnification": target_mag,
        "overlap": int(record.get("overlap") or 0),
        "name": name,
        "savetodir": str(folder),
        "level0_width": record.get("width"),
        "level0_height": record.get("height"),
        "mpp": mpp,
        "target_mpp": target_mpp,
    }
    return attrs


def _raw_rows(record: dict[str, Any], coords: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The kept pre-projection features of these tiles, in the order they were imported."""
    path = record.get("raw_features")
    if not path:
        raise FeatureFileError(
            f"no pre-projection features are kept for slide '{record.get('slide_id')}' "
            f"(tiling {record.get('tiling')})",
            fix="they exist only for slides imported from TRIDENT or CLAM files; export the projections instead",
        )
    kept = read_feature_file(path, "trident", _width(path))
    index = {(int(x), int(y)): i for i, (x, y) in enumerate(kept.coords)}
    wanted = {(int(x), int(y)) for x, y in coords}
    rows = [i for (x, y), i in index.items() if (x, y) in wanted]
    rows.sort()
    return kept.features[rows], kept.coords[rows]


def _width(path: str) -> int:
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            return int(fh["features"].shape[1])
    except (OSError, KeyError, IndexError) as exc:
        raise FeatureFileError(f"{path}: cannot read the kept pre-projection features ({exc})",
                               fix="import the slide's feature file again") from None


def _in_scope(record: dict[str, Any], where: Filter | None) -> bool:
    """Whether a filter's equality conditions on the fields a record shares with its tiles
    (tiling, cohort) keep the slide at all."""
    return not where or all(
        record.get(c.field) == c.value for c in where.must if c.field in ("tiling", "cohort") and c.op == "eq"
    )


def _tiles(store: Store, collection: str, record: dict[str, Any], where: Filter | None) -> list[Hit]:
    tiles = list(store.scroll(collection, scope(record, *(where.must if where else ())), with_vectors=True))
    return sorted(tiles, key=lambda h: (int(h.payload["y"]), int(h.payload["x"])))


def export_features(
    store: Store,
    collection: str,
    out: str | Path,
    slide_ids: Sequence[str] | None = None,
    *,
    raw: bool = False,
    where: Filter | None = None,
    fmt: str = "trident",
) -> ExportSummary:
    """Write one TRIDENT `.h5` per finished slide (all, or `slide_ids`) into the folder `out`.

    `where` keeps only the tiles that match it; a slide none of whose tiles match is left
    out and reported. Two slide records that would give the same file name (one slide at
    two tilings, or two cohorts) are an error that asks for a narrower selection.
    """
    if fmt not in EXPORT_FORMATS:
        raise ConchdbError(
            f"unknown export format {fmt!r}", fix=f"use one of {', '.join(EXPORT_FORMATS)}", parameter="fmt"
        )
    folder = Path(out)
    records = [r for r in _records(store, collection, slide_ids) if _in_scope(r, where)]
    names: dict[str, dict[str, Any]] = {}
    for record in records:
        name = slide_name(str(record["slide_id"]))
        other = names.setdefault(name, record)
        if other is not record:
            raise QueryError(
                f"slides '{other['slide_id']}' ({other['cohort']}, tiling {other['tiling']}) and "
                f"'{record['slide_id']}' ({record['cohort']}, tiling {record['tiling']}) would both be {name}.h5",
                fix="export one tiling or cohort at a time: filter with tiling=KEY or cohort=NAME",
                parameter="where",
            )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        problem = f"cannot create the export folder {folder}: {exc}"
        raise ConchdbError(problem, fix="choose a writable folder", parameter="out") from None
    summary = ExportSummary(folder, raw)
    for name, record in names.items():
        done = ExportedSlide(str(record["slide_id"]))
        summary.slides.append(done)
        tiles = _tiles(store, collection, record, where)
        if not tiles:
            done.error = "no stored tiles" + (" match the filter" if where else "")
            continue
        coords = np.array([(int(t.payload["x"]), int(t.payload["y"])) for t in tiles], dtype=np.int64)
        try:
            if raw:
                features, coords = _raw_rows(record, coords)
            else:
                features = np.stack([np.asarray(t.vector, dtype=np.float32) for t in tiles])
            path = folder / f"{name}.h5"
            attrs = _coords_attrs(record, tiles[0].payload, name, folder)
            write_trident(path, features, coords, attrs, {
                "name": name, "savetodir": str(folder), "slide_id": str(record["slide_id"]),
                "embedding": "CONCH v1 pre-projection" if raw else "CONCH v1 proj_contrast, L2-normalized",
                "tiling": str(record["tiling"]), "cohort": str(record["cohort"]),
            })
        except FeatureFileError as exc:
            done.error = exc.message if not exc.fix else f"{exc.message} (fix: {exc.fix})"
            continue
        except OSError as exc:
            problem = f"cannot write {folder / (name + '.h5')}: {exc}"
            raise ConchdbError(problem, fix="choose a writable folder", parameter="out") from None
        done.file, done.tiles = str(path), len(features)
    return summary
