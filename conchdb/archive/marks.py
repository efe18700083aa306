"""Marking mosaics in the store: when a slide's ingest completes, and for whole collections.

A mosaic tile carries `mosaic: true` in its payload; the other tiles lack the field.
Marking only the few mosaic tiles keeps ingest's writes as they were (the field costs
nothing on the other 95 %), and the bool index on the field holds just them, so
`mosaic=true` is a cheap filter. Marks are payload updates by id: a tile's vector is never
written again, so choosing from the stored vectors a second time reads the very same bits
and chooses the same tiles (an upsert would let the engine normalize the vector again).

`mark_slide` marks the tiles a writer has just chosen; `build_mosaics` (`conchdb mosaic`)
gives collections ingested before mosaics existed theirs from the stored vectors. Both
choose with `conchdb.archive.mosaic.choose_mosaic`, so they agree.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from conchdb.archive.mosaic import choose_mosaic
from conchdb.archive.records import SlideCatalog, of_slide
from conchdb.catalog import MOSAIC_FIELD, TILE_SCOPE_FIELDS
from conchdb.errors import StoreError
from conchdb.store import CollectionSpec, Filter, Hit, Store

SLIDE_SCOPE = TILE_SCOPE_FIELDS
"""Fields that tell apart stored copies of one slide id; each copy gets its own mosaic."""
MOSAIC_SPEC_FIELDS = {MOSAIC_FIELD: "bool"}


def mark_slide(store: Store, collection: str, ids: Sequence[str], vectors: np.ndarray) -> list[str]:
    """Choose the mosaic of a slide whose tiles (`ids`, `vectors`) are stored, and mark it;
    returns the chosen ids."""
    chosen = choose_mosaic(ids, vectors)
    store.set_payload(collection, {MOSAIC_FIELD: True}, ids=chosen)
    return sorted(chosen)


def remark(store: Store, collection: str, tiles: Sequence[Hit]) -> tuple[int, int, int]:
    """Give one stored copy of a slide (its tiles, with vectors and payloads) the mosaic its
    vectors choose; returns (mosaic size, tiles newly marked, tiles unmarked). Tiles already
    marked right are not written."""
    ids = [t.id for t in tiles]
    vectors = np.stack([np.asarray(t.vector, dtype=np.float32) for t in tiles])
    chosen = set(choose_mosaic(ids, vectors))
    marked = [t.id for t in tiles if t.id in chosen and t.payload.get(MOSAIC_FIELD) is not True]
    unmarked = [t.id for t in tiles if t.id not in chosen and MOSAIC_FIELD in t.payload]
    if marked:
        store.set_payload(collection, {MOSAIC_FIELD: True}, ids=marked)
    if unmarked:
        store.delete_payload(collection, [MOSAIC_FIELD], ids=unmarked)
    return len(chosen), len(marked), len(unmarked)


@dataclass
class MosaicSummary:
    """What `build_mosaics` did; `to_dict()` is `conchdb mosaic --json`."""

    collection: str
    slides: int = 0
    tiles: int = 0
    marked: int = 0
    unmarked: int = 0
    mosaic_tiles: int = 0
    without_tiles: list[str] = field(default_factory=list)
    per_slide: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "collection": self.collection,
            "slides": self.slides,
            "tiles": self.tiles,
            "mosaic_tiles": self.mosaic_tiles,
            "newly_marked": self.marked,
            "unmarked": self.unmarked,
            "without_tiles": self.without_tiles,
            "per_slide": self.per_slide,
        }


def declare_field(store: Store, collection: str, dim: int) -> None:
    """Add the `mosaic` field and its index to a collection made before mosaics existed
    (a no-op on one that has it). No fingerprint is given, so no model is checked."""
    store.ensure_collection(
        CollectionSpec(collection, dim, {}, dict(MOSAIC_SPEC_FIELDS), graph_fields=(), indexed=(MOSAIC_FIELD,))  # type: ignore[arg-type]
    )


def copies(tiles: Iterable[Hit]) -> dict[tuple[str, ...], list[Hit]]:
    """A slide id's tiles split by stored copy (cohort, tiling)."""
    out: dict[tuple[str, ...], list[Hit]] = {}
    for tile in tiles:
        key = tuple(str(tile.payload.get(name, "")) for name in SLIDE_SCOPE)
        out.setdefault(key, []).append(tile)
    return out


def build_mosaics(
    store: Store,
    collection: str,
    *,
    slide_ids: Sequence[str] | None = None,
    flt: Filter | None = None,
    on_slide: Callable[[str, int], None] | None = None,
) -> MosaicSummary:
    """Choose and mark the mosaic of every stored slide (or of `slide_ids`, or of the slides
    whose tiles match `flt`) from its stored vectors; rerunning it changes nothing.

    A slide named in `slide_ids` must have tiles; one found only among the slide records
    (failed, or without tissue) is listed in `without_tiles`."""
    if store.collection_metadata(collection) is None:
        raise StoreError(
            f"collection '{collection}' does not exist in {store.location}",
            fix="ingest slides into it first, or name the tiles collection that holds them",
            parameter="collection",
        )
    summary = MosaicSummary(collection)
    wanted = list(slide_ids) if slide_ids else SlideCatalog(store, collection).slide_ids(flt)
    declared = False
    for slide_id in wanted:
        tiles = list(store.scroll(collection, of_slide(slide_id, *(flt.must if flt else ())), with_vectors=True))
        if not tiles and slide_ids:
            raise StoreError(
                f"no tiles of slide '{slide_id}' in collection '{collection}'",
                fix="see the stored slide ids with the stats command",
                parameter="slide_id",
            )
        if not tiles:
            summary.without_tiles.append(slide_id)
            continue
        if not declared:
            declare_field(store, collection, int(np.asarray(tiles[0].vector).shape[0]))
            declared = True
        for key, group in copies(tiles).items():
            size, marked, unmarked = remark(store, collection, group)
            summary.slides += 1
            summary.tiles += len(group)
            summary.marked += marked
            summary.unmarked += unmarked
            summary.mosaic_tiles += size
            summary.per_slide.append(
                {"slide_id": slide_id, **dict(zip(SLIDE_SCOPE, key, strict=True)), "tiles": len(group),
                 "mosaic_tiles": size}
            )
        if on_slide:
            on_slide(slide_id, len(tiles))
    return summary

