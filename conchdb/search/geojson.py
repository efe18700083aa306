"""Search results and heatmaps as GeoJSON that QuPath opens (drag the file onto the slide).

The layout is the one QuPath itself writes when it exports objects (File > Export objects as
GeoJSON; QuPath 0.4 to 0.6): a FeatureCollection of Features whose geometry is in level-0
pixels, origin at the image's top left, and whose `properties` hold `objectType`,
`classification` `{"name", "color": [r, g, b]}` and `measurements` `{"name": number}`.
Hits are annotations (few, and a pathologist may keep or edit them); heatmap tiles are
detections (many; QuPath colours detections by a measurement in Measure > Show measurement
maps). Every polygon is a tile's own level-0 square, a closed ring of five points.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from conchdb.errors import ConchdbError
from conchdb.search.searcher import SearchHit

HIT_CLASS = ("conchdb hit", [230, 97, 0])
WEAK_CLASS = ("conchdb weak hit", [150, 150, 150])
HEATMAP_CLASS = ("conchdb similarity", [0, 114, 178])


def tile_ring(payload: Mapping[str, Any]) -> list[list[int]]:
    """A tile's level-0 square as a closed GeoJSON ring (clockwise in image coordinates)."""
    x, y, size = int(payload["x"]), int(payload["y"]), int(payload["size"])
    return [[x, y], [x + size, y], [x + size, y + size], [x, y + size], [x, y]]


def tile_feature(payload: Mapping[str, Any], *, point_id: str, object_type: str, name: str,
                 classification: tuple[str, list[int]], measurements: Mapping[str, float]) -> dict[str, Any]:
    return {
        "type": "Feature",
        "id": point_id,
        "geometry": {"type": "Polygon", "coordinates": [tile_ring(payload)]},
        "properties": {
            "objectType": object_type,
            "name": name,
            "classification": {"name": classification[0], "color": list(classification[1])},
            "isLocked": False,
            "measurements": {k: float(v) for k, v in measurements.items()},
        },
    }


def hits_by_slide(hits: Sequence[SearchHit]) -> dict[str, dict[str, Any]]:
    """Per slide id, a FeatureCollection of its hits (every tile of a grouped hit): one
    annotation per tile, named by rank and score, classified as a hit or a weak hit."""
    out: dict[str, dict[str, Any]] = {}
    for hit in hits:
        for tile in hit.flat():
            if tile.slide_id is None or tile.x is None or tile.size is None:
                continue
            rank = hit.rank  # a grouped hit's tiles share their group's rank
            measurements = {"score": tile.score, "rank": rank}
            feature = tile_feature(
                tile.payload, point_id=tile.id, object_type="annotation", name=f"#{rank} {tile.score:.3f}",
                classification=WEAK_CLASS if tile.weak else HIT_CLASS, measurements=measurements,
            )
            collection = out.setdefault(str(tile.slide_id), {"type": "FeatureCollection", "features": []})
            collection["features"].append(feature)
    return out


def heatmap_collection(tiles: Sequence[Any], scores: Sequence[float]) -> dict[str, Any]:
    """A slide's stored tiles as detections, each with its similarity as the measurement."""
    features = [
        tile_feature(t.payload, point_id=t.id, object_type="detection", name=f"{float(s):.3f}",
                     classification=HEATMAP_CLASS, measurements={"similarity": float(s)})
        for t, s in zip(tiles, scores, strict=True)
    ]
    return {"type": "FeatureCollection", "features": features}


def slide_file_name(slide_id: str) -> PurePosixPath:
    """Where a slide's file goes under the export folder: its id (a path relative to the
    cohort) plus `.geojson`, so `conchdb annotations add` finds the slide by the same name;
    parts that would leave the folder are dropped."""
    parts = [p for p in PurePosixPath(str(slide_id).replace("\\", "/")).parts if p not in ("", ".", "..", "/")]
    return PurePosixPath(*(parts or ["slide"])).with_name((parts or ["slide"])[-1] + ".geojson")


def write_geojson(doc: Mapping[str, Any], path: Path) -> Path:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1))
    except OSError as exc:
        raise ConchdbError(f"cannot write {path}: {exc}", fix="give a writable folder or file",
                           parameter="export_geojson") from None
    return path


def export_hits_geojson(hits: Sequence[SearchHit], folder: Path) -> list[Path]:
    """One `<slide id>.geojson` per slide with hits, under `folder`."""
    return [write_geojson(doc, folder / slide_file_name(slide)) for slide, doc in hits_by_slide(hits).items()]
