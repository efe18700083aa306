"""What `conchdb stats` reports about a store: collections, counts, slide statuses, provenance."""

from __future__ import annotations

from collections import Counter
from typing import Any

from conchdb.catalog import slides_collection
from conchdb.store.base import Store


def store_stats(store: Store) -> dict[str, Any]:
    """Plain data about every conchdb collection in the store (JSON-ready)."""
    names = store.collections()
    tiles_of = {slides_collection(name): name for name in names}  # a slides collection -> its tiles collection
    collections = []
    for name in names:
        entry: dict[str, Any] = {
            "name": name,
            "points": store.count(name),
            "metadata": store.collection_metadata(name) or {},
        }
        if name in tiles_of:
            entry["kind"] = "slides"
            entry["slides_by_status"] = dict(Counter(h.payload.get("status", "unknown") for h in store.scroll(name)))
        else:
            entry["kind"] = "tiles" if slides_collection(name) in names else "other"
        collections.append(entry)
    for entry in collections:  # show each tiles collection with its slides' statuses
        slides = next((c for c in collections if c["name"] == slides_collection(entry["name"])), None)
        if slides is not None:
            entry["slides_by_status"] = slides["slides_by_status"]
    return {"location": store.location, "size_on_disk_bytes": store.size_on_disk(), "collections": collections}
