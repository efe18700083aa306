"""What a filter form can offer: each filterable field with its stored values and counts.

Keyword, bool and integer fields get their values with the number of tiles (and, where the
slide records carry the field, of slides) holding each: the store's facet counts over its
payload indexes, exact. Numeric fields get the range of their values among the slide
records (manifest columns are per slide); a field the store holds no index for gets no
values, and the form falls back to a free entry. A field that is declared but that no point
holds (the DICOM fields of a cohort of files, `annotation` before any were added) is left
out. `source` tells the slide's own metadata (`metadata`, the manifest's columns) from
conchdb's bookkeeping (`conchdb`), so that a page can show the first to a pathologist and
keep the second behind a "details" toggle.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from conchdb.catalog import IMPORT_TILE_FIELDS, TILE_FIELDS, slides_collection

log = logging.getLogger("conchdb.api")

MAX_VALUES = 200
"""Values listed per field: more than a form can offer, so a field with more is typed in."""
FACETED = ("keyword", "bool", "integer")
PRIVATE = ("path", "identity")
"""Fields whose values say where files are on the server: never listed."""


def _facet(store: Any, collection: str, key: str) -> list[tuple[Any, int]] | None:
    try:
        return store.facet(collection, key, limit=MAX_VALUES + 1)
    except Exception as exc:  # no payload index on the field (or no facet in the engine): nothing to offer
        log.debug("no facet for %s.%s: %s", collection, key, exc)
        return None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def field_summaries(store: Any, collection: str, types: dict[str, str]) -> list[dict[str, Any]]:
    """One entry per field: name, type, source, and `values` ([{value, tiles, slides}], or
    None when not listed) or `min`/`max` (numbers, or None when unknown)."""
    records_name = slides_collection(collection)
    records_meta = store.collection_metadata(records_name)
    records_schema = (records_meta or {}).get("payload_schema") or {}
    records = list(store.scroll(records_name)) if records_meta is not None else []
    out = []
    for name, kind in sorted(types.items()):
        own = name in TILE_FIELDS or name in IMPORT_TILE_FIELDS
        entry: dict[str, Any] = {"name": name, "type": kind, "source": "conchdb" if own else "metadata",
                                 "values": None, "min": None, "max": None}
        if kind in FACETED and name not in PRIVATE:
            tiles = _facet(store, collection, name)
            slides = dict(_facet(store, records_name, name) or []) if name in records_schema else {}
            if tiles is not None and len(tiles) <= MAX_VALUES:
                entry["values"] = [{"value": v, "tiles": c, "slides": slides.get(v)} for v, c in tiles]
        if kind in ("integer", "float"):
            numbers = [n for n in (_number(r.payload.get(name)) for r in records) if n is not None]
            if not numbers and entry["values"]:
                numbers = [float(v["value"]) for v in entry["values"]]
            if numbers:
                entry["min"], entry["max"] = min(numbers), max(numbers)
        held = bool(entry["values"]) or entry["min"] is not None or any(name in r.payload for r in records)
        if entry["values"] == [] and entry["min"] is None or (entry["source"] == "metadata" and not held):
            continue  # declared but held by no point (DICOM fields of a cohort of files, say): nothing to offer
        out.append(entry)
    return out
