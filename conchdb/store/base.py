"""The vector-store interface that ingest and search program against.

Two backends implement it: `EdgeStore` (qdrant-edge, the Qdrant engine in-process,
the default on one machine) and `ServerStore` (qdrant-client against a Qdrant server
or cluster). Callers pass typed `Filter`s and get typed `Hit`s back; nothing above
this package sees a Qdrant type, so the engine can be swapped without touching search.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

Op = Literal["eq", "ne", "in", "gt", "gte", "lt", "lte"]
FieldType = Literal["keyword", "integer", "float", "bool"]


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
    collection refuses writers whose `metadata["model_fingerprint"]` differs.

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


class Store(Protocol):
    """Operations conchdb needs from a vector store. Vectors are float32, compared by cosine."""

    location: str

    def ensure_collection(self, spec: CollectionSpec) -> None:
        """Create the collection, or check that an existing one was built by the same model."""

    def collection_metadata(self, name: str) -> dict[str, Any] | None:
        """The metadata recorded at creation, or None if the collection does not exist.

        It also holds `payload_schema`: the payload fields and their types, as declared
        by `CollectionSpec.fields` (so readers can type-check filters).
        """

    def collections(self) -> list[str]:
        """Names of the conchdb collections in this store."""

    def upsert(self, name: str, points: Sequence[Point], shared: dict[str, Any] | None = None) -> None:
        """Insert or overwrite points by id, all or none of them.

        `shared` holds payload fields that every point of the batch gets (a slide's path,
        pixel size, manifest row): passed once instead of in each point's payload, which
        the embedded store writes far faster. A key may not be in both (StoreError).
        """

    def delete(self, name: str, flt: Filter) -> None:
        """Remove every point matching the filter."""

    def query(
        self,
        name: str,
        vector: np.ndarray,
        k: int,
        flt: Filter | None = None,
        min_score: float | None = None,
        offset: int = 0,
        with_vectors: bool = False,
    ) -> list[Hit]:
        """Nearest points to `vector`, best first."""

    def query_groups(
        self,
        name: str,
        vector: np.ndarray,
        group_by: str,
        groups: int,
        group_size: int,
        flt: Filter | None = None,
        min_score: float | None = None,
    ) -> list[Group]:
        """Best `group_size` hits for each of the best `groups` values of `group_by`."""

    def retrieve(self, name: str, ids: Sequence[str], with_vectors: bool = False) -> list[Hit]:
        """Points by id (missing ids are left out); score is 0."""

    def scroll(self, name: str, flt: Filter | None = None, with_vectors: bool = False) -> Iterator[Hit]:
        """Every point matching the filter, in id order."""

    def count(self, name: str, flt: Filter | None = None) -> int:
        """Number of points matching the filter (exact)."""

    def finish_bulk_load(self, name: str) -> None:
        """Build the index after a bulk load (server: switch HNSW back on); a no-op where not needed."""

    def size_on_disk(self) -> int | None:
        """Bytes used on disk, where the backend can tell."""

    def close(self) -> None:
        """Flush and release the store (the embedded store's lock included)."""
