"""The vector store: one base class (`Store`), an embedded and a server backend.

`open_store` picks the backend the way the CLI's options do: a Qdrant URL means the
server store, otherwise the embedded store in the given folder. Callers use only the
types of `conchdb.store.types` and `Store`'s methods; no Qdrant class crosses this
package's boundary.
"""

from __future__ import annotations

import os

from conchdb.errors import StoreError
from conchdb.store.base import Store, StoreTuning
from conchdb.store.ids import stable_id, tile_point_id
from conchdb.store.types import CollectionSpec, Condition, FieldType, Filter, Group, Hit, Op, Point

__all__ = [
    "CollectionSpec",
    "Condition",
    "FieldType",
    "Filter",
    "Group",
    "Hit",
    "Op",
    "Point",
    "Store",
    "StoreTuning",
    "open_store",
    "stable_id",
    "tile_point_id",
]


def open_store(
    store_path: str | os.PathLike[str] | None = None,
    qdrant_url: str | None = None,
    api_key: str | None = None,
    *,
    tuning: StoreTuning | None = None,
    shard_number: int | None = None,
    replication_factor: int | None = None,
) -> Store:
    """The server store when `qdrant_url` is given (it wins over a path), else the embedded one at `store_path`;
    `tuning` is their index and search parameters (None: the defaults).

    Backends are imported here, not at package import, so that using one does not load
    the other's engine. `shard_number` and `replication_factor` apply to collections a
    server store creates (a Qdrant cluster); the embedded store has one shard.
    """
    if qdrant_url:
        from conchdb.store.server import ServerStore

        return ServerStore(
            qdrant_url, api_key=api_key, tuning=tuning, shard_number=shard_number,
            replication_factor=replication_factor,
        )
    if store_path is None:
        raise StoreError(
            "no store given",
            fix="give the folder of an embedded store, or the URL of a Qdrant server",
            parameter="store",
        )
    from conchdb.store.edge import EdgeStore

    return EdgeStore(store_path, tuning=tuning)
