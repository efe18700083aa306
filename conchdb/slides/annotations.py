"""Annotated regions of a slide, read from QuPath's GeoJSON, and which tiles lie inside them.

QuPath writes (File > Export objects as GeoJSON, or `exportObjectsToGeoJson(...,
"FEATURE_COLLECTION")`) a FeatureCollection, or a bare list of features, in level-0 pixel
coordinates with the origin at the image's top left. Each feature's `properties` holds its
`objectType` ("annotation", "detection", ...) and, when classified, `classification`:
`{"name", "color": [r, g, b]}` since QuPath 0.4, `{"name", "colorRGB": int}` before.
Polygons and multipolygons (with holes) are regions; points and lines have no area and are
skipped. Shapely does the geometry (loaded when a file is read, so `import conchdb.slides`
stays light).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from conchdb.errors import SlideError

SUFFIXES = (".geojson", ".json")

UNCLASSIFIED = "annotated"
"""The class given to an annotation that QuPath left without a classification."""
INSIDE = 0.5
"""A tile belongs to a region when at least this share of its area lies inside it."""


@dataclass(frozen=True)
class Region:
    """One annotated region: its class and its shape (a shapely Polygon or MultiPolygon)."""

    name: str
    shape: Any


def _class_name(properties: dict[str, Any]) -> str:
    classification = properties.get("classification")
    if isinstance(classification, dict) and str(classification.get("name") or "").strip():
        return str(classification["name"]).strip()
    if isinstance(classification, str) and classification.strip():
        return classification.strip()
    return UNCLASSIFIED


def read_regions(path: str | Path) -> list[Region]:
    """The polygonal regions of a QuPath GeoJSON file; a file that is not GeoJSON, or whose
    polygons are not valid shapes, is a SlideError naming the file and the reason."""
    from shapely.geometry import shape
    from shapely.validation import explain_validity

    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8-sig"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise SlideError(f"{path}: not GeoJSON ({exc})", fix="export the annotations from QuPath as GeoJSON",
                         parameter="annotations") from None
    if isinstance(doc, dict) and doc.get("type") == "FeatureCollection":
        features = doc.get("features")
    elif isinstance(doc, dict) and doc.get("type") == "Feature":
        features = [doc]
    else:
        features = doc
    if not isinstance(features, list) or not all(isinstance(f, dict) for f in features):
        raise SlideError(f"{path}: not a GeoJSON FeatureCollection or list of features",
                         fix="export the annotations from QuPath as GeoJSON", parameter="annotations")
    regions = []
    for n, feature in enumerate(features):
        geometry = feature.get("geometry")
        if not isinstance(geometry, dict) or geometry.get("type") not in ("Polygon", "MultiPolygon"):
            continue
        try:
            region = shape(geometry)
        except (ValueError, TypeError, AttributeError, IndexError) as exc:
            raise SlideError(f"{path}: feature {n} has a broken {geometry.get('type')} ({exc})",
                             fix="export the annotations from QuPath again", parameter="annotations") from None
        if not region.is_valid:
            raise SlideError(f"{path}: feature {n} is not a valid shape ({explain_validity(region)})",
                             fix="fix the annotation in QuPath (Objects > Annotations > Simplify or Fill holes)",
                             parameter="annotations")
        properties = feature.get("properties") if isinstance(feature.get("properties"), dict) else {}
        regions.append(Region(_class_name(properties), region))
    return regions


def check_inside(regions: Sequence[Region], width: int, height: int, *, source: str | Path) -> None:
    """Refuse regions that reach outside a `width`×`height` level-0 image: coordinates from
    another slide, or at another scale, would label the wrong tissue."""
    for region in regions:
        x0, y0, x1, y1 = region.shape.bounds
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise SlideError(
                f"{source}: annotation '{region.name}' spans {x0:g},{y0:g} to {x1:g},{y1:g}, outside the slide "
                f"({width}×{height} level-0 pixels)",
                fix="export from the same slide in QuPath, at full resolution (level-0 pixels)",
                parameter="annotations",
            )


def tile_classes(regions: Sequence[Region], tiles: Iterable[tuple[int, int, int]]) -> list[str | None]:
    """Each (x, y, size) tile's class: the region class covering the largest share of it when
    that share is at least `INSIDE`, else None. Regions of one class are merged first, so a
    tile split between two touching regions of one class counts whole."""
    import numpy as np
    import shapely

    by_class: dict[str, list[Any]] = {}
    for region in regions:
        by_class.setdefault(region.name, []).append(region.shape)
    rows = np.asarray(list(tiles), dtype=np.float64).reshape(-1, 3)
    if not len(rows) or not by_class:
        return [None] * len(rows)
    x, y, size = rows[:, 0], rows[:, 1], rows[:, 2]
    squares = shapely.box(x, y, x + size, y + size)  # one vectorised call per class, not one per tile
    shares = np.stack([
        shapely.area(shapely.intersection(squares, shapely.union_all(shapes))) / np.maximum(size * size, 1e-12)
        for shapes in by_class.values()
    ])
    names = list(by_class)
    best = shares.argmax(axis=0)
    return [names[b] if shares[b, i] >= INSIDE - 1e-9 else None for i, b in enumerate(best)]


def find_annotation_file(folder: str | Path, slide_id: str) -> Path | None:
    """A slide's annotation file in `folder`: named by its id (a path under the cohort), its
    file name, or its name without the extension, plus .geojson or .json (QuPath names an
    export after the image: `case01.svs.geojson` or `case01.geojson`). None when there is none."""
    root, rel = Path(folder), Path(slide_id)
    for base in (rel, Path(rel.name), Path(rel.stem)):
        for suffix in SUFFIXES:
            candidate = root / (str(base) + suffix)
            if candidate.is_file():
                return candidate
    return None


def keep_inside(grid: Any, regions: Sequence[Region]) -> Any:
    """A TileGrid with only the tiles at least half inside a region (ingest --roi)."""
    import dataclasses

    size = grid.tile_size_level0
    inside = tile_classes(regions, [(t.x, t.y, size) for t in grid.tiles])
    kept = tuple(t for t, name in zip(grid.tiles, inside, strict=True) if name is not None)
    return dataclasses.replace(grid, tiles=kept)
