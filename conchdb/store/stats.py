"""What `conchdb stats` reports about a store: collections, counts, slide statuses, provenance."""

from __future__ import annotations

from collections import Counter
from typing import Any

from conchdb.store.base import Store

SLIDES_SUFFIX = "_slides"


def store_stats(store: Store) -> dict[str, Any]:
    """Plain data about every conchdb collection in the store (JSON-ready)."""
    names = store.collections()
    collections = []
    for name in names:
        entry: dict[str, Any] = {
            "name": name,
            "points": store.count(name),
            "metadata": store.collection_metadata(name) or {},
        }
        if name.endswith(SLIDES_SUFFIX) and name[: -len(SLIDES_SUFFIX)] in names:
            entry["kind"] = "slides"
            entry["slides_by_status"] = dict(Counter(h.payload.get("status", "unknown") for h in store.scroll(name)))
        else:
            entry["kind"] = "tiles" if name + SLIDES_SUFFIX in names else "other"
        collections.append(entry)
    for entry in collections:  # show each tiles collection with its slides' statuses
        slides = next((c for c in collections if c["name"] == entry["name"] + SLIDES_SUFFIX), None)
        if slides is not None:
            entry["slides_by_status"] = slides["slides_by_status"]
    return {"location": store.location, "size_on_disk_bytes": store.size_on_disk(), "collections": collections}
