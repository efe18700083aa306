"""The vector-store interface that ingest and search program against, declared once.

Two backends subclass `Store`: `EdgeStore` (qdrant-edge, the Qdrant engine in-process,
the default on one machine) and `ServerStore` (qdrant-client against a Qdrant server
or cluster). Callers pass the typed values of `conchdb.store.types` and get them back;
nothing above this package sees a Qdrant type. The base class also does what both
backends do the same way around their engine calls (the checks of an existing
collection, filter translation, `retrieve`, `scroll`, `with`), so a backend writes only
its engine's calls. As in qdrant-client, every argument after a query's vector is passed
by name (`query(name, vector, k=10, flt=...)`).
"""

from __future__ import annotations

import copy
import os
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from conchdb.catalog import FieldType
from conchdb.errors import StoreError
from conchdb.store.filters import Dialect, translate
from conchdb.store.record import (
    FINGERPRINT,
    CollectionRecord,
    batch_filters,
    batch_vectors,
    check_compatible,
    graph_fields,
    no_collection,
    widen,
)
from conchdb.store.types import CollectionSpec, Filter, Group, Hit, Point

# Index and search defaults of both backends. Filtered search must find the exact top 10
# whatever the filter keeps, also when the points it keeps lie in one region of the space
# (a tissue range, a diagnosis): measured with benchmarks/filters.py, 200k points, 2 cores.
HNSW_M = 16
HNSW_EF_CONSTRUCT = 100
# The engine counts (from the payload indexes) an upper bound of the points a filter keeps
# in each segment and searches them exactly when they hold fewer vectors than this many KB:
# 10,000 of 512-d float32, about 2 ms. Each value of a graph field (one site, one slide)
# that holds more gets HNSW links of its own. At 1,000 KB (500 points), a filter keeping a
# few thousand correlated points walked the graph: tissue>=0.95 found 0.49 of its top 10,
# mosaic=true none at all.
FULL_SCAN_THRESHOLD_KB = 20_000
# A larger filtered set is searched in the graph. A filter on one graph field (a site, a
# diagnosis: any of its values, or none of them) walks that field's own links with a wider
# beam. Any other filter (a range, a tile field, two fields together) has no links of its
# own, and the walk strands where the filter empties the graph: x<4096 (20%, independent of
# the vectors) found 0.94 of its top 10 at beam 512. Those use ACORN, which tries a failing
# neighbour's neighbours and so crosses what the filter empties: 0.999, and 0.995 for the
# correlated tissue<0.4 at beam 256. ACORN costs more per step (5 ms at 1M points for a 20%
# filter on a graph field, where the field's links give the same recall in 5 ms less), so
# it is used only there. "Always" (1.0): the engine's selectivity is an estimate, wrong in
# just the correlated cases ACORN is for.
ACORN_MAX_SELECTIVITY = 1.0
# Search beams, for recall@10 above 0.99 on benchmarks/filters.py: 192 unfiltered (0.998),
# 512 along a graph field's links (site=breast, 22%, correlated: 0.978 at 192, 0.995 at 512,
# 0.4 ms more), 256 with ACORN.
HNSW_EF = 192
HNSW_EF_FILTERED = 512
HNSW_EF_ACORN = 256
OVERSAMPLING = 2.0


class Walk(Enum):
    """How a query walks the graph (where the engine does not search its filtered set exactly)."""

    PLAIN = "plain"  # no filter
    LINKED = "linked"  # a filter on one graph field, whose values have links of their own
    ACORN = "acorn"  # any other filter


def walk_of(flt: Filter | None, graph: Sequence[str]) -> Walk:
    """The walk for `flt` in a collection whose graph fields are `graph`."""
    if not flt:
        return Walk.PLAIN
    fields = {cond.field for cond in flt.must}
    return Walk.LINKED if len(fields) == 1 and fields <= set(graph) else Walk.ACORN


@dataclass(frozen=True)
class StoreTuning:
    """How both backends build and search their index: one value, passed as `tuning=`.

    `hnsw_m` (links per node) and `hnsw_ef_construct` (build beam) shape the HNSW graph of
    the collections a store creates, and `full_scan_kb` is where their filtered searches
    turn exact (FULL_SCAN_THRESHOLD_KB); `hnsw_ef`, `hnsw_ef_filtered` and `hnsw_ef_acorn`
    are the search beams of each `Walk` (widened to k + offset when a query asks for more).
    With
    `quantization`, int8 copies of the vectors live in RAM and are searched first, 4x
    cheaper than float32; `rescore` re-ranks the best `oversampling` x k candidates with
    the original vectors, so scores stay exact cosines.
    """

    hnsw_m: int = HNSW_M
    hnsw_ef_construct: int = HNSW_EF_CONSTRUCT
    full_scan_kb: int = FULL_SCAN_THRESHOLD_KB
    hnsw_ef: int = HNSW_EF
    hnsw_ef_filtered: int = HNSW_EF_FILTERED
    hnsw_ef_acorn: int = HNSW_EF_ACORN
    quantization: bool = True
    rescore: bool = True
    oversampling: float = OVERSAMPLING

    def beam(self, walk: Walk, wanted: int = 0) -> int:
        """The search beam of a walk for `wanted` hits (k + offset)."""
        chosen = {Walk.PLAIN: self.hnsw_ef, Walk.LINKED: self.hnsw_ef_filtered, Walk.ACORN: self.hnsw_ef_acorn}
        return max(chosen[walk], int(wanted))


def point_ids(ids: Sequence[str]) -> list[str]:
    """Ids as the engines print them (lowercase, hyphenated), without repeats; non-UUIDs are
    left out, since no conchdb point can have one."""
    out = []
    for point_id in ids:
        try:
            out.append(str(uuid.UUID(str(point_id))))
        except ValueError:
            continue
    return list(dict.fromkeys(out))


def store_identity(*, path: str | os.PathLike[str] | None = None, url: str | None = None) -> str:
    """The identity of the store at a folder or a server URL, known before opening it (a
    second open of an embedded store fails on its lock, with a message about another process).

    A server's URL is compared without case in the scheme and host and without a trailing
    slash; two spellings of one host (a name and its address) are not recognised.
    """
    if url:
        parts = urlsplit(url.strip())
        host = (parts.hostname or "").lower()
        try:
            port = f":{parts.port}" if parts.port else ""
        except ValueError:  # not a port number: the server store's own open will say so
            port = parts.netloc.rpartition(":")[2]
        return f"qdrant {parts.scheme.lower()}://{host}{port}{parts.path.rstrip('/')}"
    if path is None:
        raise StoreError("no store given", fix="give the folder of an embedded store, or the URL of a Qdrant server",
                         parameter="store")
    return f"embedded {Path(path).expanduser().resolve()}"


def to_hit(point: Any, with_vectors: bool) -> Hit:
    """A Hit from either engine's scored point or record (same attribute names in both)."""
    vector = getattr(point, "vector", None) if with_vectors else None
    if isinstance(vector, dict):  # a named-vector map; conchdb uses the unnamed vector only
        vector = vector.get("")
    return Hit(
        id=str(point.id),
        score=float(getattr(point, "score", 0.0) or 0.0),
        payload=dict(point.payload or {}),
        vector=None if vector is None else np.asarray(vector, dtype=np.float32),
    )


def best_per_group(points: Sequence[Any], group_by: str) -> list[Hit]:
    """The first (best) of an engine's scored points for each value of `group_by`, as hits;
    the rest are skipped before their id and payload are converted."""
    seen: set[Any] = set()
    out = []
    for point in points:
        key = (point.payload or {}).get(group_by)
        if key is None or isinstance(key, (list, dict)) or key in seen:
            continue
        seen.add(key)
        out.append(to_hit(point, False))
    return out


@dataclass
class BatchPlan:
    """A batch of searches ready for an engine: one query vector (as a list), one
    translated filter and one walk per search, the payload keys to return (None: all), and the field
    to keep one hit per value of."""

    vectors: list[list[float]]
    filters: list[Any]
    walks: list[Walk]
    payload_fields: list[str] | None
    group_by: str | None

    def hits(self, results: Sequence[Sequence[Any]]) -> list[list[Hit]]:
        """Each search's scored points as hits; with no payload asked for (many one-hit
        searches), ids and scores only, without the general conversion."""
        if self.payload_fields == []:
            return [[Hit(str(p.id), float(p.score), {}) for p in points] for points in results]
        if self.group_by is None:
            return [[to_hit(p, False) for p in points] for points in results]
        return [best_per_group(points, self.group_by) for points in results]


def facet_counts(pairs: Iterable[tuple[Any, int]]) -> list[tuple[Any, int]]:
    """Facet hits as plain `(value, count)` pairs, most frequent first, then by value."""
    plain = [(v.item() if isinstance(v, np.generic) else v, int(c)) for v, c in pairs]
    return sorted(plain, key=lambda p: (-p[1], str(p[0])))


def sort_groups(groups: list[Group]) -> list[Group]:
    """Hits best first inside each group, groups by their best hit."""
    for g in groups:
        g.hits.sort(key=lambda h: -h.score)
    return sorted(groups, key=lambda g: -g.hits[0].score)


class Store(ABC):
    """Operations conchdb needs from a vector store. Vectors are float32, compared by cosine.

    A backend sets `location` (named in errors) and `dialect` (its filter classes), and
    implements the public operations below that are abstract, plus the engine hooks:
    `_read_record` (None when the collection is missing), `_save_record`,
    `_create_indexes`, `_fetch` (points by id) and `_page` (one scroll page).
    """

    location: str
    dialect: Dialect

    # -- the interface ---------------------------------------------------------------------

    @abstractmethod
    def ensure_collection(self, spec: CollectionSpec) -> None:
        """Create the collection, or check that an existing one was built by the same model
        and add the fields and payload indexes it lacks."""

    @abstractmethod
    def collections(self) -> list[str]:
        """Names of the conchdb collections in this store."""

    @abstractmethod
    def upsert(self, name: str, points: Sequence[Point], shared: dict[str, Any] | None = None) -> None:
        """Insert or overwrite points by id, all or none of them.

        `shared` holds payload fields that every point of the batch gets (a slide's path,
        pixel size, manifest row): passed once instead of in each point's payload, which
        the embedded store writes far faster. A key may not be in both (StoreError).
        """

    @abstractmethod
    def delete(self, name: str, flt: Filter) -> None:
        """Remove every point matching the filter (an empty filter is refused)."""

    @abstractmethod
    def set_payload(
        self, name: str, payload: dict[str, Any], *, flt: Filter | None = None, ids: Sequence[str] | None = None
    ) -> None:
        """Set `payload`'s fields on the points matching `flt` (or with the given `ids`),
        keeping their other fields and their vectors: how labels change without re-embedding."""

    @abstractmethod
    def delete_payload(
        self, name: str, keys: Sequence[str], *, flt: Filter | None = None, ids: Sequence[str] | None = None
    ) -> None:
        """Remove the payload fields `keys` from the points matching `flt` (or with the given `ids`)."""

    @abstractmethod
    def query(
        self,
        name: str,
        vector: np.ndarray,
        *,
        k: int,
        flt: Filter | None = None,
        min_score: float | None = None,
        offset: int = 0,
        with_vectors: bool = False,
    ) -> list[Hit]:
        """Nearest points to `vector`, best first: `k` of them after skipping `offset`, those
        matching `flt` and scoring at least `min_score`."""

    @abstractmethod
    def query_batch(
        self,
        name: str,
        vectors: np.ndarray,
        *,
        k: int,
        flts: Sequence[Filter | None] | Filter | None = None,
        payload_fields: Sequence[str] | None = None,
        group_by: str | None = None,
        rows: Sequence[int] | None = None,
    ) -> list[list[Hit]]:
        """The nearest `k` points to each row of `vectors`, best first, one list per row,
        planned and run as one batch (much cheaper than one `query` per row).

        With `rows`, the batch has one search per entry, each with row `rows[j]` of
        `vectors`: one vector asked under several filters is converted once.
        `flts` is one filter for every search, or one per search (a filter object given
        for several is translated once). `payload_fields` limits the
        payload returned to those keys (None: all of it): converting hits into Python
        objects is most of the cost of a deep query. With `group_by`, a row's list keeps
        only the best of its `k` nearest for each value of that field (one hit per slide),
        and the others are never converted; points without the field are left out.
        """

    @abstractmethod
    def query_groups(
        self,
        name: str,
        vector: np.ndarray,
        *,
        group_by: str,
        groups: int,
        group_size: int,
        flt: Filter | None = None,
        min_score: float | None = None,
    ) -> list[Group]:
        """Best `group_size` hits for each of the best `groups` values of `group_by`."""

    @abstractmethod
    def count(self, name: str, flt: Filter | None = None) -> int:
        """Number of points matching the filter (exact)."""

    @abstractmethod
    def facet(self, name: str, key: str, *, flt: Filter | None = None, limit: int = 100) -> list[tuple[Any, int]]:
        """The values of `key` among the points matching `flt`, with how many points hold each
        (exact counts, most frequent first, at most `limit`); Qdrant's facet, which needs a
        payload index on `key` (keyword, integer or bool)."""

    @abstractmethod
    def finish_bulk_load(self, name: str) -> None:
        """Build the index after a bulk load (server: switch HNSW back on); a no-op where not needed."""

    def warm(self, name: str) -> int:
        """Ask for the collection's files to be read into memory ahead of the first queries;
        the bytes asked for (0 where the store is not local: a server keeps its own)."""
        return 0

    @abstractmethod
    def size_on_disk(self) -> int | None:
        """Bytes used on disk, where the backend can tell."""

    @abstractmethod
    def close(self) -> None:
        """Flush and release the store (the embedded store's lock included); safe to call twice."""

    def collection_metadata(self, name: str) -> dict[str, Any] | None:
        """The metadata recorded at creation, or None if the collection does not exist.

        It also holds `payload_schema`: the payload fields and their types, as declared
        by `CollectionSpec.fields` (so readers can type-check filters).
        """
        record = self._read_record(name)
        if record is None:
            return None
        return {**record.metadata, "payload_schema": dict(record.fields)}

    def update_metadata(self, name: str, **fields: Any) -> dict[str, Any]:
        """Set `fields` in the collection's recorded metadata, keeping the rest; the new metadata.

        For what is learnt about a collection after it was created (its noise floor, measured
        at the end of an ingest). The model fingerprint is what every writer is checked
        against, so it cannot be changed here: that would let another model's vectors in."""
        if "model_fingerprint" in fields or "payload_schema" in fields:
            raise StoreError(
                "a collection's model fingerprint and payload schema are set when it is created",
                fix="ingest into a new collection to change them",
                parameter="metadata",
            )
        record = self._record(name)
        record.metadata.update(copy.deepcopy(fields))
        self._save_record(record)
        return self.collection_metadata(name) or {}

    def collection_record(self, name: str) -> CollectionRecord | None:
        """A copy of the collection's record (size, metadata, declared fields, payload
        indexes and graph fields), or None if the collection does not exist.

        `collection_metadata` is what readers need; a copy into another store needs the
        whole record, so that the collection it creates there indexes the same fields."""
        record = self._read_record(name)
        return None if record is None else CollectionRecord.from_dict(copy.deepcopy(record.to_dict()))

    @property
    def identity(self) -> str:
        """What tells this store apart from every other (see `store_identity`): two store
        objects with the same identity read and write the same data."""
        return self.location

    def retrieve(self, name: str, ids: Sequence[str], *, with_vectors: bool = False) -> list[Hit]:
        """Points by id, in the order asked, missing ones left out; score is 0."""
        self._record(name)
        wanted = point_ids(ids)
        found = {
            str(r.id): to_hit(r, with_vectors) for r in (self._fetch(name, wanted, with_vectors) if wanted else [])
        }
        return [found[i] for i in wanted if i in found]

    def scroll(self, name: str, flt: Filter | None = None, *, with_vectors: bool = False) -> Iterator[Hit]:
        """Every point matching the filter, page by page, in id order."""
        native = self._filter(self._record(name), flt)
        offset = None
        while True:
            page, offset = self._page(name, native, offset, with_vectors)
            yield from (to_hit(r, with_vectors) for r in page)
            if offset is None:
                return

    # -- the engine hooks ------------------------------------------------------------------

    @abstractmethod
    def _read_record(self, name: str) -> CollectionRecord | None:
        ...

    @abstractmethod
    def _save_record(self, record: CollectionRecord) -> None:
        ...

    @abstractmethod
    def _create_indexes(self, name: str, indexes: dict[str, FieldType], graph: set[str]) -> None:
        ...

    @abstractmethod
    def _fetch(self, name: str, ids: list[str], with_vectors: bool) -> list[Any]:
        ...

    @abstractmethod
    def _page(self, name: str, native_filter: Any, offset: Any, with_vectors: bool) -> tuple[list[Any], Any]:
        ...

    # -- shared steps ----------------------------------------------------------------------

    def _plan_batch(
        self,
        name: str,
        vectors: np.ndarray,
        flts: Sequence[Filter | None] | Filter | None,
        payload_fields: Sequence[str] | None,
        group_by: str | None,
        rows: Sequence[int] | None,
    ) -> BatchPlan:
        """What both backends make of `query_batch`'s arguments before their engine call."""
        record = self._record(name)
        if rows is None:
            lists = batch_vectors(vectors, record, self.location)
        else:
            array = np.asarray(vectors, dtype=np.float32).reshape(-1, np.shape(vectors)[-1])
            if any(not 0 <= i < len(array) for i in rows):
                raise StoreError(f"a batch of {len(array)} query vectors was asked for a row outside them")
            used = sorted(set(rows))  # each vector asked is converted once, the others not at all
            converted = dict(zip(used, batch_vectors(array[used], record, self.location), strict=True))
            lists = [converted[i] for i in rows]
        planned: dict[int, tuple[Any, Walk]] = {}  # a filter repeated over the batch is planned once
        filters, walks = [], []
        for flt in batch_filters(flts, len(lists)):
            if id(flt) not in planned:
                planned[id(flt)] = self._filter(record, flt), walk_of(flt, record.graph)
            native, walk = planned[id(flt)]
            filters.append(native)
            walks.append(walk)
        if payload_fields is not None and group_by is not None and group_by not in payload_fields:
            payload_fields = [*payload_fields, group_by]
        return BatchPlan(lists, filters, walks, None if payload_fields is None else list(payload_fields), group_by)

    def _selection(self, name: str, flt: Filter | None, ids: Sequence[str] | None) -> tuple[Any, list[str] | None]:
        """A payload update's points: the native filter, or the ids (exactly one of them);
        an empty filter would touch every point, so it is refused as `delete` refuses it."""
        if (flt is None) == (ids is None):
            raise StoreError("a payload update names its points by a filter or by ids, not both or neither")
        if ids is not None:
            self._record(name)
            return None, point_ids(ids)
        assert flt is not None
        return self._filter(self._delete_filter(name, flt), flt), None

    def _filter(self, record: CollectionRecord, flt: Filter | None) -> Any:
        return translate(flt, self.dialect, record.fields)

    def _record(self, name: str) -> CollectionRecord:
        record = self._read_record(name)
        if record is None:
            raise no_collection(self.location, name)
        return record

    def _join(self, record: CollectionRecord, spec: CollectionSpec) -> None:
        """An existing collection: refuse another model, then add the fields and indexes the spec asks for."""
        check_compatible(self.location, record, spec)
        new_fields, new_indexes = widen(record, spec)
        if new_indexes:
            self._create_indexes(spec.name, new_indexes, graph_fields(spec))
        renamed = record.metadata.get(FINGERPRINT) in spec.model_aliases
        if renamed:  # the same weights, fingerprinted by an earlier conchdb: known by the new one now
            record.metadata[FINGERPRINT] = spec.metadata[FINGERPRINT]
        if new_fields or new_indexes or renamed:
            record.fields.update(new_fields)
            record.indexed = sorted({*record.indexed, *new_indexes})
            record.graph = sorted({*record.graph, *(graph_fields(spec) & set(new_indexes))})
            self._save_record(record)

    def _delete_filter(self, name: str, flt: Filter) -> CollectionRecord:
        """The record of a collection about to lose points; an empty filter would empty it, so it is refused."""
        record = self._record(name)
        if not flt:
            raise StoreError(
                f"refusing to delete every point of collection '{name}' (the filter is empty)",
                fix="give at least one condition, e.g. slide_id eq ID",
                parameter="filter",
            )
        return record

    def __enter__(self):
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.location!r})"
