"""Pathologists' annotations onto stored tiles: `conchdb annotations add DIR`.

One QuPath GeoJSON export per slide, named after the slide; every stored tile of that slide
that lies at least half inside an annotated region gets the field `annotation` (the
region's class), so searches and evaluations can be limited to, or scored against, what a
pathologist drew. Files are checked one by one; a bad one (not GeoJSON, coordinates outside
the slide, a slide the store does not hold, a name that fits several slides) is refused with
its reason and the others still apply. Applying a slide's file again replaces that slide's
labels; nothing else in its tiles changes, and no vector is touched.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from conchdb.archive.records import SlideCatalog, of_slide
from conchdb.catalog import ANNOTATION_FIELD
from conchdb.errors import ConchdbError, SlideError
from conchdb.slides.annotations import SUFFIXES, check_inside, read_regions, tile_classes
from conchdb.store import CollectionSpec, Store


@dataclass
class FileResult:
    """What one file did: the slide it named and the tiles labelled per class, or why it was refused."""

    file: str
    slide_id: str | None = None
    labelled: dict[str, int] = field(default_factory=dict)
    tiles: int = 0
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "slide_id": self.slide_id, "labelled": self.labelled, "tiles": self.tiles,
                "error": self.error}


def annotation_files(folder: Path) -> list[Path]:
    """The GeoJSON files under `folder` (sorted), or the one file given."""
    if folder.is_file():
        return [folder]
    if not folder.is_dir():
        raise ConchdbError(f"{folder} is not a folder or a file", fix="give the folder of QuPath GeoJSON exports",
                           parameter="annotations")
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in SUFFIXES)


def file_key(path: Path, root: Path) -> str:
    """What a file's name says about its slide: its path under `root` without the .geojson suffix."""
    rel = path.relative_to(root) if root.is_dir() and path.is_relative_to(root) else Path(path.name)
    text = rel.as_posix()
    for suffix in SUFFIXES:
        if text.lower().endswith(suffix):
            return text[: -len(suffix)]
    return text


def slide_lookup(sources: Sequence[Mapping[str, Any]], key: str) -> dict[str, set[str]]:
    """name -> slide ids, for each slide's value of `key` as written, its file name and its stem
    (QuPath names an export after the image: `case01.svs.geojson` or `case01.geojson`)."""
    out: dict[str, set[str]] = {}
    for source in sources:
        value, slide_id = source.get(key), source.get("slide_id")
        if value is None or slide_id is None:
            continue
        text = str(value)
        for name in {text, Path(text).name, Path(text).stem}:
            out.setdefault(name, set()).add(str(slide_id))
    return out


def slide_size(source: Mapping[str, Any]) -> tuple[int, int]:
    """A stored slide's level-0 width and height: from its record, else from its file."""
    width, height = source.get("width"), source.get("height")
    if isinstance(width, int) and isinstance(height, int):
        return width, height
    from conchdb.slides import open_slide

    mpp = source.get("mpp")
    with open_slide(source["path"], mpp if isinstance(mpp, (int, float)) else None, override_source="store") as slide:
        return slide.dimensions


def add_annotations(store: Store, collection: str, folder: Path, *, slide_key: str = "slide_id") -> list[FileResult]:
    """Label the stored tiles of each annotated slide under `folder` (see the module doc)."""
    record = store.collection_record(collection)
    if record is None:
        raise ConchdbError(f"collection '{collection}' does not exist in {store.location}",
                           fix="ingest the slides first (conchdb ingest)", parameter="collection")
    files = annotation_files(folder)
    if not files:
        raise ConchdbError(f"no .geojson files in {folder}", parameter="annotations",
                           fix="export each slide's annotations from QuPath as GeoJSON into this folder")
    # Declare and index the field in collections made before it existed (a no-op after).
    store.ensure_collection(CollectionSpec(collection, record.dim, {}, {ANNOTATION_FIELD: "keyword"}))
    catalog = SlideCatalog(store, collection)
    sources = catalog.records() or [s for i in catalog.slide_ids() if (s := catalog.source_of(i)) is not None]
    if sources and all(slide_key not in s for s in sources):
        raise ConchdbError(f"no stored slide has the field '{slide_key}'", parameter="slide_key",
                           fix="give --slide-key a field of the slide records, e.g. slide_id or a manifest column")
    lookup = slide_lookup(sources, slide_key)
    by_id = {str(s["slide_id"]): s for s in sources}
    return [_apply(store, collection, path, file_key(path, folder), lookup, by_id, slide_key) for path in files]


def _apply(store: Store, collection: str, path: Path, key: str, lookup: Mapping[str, set[str]],
           by_id: Mapping[str, Mapping[str, Any]], slide_key: str) -> FileResult:
    result = FileResult(str(path))
    names = [key, Path(key).name]
    found = next((lookup[n] for n in names if n in lookup), set())
    if not found:
        result.error = f"no stored slide has {slide_key} '{key}' (the file's name)"
        return result
    if len(found) > 1:
        result.error = f"'{key}' fits several stored slides: {', '.join(sorted(found))}"
        return result
    slide_id = result.slide_id = next(iter(found))
    try:
        regions = read_regions(path)
        check_inside(regions, *slide_size(by_id[slide_id]), source=path)
    except SlideError as exc:
        result.error = exc.message
        return result
    tiles = list(store.scroll(collection, of_slide(slide_id)))
    classes = tile_classes(regions, [(int(t.payload["x"]), int(t.payload["y"]), int(t.payload["size"]))
                                     for t in tiles])
    ids: dict[str, list[str]] = {}
    for tile, name in zip(tiles, classes, strict=True):
        if name is not None:
            ids.setdefault(name, []).append(tile.id)
    store.delete_payload(collection, [ANNOTATION_FIELD], flt=of_slide(slide_id))
    for name, chosen in ids.items():
        store.set_payload(collection, {ANNOTATION_FIELD: name}, ids=chosen)
    result.tiles = len(tiles)
    result.labelled = {name: len(chosen) for name, chosen in sorted(ids.items())}
    return result
