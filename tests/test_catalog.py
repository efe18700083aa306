"""The catalog: the names and values existing stores hold, and the layouts ingest declares."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import get_args

from conchdb import catalog, tabular
from conchdb.catalog import (
    ANNOTATION_FIELD,
    FIELD_TYPES,
    SLIDE_FIELDS,
    SLIDE_INDEXED,
    TEXT_FIELDS,
    TEXT_INDEXED,
    TILE_FIELDS,
    TILE_GRAPH_FIELDS,
    TILE_INDEXED,
    TILE_LOAD_INDEXED,
    SlideStatus,
    slides_collection,
    slides_layout,
    texts_collection,
    texts_layout,
    tiles_layout,
    tiling_key,
)
from conchdb.store import types


def test_names_and_statuses_are_what_stores_already_hold():
    assert slides_collection("conch_tiles") == "conch_tiles_slides"
    assert texts_collection("conch_tiles") == "conch_tiles_texts"
    assert catalog.TILES_COLLECTION == "conch_tiles"
    assert {s.value for s in SlideStatus} == {"done", "failed", "in_progress", "no_tissue", "skipped"}
    assert tiling_key(0.5, 512, 512) == "0.5um-512px-s512" and tiling_key(0.25, 224, 112) == "0.25um-224px-s112"


def test_a_status_reads_and_writes_as_its_string():
    assert SlideStatus.DONE == "done" and SlideStatus("no_tissue") is SlideStatus.NO_TISSUE
    assert str(SlideStatus.FAILED) == f"{SlideStatus.FAILED}" == "failed"
    assert json.dumps({"status": SlideStatus.IN_PROGRESS}) == '{"status": "in_progress"}'
    assert "done" in catalog.FINISHED and "failed" not in catalog.FINISHED


def test_field_lists_are_typed_and_consistent():
    for fields in (TILE_FIELDS, SLIDE_FIELDS, TEXT_FIELDS):
        assert set(fields.values()) <= set(FIELD_TYPES)
    assert set(TILE_LOAD_INDEXED) <= set(TILE_INDEXED) == set(TILE_FIELDS)
    assert set(TILE_GRAPH_FIELDS) <= set(TILE_INDEXED)
    assert set(SLIDE_INDEXED) <= set(SLIDE_FIELDS) and set(TEXT_INDEXED) <= set(TEXT_FIELDS)
    assert set(catalog.TILE_SCOPE_FIELDS) <= set(TILE_FIELDS) & set(SLIDE_FIELDS)
    assert {k: SLIDE_FIELDS[k] for k in set(TILE_FIELDS) & set(SLIDE_FIELDS)} == {
        k: TILE_FIELDS[k] for k in set(TILE_FIELDS) & set(SLIDE_FIELDS)
    }, "a field the tiles and the slide records share has one type"
    assert set(TILE_FIELDS) | {"status", "tiles", "error", "identity"} <= catalog.RESERVED_FIELDS


def test_every_typed_csv_column_type_has_a_field_type():
    assert set(catalog.COLUMN_FIELD_TYPES) == set(tabular.COLUMN_TYPES)
    assert set(catalog.COLUMN_FIELD_TYPES.values()) == set(FIELD_TYPES)
    assert types.FieldType is catalog.FieldType and get_args(types.FieldType) == FIELD_TYPES


COLUMNS = {"diagnosis": "string", "grade": "int", "age": "float", "her2": "bool"}


def test_tiles_layout_indexes_the_manifest_and_graphs_its_categories():
    layout = tiles_layout(COLUMNS)
    annotation = {ANNOTATION_FIELD: "keyword"}  # a pathologist's class, set later by `annotations add`
    dicom = catalog.DICOM_FIELDS
    assert layout.fields == {**TILE_FIELDS, **dicom, **annotation, "diagnosis": "keyword", "grade": "integer",
                             "age": "float", "her2": "bool"}
    assert layout.indexed is None  # every field: a filter on any of them is counted and planned by its index
    assert layout.graph_fields == (*TILE_GRAPH_FIELDS, "diagnosis", "her2")
    assert layout.load_indexed == TILE_LOAD_INDEXED
    empty = tiles_layout({})
    assert empty.fields == {**TILE_FIELDS, **dicom, **annotation} and empty.indexed is None


def test_dicom_attributes_are_declared_typed_reserved_and_indexed():
    dicom = catalog.DICOM_FIELDS
    assert all(name.startswith("dicom_") and kind == "keyword" for name, kind in dicom.items())
    assert set(dicom) <= catalog.RESERVED_FIELDS and set(dicom) <= set(tiles_layout({}).fields)
    assert set(dicom) <= set(slides_layout({}).fields) and slides_layout({}).indexed is None


def test_slide_and_text_layouts_declare_their_indexed_fields_and_the_columns():
    slides = slides_layout(COLUMNS)
    assert list(slides.fields)[: len(SLIDE_INDEXED)] == list(SLIDE_INDEXED)
    assert slides.fields["grade"] == "integer" and slides.graph_fields == () and slides.indexed is None
    texts = texts_layout({"organ": "string"})
    assert texts.fields == {"source": "keyword", "line": "integer", "organ": "keyword"}
    assert texts.graph_fields is None and texts.indexed is None


def test_catalog_and_tabular_sit_at_the_bottom():
    code = (
        "import sys, conchdb.catalog, conchdb.tabular; "
        "print(sorted(m for m in sys.modules if m.startswith('conchdb')))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "['conchdb', 'conchdb.catalog', 'conchdb.errors', 'conchdb.tabular']"


def test_imported_tiles_declare_and_index_the_import_fields():
    layout = catalog.imported_tiles_layout(COLUMNS)
    assert layout.fields == {**tiles_layout(COLUMNS).fields, **catalog.IMPORT_TILE_FIELDS}
    assert layout.indexed is None
    for fields in (catalog.IMPORT_TILE_FIELDS, catalog.IMPORT_RECORD_FIELDS):
        assert set(fields.values()) <= set(FIELD_TYPES) and not set(fields) & set(TILE_FIELDS)
    assert set(catalog.IMPORT_TILE_FIELDS) <= set(catalog.IMPORT_RECORD_FIELDS)
    assert catalog.RESERVED_FIELDS < catalog.IMPORT_RESERVED


def test_the_mosaic_mark_is_an_indexed_bool_without_a_graph_of_its_own():
    assert TILE_FIELDS[catalog.MOSAIC_FIELD] == "bool"
    assert catalog.MOSAIC_FIELD in TILE_INDEXED
    assert catalog.MOSAIC_FIELD not in TILE_GRAPH_FIELDS  # only mosaic tiles carry it: a graph would buy nothing
    assert catalog.MOSAIC_FIELD not in catalog.SLIDE_FIELDS
