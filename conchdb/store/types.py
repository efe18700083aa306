"""The plain values that cross the store's boundary: filters, points, hits, collection specs.

Ingest and search build and read these; the backends turn them into their engine's
classes and back, so nothing above `conchdb.store` sees a Qdrant type and the engine can
be swapped without touching search. Field types are the catalog's (`conchdb.catalog`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from conchdb.catalog import FieldType

__all__ = ["CollectionSpec", "Condition", "FieldType", "Filter", "Group", "Hit", "Op", "Point"]

Op = Literal["eq", "ne", "in", "gt", "gte", "lt", "lte"]


@dataclass(frozen=True)
class Condition:
    """One test on a payload field; `value` is a list for `in`, a scalar otherwise.

    Every op, `ne` included, matches only points that have the field: `site ne "lung"`
    leaves out tiles with no `site`, as SQL's `<>` leaves out NULL. The value is read as
    the field's indexed type when the collection declares one (so `age gt "50"` works on
    an integer field), else by its Python type (bool, int, float, str). `gt`, `gte`,
    `lt`, `lte` need a number; `in` with an empty list matches nothing.
    """

    field: str
    op: Op
    value: Any


@dataclass(frozen=True)
class Filter:
    """Conditions combined with AND. An empty filter matches every point."""

    must: tuple[Condition, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.must)


@dataclass
class Point:
    """A vector with its id (a UUID string) and payload, ready to upsert."""

    id: str
    vector: np.ndarray
    payload: dict[str, Any]


@dataclass
class Hit:
    """A point returned by a query, scroll or retrieve; `score` is cosine similarity."""

    id: str
    score: float
    payload: dict[str, Any]
    vector: np.ndarray | None = None


@dataclass
class Group:
    """The best hits sharing one value of the grouping field (e.g. one slide)."""

    key: Any
    hits: list[Hit] = field(default_factory=list)


@dataclass
class CollectionSpec:
    """What a collection is: vector size, what built it, its payload fields and their indexes.

    `metadata` records the model fingerprint, preprocessing and tiling parameters; a
    collection refuses writers whose `metadata["model_fingerprint"]` differs, unless it
    records one of `model_aliases` (the same weights' fingerprint as an earlier conchdb
    computed it): then its record takes the writer's fingerprint, and the collection keeps
    its vectors and is known by the new fingerprint from then on.

    `fields` declares the payload fields and their types (the record's `payload_schema`,
    which lets readers type-check filters). `indexed` names those that get a payload index
    (None: all of them). Every index costs time on each write (about 10 us a point in
    qdrant-edge, measured with benchmarks/store.py) and RAM, so a field is worth one when
    filters on it are selective; filters on the others still work, by reading payloads.

    `graph_fields` are the indexed fields that searches often filter on (a manifest's
    `diagnosis`, `site`, `cohort`): the engine links each of their values' points into an
    HNSW graph of their own, so that a search filtered to one value keeps its recall
    instead of wandering a graph whose other nodes it may not visit. Each such field can
    cost up to one more index build. None means every keyword and bool index; numeric
    fields never get one (ranges rarely cut a graph into pieces the same way).

    `load_indexed` names the indexed fields that the writer itself filters on while it
    bulk-loads the collection (ingest finds a slide's tiles by `slide_id` to clean up a
    rerun). The embedded store creates only those indexes with a new collection and the
    rest in `finish_bulk_load`. This saves no work (an index costs about 5 us a point
    whether kept up to date on every write or built at the end, 5-13 us measured on 100k
    points), but it moves that work out of the writes, which hold the interpreter while
    ingest embeds the next tiles, into the final build, where it is 1-3% of the HNSW
    build. Until then, filters on the other fields read payloads (right, but slower).
    None: every index from the start. The server store always indexes from the start.
    """

    name: str
    dim: int = 512
    metadata: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, FieldType] = field(default_factory=dict)
    graph_fields: tuple[str, ...] | None = None
    indexed: tuple[str, ...] | None = None
    load_indexed: tuple[str, ...] | None = None
    model_aliases: tuple[str, ...] = ()

    def index_fields(self) -> dict[str, FieldType]:
        """The fields that get a payload index, with their types."""
        if self.indexed is None:
            return dict(self.fields)
        return {key: kind for key, kind in self.fields.items() if key in self.indexed}

    def load_index_fields(self) -> dict[str, FieldType]:
        """The indexed fields a bulk load needs indexed from the start (see `load_indexed`)."""
        indexes = self.index_fields()
        if self.load_indexed is None:
            return indexes
        return {key: kind for key, kind in indexes.items() if key in self.load_indexed}
