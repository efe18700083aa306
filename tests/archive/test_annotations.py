"""QuPath annotations onto stored tiles (`conchdb annotations add`), checked against a hand
computation on a 4×4 grid of 100-px tiles."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from conchdb.archive import record_id
from conchdb.archive.annotations import add_annotations
from conchdb.catalog import ANNOTATION_FIELD, TILE_FIELDS, SlideStatus, slides_collection, slides_layout
from conchdb.cli import app
from conchdb.store import CollectionSpec, Condition, Filter, Point, stable_id
from conchdb.store.edge import EdgeStore

runner = CliRunner()
SIZE = 100
SLIDES = ("case01.svs", "case02.svs")


def square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def feature(geometry, properties):
    return {"type": "Feature", "id": "a", "geometry": geometry, "properties": properties}


# QuPath 0.4+ writes classification colours as [r, g, b]; 0.2-0.3 as one signed int `colorRGB`.
QUPATH_EXPORT = {
    "type": "FeatureCollection",
    "features": [
        # Tumor: 0..250 square with a hole over the tile at (100, 100): tiles fully inside, and
        # tiles exactly half inside (x or y 200..250), count; the one under the hole and the
        # corner tile (a quarter inside) do not.
        feature({"type": "Polygon", "coordinates": [square(0, 0, 250, 250), square(100, 100, 200, 200)]},
                {"objectType": "annotation", "classification": {"name": "Tumor", "color": [200, 0, 0]},
                 "isLocked": False}),
        # Stroma: two parts: the tile at (300, 300) whole, and 40% of the tile at (300, 0).
        feature({"type": "MultiPolygon", "coordinates": [[square(300, 300, 400, 400)], [square(300, 0, 340, 100)]]},
                {"objectType": "annotation", "classification": {"name": "Stroma", "colorRGB": -16744448}}),
        feature({"type": "Point", "coordinates": [50, 50]}, {"objectType": "detection"}),  # no area: skipped
    ],
}
TUMOR = {(0, 0), (100, 0), (200, 0), (0, 100), (200, 100), (0, 200), (100, 200)}
STROMA = {(300, 300)}


def make_store(folder: Path) -> None:
    """Two stored slides of 400×400 level-0 px, 16 tiles each, with their done records; the
    tiles collection declares no `annotation` field (made before it existed)."""
    rng = np.random.default_rng(0)
    with EdgeStore(folder) as store:
        store.ensure_collection(CollectionSpec("conch_tiles", 8, {"model_fingerprint": "t"}, dict(TILE_FIELDS)))
        store.ensure_collection(CollectionSpec(slides_collection("conch_tiles"), 8, {"model_fingerprint": "t"},
                                               **asdict(slides_layout({}))))
        for slide in SLIDES:
            shared = {"slide_id": slide, "path": f"/nowhere/{slide}", "cohort": "c", "size": SIZE, "mpp": 0.5,
                      "tiling": "t", "tile_px": 224, "target_mpp": 0.5}
            points = [Point(stable_id(slide, x, y), rng.normal(size=8).astype(np.float32), {"x": x, "y": y})
                      for y in range(0, 400, SIZE) for x in range(0, 400, SIZE)]
            store.upsert("conch_tiles", points, shared)
            record = {**shared, "status": SlideStatus.DONE.value, "width": 400, "height": 400, "tiles": 16}
            store.upsert(slides_collection("conch_tiles"), [Point(record_id("c", slide, "t"),
                                                                  np.ones(8, dtype=np.float32), record)])


def labelled(store, name: str) -> dict[str, set[tuple[int, int]]]:
    out: dict[str, set[tuple[int, int]]] = {}
    for hit in store.scroll("conch_tiles", Filter((Condition("slide_id", "eq", name),))):
        if ANNOTATION_FIELD in hit.payload:
            out.setdefault(hit.payload[ANNOTATION_FIELD], set()).add((hit.payload["x"], hit.payload["y"]))
    return out


def test_a_qupath_export_labels_exactly_the_tiles_half_inside(tmp_path):
    make_store(tmp_path / "store")
    folder = tmp_path / "qupath"
    folder.mkdir()
    (folder / "case01.geojson").write_text(json.dumps(QUPATH_EXPORT))  # named as QuPath names it: no extension
    with EdgeStore(tmp_path / "store") as store:
        (result,) = add_annotations(store, "conch_tiles", folder)
        assert result.error is None and result.slide_id == "case01.svs"
        assert result.labelled == {"Stroma": 1, "Tumor": 7}
        assert labelled(store, "case01.svs") == {"Tumor": TUMOR, "Stroma": STROMA}
        assert labelled(store, "case02.svs") == {}
        meta = store.collection_record("conch_tiles")
        assert meta.fields[ANNOTATION_FIELD] == "keyword" and ANNOTATION_FIELD in meta.indexed
        assert store.count("conch_tiles", Filter((Condition(ANNOTATION_FIELD, "eq", "Tumor"),))) == 7
        # A new export of the slide replaces its labels.
        smaller = {"type": "FeatureCollection", "features": [QUPATH_EXPORT["features"][1]]}
        (folder / "case01.geojson").write_text(json.dumps(smaller))
        add_annotations(store, "conch_tiles", folder)
        assert labelled(store, "case01.svs") == {"Stroma": STROMA}


def test_bad_files_are_refused_with_their_reason_and_the_rest_apply(tmp_path):
    make_store(tmp_path / "store")
    folder = tmp_path / "qupath"
    (folder / "sub").mkdir(parents=True)
    (folder / "case01.svs.geojson").write_text(json.dumps(QUPATH_EXPORT))
    outside = {"type": "FeatureCollection", "features": [
        feature({"type": "Polygon", "coordinates": [square(300, 300, 900, 900)]}, {"objectType": "annotation"})]}
    (folder / "case02.svs.geojson").write_text(json.dumps(outside))
    (folder / "case03.geojson").write_text(json.dumps(QUPATH_EXPORT))
    (folder / "sub" / "case01.svs.json").write_text("this is not json")
    args = ["annotations", "add", str(folder), "--store", str(tmp_path / "store"), "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 3, result.output
    doc = json.loads(result.stdout)
    errors = {Path(f["file"]).name: f["error"] for f in doc["files"]}
    assert errors["case01.svs.geojson"] is None
    assert "outside the slide" in errors["case02.svs.geojson"]
    assert "no stored slide" in errors["case03.geojson"]
    assert "not GeoJSON" in errors["case01.svs.json"]
    assert doc["applied"] == 1 and doc["refused"] == 3
    with EdgeStore(tmp_path / "store") as store:
        assert labelled(store, "case01.svs") == {"Tumor": TUMOR, "Stroma": STROMA}
        assert labelled(store, "case02.svs") == {}
        assert store.count("conch_tiles") == 32  # nothing stored is lost


@pytest.mark.parametrize("name", ["case01.svs", "case01"])
def test_the_file_name_may_keep_or_drop_the_slides_extension(tmp_path, name):
    make_store(tmp_path / "store")
    folder = tmp_path / "q"
    folder.mkdir()
    (folder / f"{name}.geojson").write_text(json.dumps(QUPATH_EXPORT))
    result = runner.invoke(app, ["annotations", "add", str(folder), "--store", str(tmp_path / "store")])
    assert result.exit_code == 0, result.output
    assert "case01.svs: Stroma 1, Tumor 7 (of 16 tiles)" in result.stdout


def test_slide_key_matches_file_names_against_another_record_field(tmp_path):
    make_store(tmp_path / "store")
    with EdgeStore(tmp_path / "store") as store:  # a manifest column naming the case
        store.set_payload(slides_collection("conch_tiles"), {"case": "A-17"},
                          flt=Filter((Condition("slide_id", "eq", "case02.svs"),)))
    folder = tmp_path / "q"
    folder.mkdir()
    (folder / "A-17.geojson").write_text(json.dumps(QUPATH_EXPORT))
    args = ["annotations", "add", str(folder), "--store", str(tmp_path / "store"), "--slide-key", "case"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    with EdgeStore(tmp_path / "store") as store:
        assert labelled(store, "case02.svs") == {"Tumor": TUMOR, "Stroma": STROMA}
        assert labelled(store, "case01.svs") == {}
    wrong = runner.invoke(app, [*args[:-1], "nothing"])
    assert wrong.exit_code == 2 and "no stored slide has the field 'nothing'" in wrong.stderr
