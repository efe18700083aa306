"""`conchdb stats` with the archive's view: the store's collections and counts, and for each
tiles collection how many stored slides have lost their file."""

from __future__ import annotations

from typing import Any

from conchdb.archive.records import SlideCatalog, file_state
from conchdb.store import Store
from conchdb.store.stats import store_stats


def archive_stats(store: Store) -> dict[str, Any]:
    """`store_stats`, each tiles collection with `slides_missing` (records whose file is gone)."""
    doc = store_stats(store)
    for entry in doc["collections"]:
        if entry.get("kind") == "tiles":
            records = SlideCatalog(store, entry["name"]).records()
            entry["slides_missing"] = sum(file_state(r) == "missing" for r in records)
    return doc
