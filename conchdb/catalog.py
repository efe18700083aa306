"""What a conchdb store holds, stated once: collections, their fields and types, statuses.

Ingest writes what this module names, search and stats read it, and the tests and
benchmarks build their stores from it, so a field or a collection name is spelled here
and nowhere else. A store holds, per tiles collection NAME (default `conch_tiles`):

- NAME: one point per tile, its vector and `TILE_FIELDS` plus the cohort's manifest columns;
- `slides_collection(NAME)`: one record per slide and tiling (`SLIDE_FIELDS`), whose
  `status` is a `SlideStatus` and whose vector is the slide's mean tile vector once done;
- `texts_collection(NAME)`: captions or terms for image -> text (`TEXT_FIELDS`).

The values here are what existing stores hold (field names, status strings, the tiling
key's form): changing one would strand the data already written under the old one.
This module sits at the bottom of the package and imports nothing of it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Literal, get_args

FieldType = Literal["keyword", "integer", "float", "bool"]
"""How the store types a payload field: its payload index, and how a filter value is read."""
FIELD_TYPES: tuple[FieldType, ...] = get_args(FieldType)
GRAPH_TYPES: tuple[FieldType, ...] = ("keyword", "bool")
"""Field types whose values may get HNSW graphs of their own (categories; ranges rarely cut a graph)."""

COLUMN_FIELD_TYPES: dict[str, FieldType] = {"int": "integer", "float": "float", "bool": "bool", "string": "keyword"}
"""The field type of each typed-CSV column type (`conchdb.tabular`: manifests, texts files)."""

TILES_COLLECTION = "conch_tiles"
"""The tiles collection used when none is named."""
_SLIDES_SUFFIX = "_slides"
_TEXTS_SUFFIX = "_texts"


def slides_collection(tiles_collection: str) -> str:
    """Name of the per-slide records collection that belongs to a tiles collection."""
    return f"{tiles_collection}{_SLIDES_SUFFIX}"


def texts_collection(tiles_collection: str) -> str:
    """Name of the texts collection that goes with a tiles collection."""
    return f"{tiles_collection}{_TEXTS_SUFFIX}"


class SlideStatus(str, Enum):
    """Where a slide stands. A slide record's `status` holds one of the first four;
    `SKIPPED` is only an ingest outcome (a slide already done, left as it was). Each equals
    its string (`SlideStatus.DONE == "done"`), which is what records store."""

    DONE = "done"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    NO_TISSUE = "no_tissue"
    SKIPPED = "skipped"

    def __str__(self) -> str:
        return self.value


FINISHED = (SlideStatus.DONE, SlideStatus.NO_TISSUE)
"""Statuses of slides that a rerun leaves alone while their file is unchanged."""


def tiling_key(target_mpp: float, tile_px: int, stride: int) -> str:
    """A short label of what decides a tile's pixels; one slide may be stored at several.

    Tiles and slide records carry it as `tiling`, so that tiles cut at another
    resolution or size are never mixed up with these (the tissue settings are not part of
    it: tiles of one tiling that a new tissue mask drops are deleted, not kept apart)."""
    return f"{target_mpp:g}um-{tile_px}px-s{stride}"


# -- tiles ----------------------------------------------------------------------------------

TILE_FIELDS: dict[str, FieldType] = {
    "slide_id": "keyword",
    "path": "keyword",
    "cohort": "keyword",
    "x": "integer",
    "y": "integer",
    "size": "integer",
    "mpp": "float",
    "mpp_source": "keyword",
    "target_mpp": "float",
    "tile_px": "integer",
    "tissue": "float",
    "tiling": "keyword",
    "ingest_run": "keyword",
    "mosaic": "bool",
}
"""Payload fields of a tile: its slide, level-0 square (x, y, size), the slide's pixel size and
where it came from, the tiling it was cut at, its tissue share, and the run that wrote it; and,
on the few tiles of the slide's mosaic only, `mosaic: true` (conchdb/archive/mosaic.py)."""
MOSAIC_FIELD = "mosaic"
"""The field that marks a slide's mosaic tiles (absent on its other tiles)."""
TILE_ONLY_FIELDS = ("x", "y", "size", "tissue", MOSAIC_FIELD)
"""The tile fields that describe the tile itself; a slide record carries every other field
its tiles do (slide, path, cohort, tiling, pixel size, run, manifest columns), with the
same values, so a filter on those can be asked of the records instead of the tiles."""
TILE_INDEXED = tuple(TILE_FIELDS)
"""The tile fields that get a payload index: all of them, as every other declared field of a
tiles collection (DICOM attributes, annotation, manifest columns). A filter on a field without
an index is checked on each point's payload, and the engine cannot count what it keeps, so it
walks the graph even when the filter keeps a few hundred tiles, and loses hits: `tissue>=0.95`
found 0.49 of its true top 10 at 200,000 tiles. With an index the engine knows an upper bound
of what any filter keeps and searches exactly below the full-scan threshold (conchdb.store.base).
The indexes are built once, after a bulk load (TILE_LOAD_INDEXED); their cost on the build is
in benchmarks/filters.py."""
ANNOTATION_FIELD = "annotation"
"""A tile's class from a pathologist's annotation (QuPath GeoJSON, `conchdb annotations add`):
set on the tiles at least half inside an annotated region, absent on the others. Declared (and
indexed) in every tiles collection, so `--where annotation=tumor` is a typed, cheap filter."""
TILE_LOAD_INDEXED = ("slide_id",)
"""Indexed while ingest writes into a new collection (it finds a slide's tiles by slide_id);
the embedded store builds the other indexes once, when the ingest ends."""
TILE_GRAPH_FIELDS = ("slide_id", "cohort")
"""Tile fields whose values get HNSW graphs of their own, besides the categorical manifest
columns: where searches filter by category, not bookkeeping fields like tiling (each graph
costs a build)."""
TILE_SCOPE_FIELDS = ("cohort", "tiling")
"""Fields that tell apart copies of one slide id (another cohort, another tiling)."""

DICOM_FIELDS: dict[str, FieldType] = {
    "dicom_patient_id": "keyword",
    "dicom_accession_number": "keyword",
    "dicom_study_date": "keyword",
    "dicom_specimen": "keyword",
    "dicom_stain": "keyword",
    "dicom_body_part": "keyword",
    "dicom_study_uid": "keyword",
    "dicom_series_uid": "keyword",
}
"""What a DICOM slide's tiles and record carry beyond `TILE_FIELDS`, read from its attributes
(conchdb/slides/dicom.py), beside the manifest's columns: Patient ID, Accession Number, Study
Date (YYYYMMDD, so ranges compare as text), the specimen's description, the stain where the
specimen preparation codes one ('Using substance' items joined by '+'), Body Part Examined,
and the study and series UIDs. Absent attributes are left out. The `dicom_` prefix keeps them
apart from manifest columns of the same meaning, which may still be given."""

# -- slide records --------------------------------------------------------------------------

SLIDE_FIELDS: dict[str, FieldType] = {
    "slide_id": "keyword",
    "path": "keyword",
    "cohort": "keyword",
    "identity": "keyword",
    "status": "keyword",
    "tiling": "keyword",
    "target_mpp": "float",
    "tile_px": "integer",
    "ingest_run": "keyword",
    "updated_at": "keyword",
    "tiles": "integer",
    "error": "keyword",
    "mpp": "float",
    "mpp_source": "keyword",
    "width": "integer",
    "height": "integer",
    "manifest_columns": "keyword",
}
"""The fields of a slide record (with the manifest's columns): the slide and its file's
`identity` (a changed file is ingested again), its `status`, the tiling, how many tiles,
the error that stopped it, its pixel size and level-0 size, when and by which run, and the
names of the manifest columns it holds."""
MANIFEST_COLUMNS_FIELD = "manifest_columns"
"""A record's list of the manifest columns it holds, so a column dropped from a later
manifest is dropped from the slide (conchdb/archive/records.py)."""
SLIDE_INDEXED = ("slide_id", "cohort", "status", "tiling", "tiles")
"""The slide-record fields a slides collection declares and indexes (besides manifest columns)."""
RESERVED_FIELDS = frozenset(
    {*TILE_FIELDS, *DICOM_FIELDS, "status", "tiles", "error", "identity", MANIFEST_COLUMNS_FIELD}
)
"""Names a manifest column may not take: conchdb's own fields, which it would overwrite."""

# -- imported features ----------------------------------------------------------------------

IMPORT_TILE_FIELDS: dict[str, FieldType] = {"source": "keyword", "magnification": "float"}
"""What a tile imported from a TRIDENT or CLAM feature file carries beyond `TILE_FIELDS`:
the tool that extracted it (`trident`, `clam`) and the magnification it recorded (None
when it recorded none). Its `size` is the file's level-0 patch size, `tile_px` its patch size."""
IMPORT_RECORD_FIELDS: dict[str, FieldType] = {
    "source": "keyword",
    "source_file": "keyword",
    "source_identity": "keyword",
    "magnification": "float",
    "level0_magnification": "float",
    "patch_size_level0": "integer",
    "overlap": "integer",
    "slide_missing": "bool",
    "raw_features": "keyword",
}
"""What the record of an imported slide carries beyond `SLIDE_FIELDS`: the feature file and
its content identity (a changed file is imported again), the tool's magnifications, level-0
patch size and overlap, whether the slide file was missing (pixel size unknown), and where
its pre-projection features are kept (for export), if they are."""
IMPORT_RESERVED = RESERVED_FIELDS | set(IMPORT_TILE_FIELDS) | set(IMPORT_RECORD_FIELDS)
"""Names a manifest column may not take in an import (`RESERVED_FIELDS` in an ingest)."""

# -- texts ----------------------------------------------------------------------------------

TEXT_FIELDS: dict[str, FieldType] = {"text": "keyword", "source": "keyword", "line": "integer"}
"""The fields of a text point (with its file's metadata columns): the text, the file it came
from (its name) and its line there."""
TEXT_INDEXED = ("source", "line")
"""The text fields a texts collection declares and indexes (besides metadata columns)."""
TEXT_RESERVED = frozenset(TEXT_INDEXED)
"""Names a texts file's metadata column may not take (its `text` column is the text itself)."""


# -- collection layouts ---------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """The payload part of a collection's spec, as `conchdb.store.CollectionSpec` takes it
    (`CollectionSpec(name, dim, metadata, **asdict(layout))`): the declared fields and
    their types, which get per-value graphs, which get an index, and which are indexed
    from the start of a bulk load. None means all (see CollectionSpec)."""

    fields: dict[str, FieldType]
    graph_fields: tuple[str, ...] | None = None
    indexed: tuple[str, ...] | None = None
    load_indexed: tuple[str, ...] | None = None


def column_fields(columns: Mapping[str, str]) -> dict[str, FieldType]:
    """Typed-CSV columns (name -> int, float, bool or string) as payload fields with their types."""
    return {name: COLUMN_FIELD_TYPES[kind] for name, kind in columns.items()}


def tiles_layout(columns: Mapping[str, str]) -> Layout:
    """A tiles collection with the cohort's manifest `columns` (name -> column type)."""
    extra = column_fields(columns)
    graphs = (*TILE_GRAPH_FIELDS, *(name for name, kind in extra.items() if kind in GRAPH_TYPES))
    fields = {**TILE_FIELDS, **DICOM_FIELDS, ANNOTATION_FIELD: "keyword", **extra}
    return Layout(fields, graphs, None, TILE_LOAD_INDEXED)  # every field indexed (TILE_INDEXED)


def imported_tiles_layout(columns: Mapping[str, str]) -> Layout:
    """A tiles collection that imported features write into: the tiles layout and the import fields."""
    layout = tiles_layout(columns)
    return Layout({**layout.fields, **IMPORT_TILE_FIELDS}, layout.graph_fields, layout.indexed, layout.load_indexed)


def slides_layout(columns: Mapping[str, str]) -> Layout:
    """A slides collection with the cohort's manifest `columns`: every declared field indexed,
    no per-value graphs (slide search filters on status, over few points)."""
    fields = {name: SLIDE_FIELDS[name] for name in SLIDE_INDEXED}
    return Layout({**fields, **DICOM_FIELDS, **column_fields(columns)}, ())


def texts_layout(columns: Mapping[str, str]) -> Layout:
    """A texts collection with a texts file's metadata `columns`: every declared field indexed."""
    fields = {name: TEXT_FIELDS[name] for name in TEXT_INDEXED}
    return Layout({**fields, **column_fields(columns)})
