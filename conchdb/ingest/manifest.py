"""A cohort's CSV manifest: per-slide pixel sizes and metadata for the payload.

The `slide` column joins a row to a slide by its id (path relative to the cohort root),
by any relative path to it, by file name, or by file name without extension, or, for a
DICOM series, by its Series Instance UID or accession number, whichever is unambiguous in
the cohort. An `mpp` column overrides the slide's pixel size. Every
other column becomes payload, with one type per column (int, float, bool or string)
inferred from its non-empty cells, so a filter on `grade > 2` works for every slide;
empty cells are left out of the payload rather than stored as "".

Everything is checked before any slide is opened: a malformed manifest is an error that
names the file, the line and the column, and rows that name no slide, and slides without
a row, are reported.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from conchdb.errors import ManifestError
from conchdb.ingest.cohort import Cohort
from conchdb.slides.mpp import validate_override
from conchdb.tabular import ColumnType, read_table

DEFAULT_NAME = "manifest.csv"
SLIDE_COLUMN = "slide"
MPP_COLUMN = "mpp"


@dataclass(frozen=True)
class ManifestRow:
    """One manifest row joined to a slide."""

    line: int
    slide_id: str
    mpp: float | None
    payload: dict[str, Any]


@dataclass(frozen=True)
class Manifest:
    """Manifest rows by slide id, the payload columns' types, and what did not join."""

    path: Path | None
    rows: dict[str, ManifestRow] = field(default_factory=dict)
    columns: dict[str, ColumnType] = field(default_factory=dict)
    unmatched: tuple[tuple[int, str], ...] = ()
    missing: tuple[str, ...] = ()

    def mpp_for(self, slide_id: str) -> float | None:
        row = self.rows.get(slide_id)
        return row.mpp if row else None

    def payload_for(self, slide_id: str) -> dict[str, Any]:
        row = self.rows.get(slide_id)
        return dict(row.payload) if row else {}

    def labels_for(self, slide_id: str) -> dict[str, Any] | None:
        """The slide's values in this manifest, to bring a stored slide up to date with; None
        when there is no manifest or no row for it (its stored values are then kept)."""
        row = self.rows.get(slide_id) if self.path is not None else None
        return None if row is None else dict(row.payload)


def _normalise(value: str) -> str:
    return PurePosixPath(value.replace("\\", "/")).as_posix().removeprefix("./")


def _lookup(cohort: Cohort) -> dict[str, set[str]]:
    """Every name a slide can be called by in the `slide` column -> the slide ids it may mean."""
    names: dict[str, set[str]] = defaultdict(set)
    for slide in cohort.slides:
        names[slide.id].add(slide.id)
        for alias in slide.aliases:
            names[alias].add(slide.id)
        for file in slide.files:
            relative = file.relative_to(cohort.root).as_posix()
            for name in (relative, file.name, file.stem, str(file)):
                names[name].add(slide.id)
    return names


def _parse_mpp(path: Path, line: int, column: int, cell: str) -> float | None:
    if not cell:
        return None
    try:
        return validate_override(cell, f"{path}, line {line}, column {column} ('{MPP_COLUMN}')").mpp
    except ValueError as exc:
        raise ManifestError(
            str(exc), fix="give µm per level-0 pixel, or leave the cell empty", parameter="manifest"
        ) from None


def _resolve(path: Path, line: int, value: str, names: dict[str, set[str]]) -> str | None:
    ids = names.get(value) or names.get(_normalise(value))
    if not ids:
        return None
    if len(ids) > 1:
        raise ManifestError(
            f"{path}, line {line}, column '{SLIDE_COLUMN}': '{value}' matches several slides "
            f"({', '.join(sorted(ids))})",
            fix="use the slide's path relative to the cohort folder",
            parameter="manifest",
        )
    return next(iter(ids))


def read_manifest(path: str | Path | None, cohort: Cohort) -> Manifest:
    """Read and join a manifest to `cohort`; `path` None means `manifest.csv` at the cohort
    root if there is one, else an empty manifest. Raises `ManifestError` if malformed."""
    if path is None:
        default = cohort.root / DEFAULT_NAME
        if cohort.source is not None:  # a DICOMweb server has no folder to hold a manifest
            return Manifest(None, missing=tuple(s.id for s in cohort.slides))
        if not default.is_file():
            return Manifest(None, missing=tuple(s.id for s in cohort.slides))
        path = default
    path = Path(path)
    table = read_table(path, ManifestError, "manifest", "manifest")
    if table is None:
        raise ManifestError(
            f"{path}: the manifest is empty", fix="add a header line with a 'slide' column", parameter="manifest"
        )
    slide_col, mpp_col = table.index(SLIDE_COLUMN), table.index(MPP_COLUMN)
    if slide_col is None:
        raise ManifestError(
            f"{path}, line {table.header_line}: no '{SLIDE_COLUMN}' column (columns: {', '.join(table.header)})",
            fix="add a 'slide' column with each slide's file name or path in the cohort",
            parameter="manifest",
        )
    header, body = table.header, table.rows
    payload_cols = [i for i in range(len(header)) if i not in (slide_col, mpp_col)]
    kinds = table.column_types(payload_cols)
    names = _lookup(cohort)
    rows: dict[str, ManifestRow] = {}
    unmatched: list[tuple[int, str]] = []
    for line, cells in body:
        value = cells[slide_col]
        if not value:
            raise ManifestError(f"{path}, line {line}, column {slide_col + 1} ('{SLIDE_COLUMN}'): empty",
                                fix="name the slide, or delete the row", parameter="manifest")
        mpp = None if mpp_col is None else _parse_mpp(path, line, mpp_col + 1, cells[mpp_col])
        slide_id = _resolve(path, line, value, names)
        if slide_id is None:
            unmatched.append((line, value))
            continue
        if slide_id in rows:
            raise ManifestError(
                f"{path}, lines {rows[slide_id].line} and {line}: two rows for slide '{slide_id}'",
                fix="keep one row per slide",
            parameter="manifest",
            )
        rows[slide_id] = ManifestRow(line, slide_id, mpp, table.typed(cells, kinds))
    return Manifest(
        path=path,
        rows=rows,
        columns={header[i]: kinds[i] for i in payload_cols},
        unmatched=tuple(unmatched),
        missing=tuple(s.id for s in cohort.slides if s.id not in rows),
    )
