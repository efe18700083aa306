"""`conchdb ingest --roi`: tiles only inside each slide's QuPath annotations."""

from __future__ import annotations

import json

from conchdb.ingest.pipeline import IngestOptions, ingest
from conchdb.slides.grid import TilingParams
from conchdb.store.edge import EdgeStore
from tests.api.conftest import TILE, write_cohort
from tests.search.conftest import encoder  # noqa: F401 - fixture


def square(x0, y0, x1, y1):
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]


def export(*geometries) -> str:
    properties = {"objectType": "annotation", "classification": {"name": "Tumor", "color": [1, 2, 3]}}
    features = [{"type": "Feature", "geometry": g, "properties": properties} for g in geometries]
    return json.dumps({"type": "FeatureCollection", "features": features})


def test_roi_ingests_only_tiles_at_least_half_inside(tmp_path, encoder):  # noqa: F811
    cohort = write_cohort(tmp_path / "cohort")  # three 384×256 PNGs at 0.5 µm/px: 64-px tiles on a 6×4 grid
    roi = tmp_path / "roi"
    (roi / "case_a").mkdir(parents=True)
    # s1 (named by its slide id): x 0..160 keeps columns 0, 64 and 128 (half inside), rows 0 and 64.
    (roi / "case_a" / "s1.png.geojson").write_text(export({"type": "Polygon", "coordinates": [square(0, 0, 160, 128)]}))
    # s2 (named without its extension): two parts; a hole leaves less than half of the tile at (64, 192).
    (roi / "s2.geojson").write_text(export(
        {"type": "MultiPolygon", "coordinates": [
            [square(320, 192, 384, 256)],
            [square(0, 192, 128, 256), square(64, 200, 120, 250)],  # the hole leaves a third of (64, 192)
        ]}))
    options = IngestOptions(TilingParams(0.5, TILE, None, 0.0), readers=0, roi=roi)
    with EdgeStore(tmp_path / "store") as store:
        summary = ingest(cohort, encoder, store, "conch_tiles", options=options)
        tiles = {}
        for hit in store.scroll("conch_tiles"):
            tiles.setdefault(hit.payload["slide_id"], set()).add((hit.payload["x"], hit.payload["y"]))
    assert len(summary.failed) == 1, [(f.slide_id, f.error) for f in summary.failed]
    assert tiles == {
        "case_a/s1.png": {(x, y) for x in (0, 64, 128) for y in (0, 64)},
        "case_a/s2.png": {(320, 192), (0, 192)},
    }
    (failed,) = summary.failed  # s3 has no annotations file: refused with the reason, not stored empty
    assert failed.slide_id == "case_b/s3.png" and "no annotations file" in failed.error
