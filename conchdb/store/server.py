"""The server store: qdrant-client against a Qdrant server or cluster.

Use it when several processes (Celery workers, the API) read and write at once, or when
the data outgrows one machine. The collection record lives in the collection's own
Qdrant metadata under the key `conchdb`, so it travels with snapshots and is visible to
any Qdrant tool. New collections start with HNSW switched off (`m=0`) so that a bulk
ingest does not rebuild the graph as it grows; `finish_bulk_load` switches it on and the
server builds the index once. Vectors are also kept as int8 scalar-quantized copies,
searched first and rescored with the originals (both configurable).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import numpy as np
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

from conchdb.catalog import FieldType
from conchdb.errors import StoreError
from conchdb.store.base import (
    ACORN_MAX_SELECTIVITY,
    Store,
    StoreTuning,
    Walk,
    facet_counts,
    sort_groups,
    store_identity,
    to_hit,
    walk_of,
)
from conchdb.store.filters import Dialect
from conchdb.store.record import (
    CollectionRecord,
    check_name,
    check_shared,
    check_spec,
    graph_fields,
    no_collection,
    query_vector,
    vectors_of,
)
from conchdb.store.types import CollectionSpec, Filter, Group, Hit, Point

META_KEY = "conchdb"
SCROLL_PAGE = 1000
T = TypeVar("T")


def _index_params(kind: FieldType, graph: bool) -> Any:
    """Payload index parameters; `graph` gives the field's values HNSW links of their own."""
    if kind == "keyword":
        return models.KeywordIndexParams(type=models.KeywordIndexType.KEYWORD, enable_hnsw=graph)
    if kind == "integer":
        return models.IntegerIndexParams(type=models.IntegerIndexType.INTEGER, enable_hnsw=graph)
    if kind == "float":
        return models.FloatIndexParams(type=models.FloatIndexType.FLOAT, enable_hnsw=graph)
    return models.BoolIndexParams(type=models.BoolIndexType.BOOL, enable_hnsw=graph)


SERVER_DIALECT = Dialect(
    match=lambda key, value: models.FieldCondition(key=key, match=models.MatchValue(value=value)),
    match_any=lambda key, values: models.FieldCondition(key=key, match=models.MatchAny(any=values)),
    range=lambda key, bounds: models.FieldCondition(key=key, range=models.Range(**bounds)),
    is_empty=lambda key: models.IsEmptyCondition(is_empty=models.PayloadField(key=key)),
    filter=lambda must, must_not, should: models.Filter(
        must=must or None, must_not=must_not or None, should=should or None
    ),
)


class ServerStore(Store):
    """A conchdb store on a Qdrant server (`url`), or on a given `client` (tests: `QdrantClient(":memory:")`).

    Of `tuning`, `hnsw_m`/`hnsw_ef_construct` are the index built by `finish_bulk_load`,
    `hnsw_ef` the search beam; `quantization` keeps int8 copies of the vectors in RAM, and
    `rescore` re-ranks the quantized candidates (`oversampling` times more of them) with
    the original vectors. `timeout` is each request's, in seconds.
    """

    dialect = SERVER_DIALECT

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        client: QdrantClient | None = None,
        *,
        tuning: StoreTuning | None = None,
        timeout: int = 60,
        shard_number: int | None = None,
        replication_factor: int | None = None,
    ):
        if client is None and not url:
            raise StoreError(
                "no Qdrant server URL given",
                fix="give the server's URL or set CONCHDB_QDRANT_URL",
                parameter="qdrant_url",
            )
        self.url = url
        self.location = f"Qdrant server {url}" if url else "in-process qdrant-client"
        self._owns_client = client is None
        self.client = (
            client
            if client is not None
            else QdrantClient(url=url, api_key=api_key, timeout=timeout, check_compatibility=False)
        )
        self.tuning = tuning = tuning or StoreTuning()
        # A cluster spreads a new collection over `shard_number` shards, each kept on
        # `replication_factor` nodes; None leaves the server's defaults (one node: 1 and 1).
        self.shard_number, self.replication_factor = shard_number, replication_factor
        quantized = (
            models.QuantizationSearchParams(rescore=tuning.rescore, oversampling=tuning.oversampling)
            if tuning.quantization
            else None
        )
        self._params = {
            walk: models.SearchParams(
                hnsw_ef=tuning.beam(walk),
                quantization=quantized,
                acorn=models.AcornSearchParams(enable=walk is Walk.ACORN, max_selectivity=ACORN_MAX_SELECTIVITY),
            )
            for walk in Walk
        }
        self._records: dict[str, CollectionRecord] = {}
        self._call(None, self.client.get_collections)  # fail now, with the fix, if the server is unreachable

    @property
    def identity(self) -> str:
        """The server's URL; a client given without one (tests) is a store of its own."""
        return store_identity(url=self.url) if self.url else f"qdrant-client object {id(self.client)}"

    # -- plumbing ----------------------------------------------------------------------

    def _call(self, name: str | None, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a client call; turn an unreachable server or a missing collection into a StoreError."""
        try:
            return fn(*args, **kwargs)
        except ResponseHandlingException as exc:
            raise StoreError(
                f"cannot reach {self.location}: {exc}",
                fix="start the server (docker compose up qdrant) or check the URL (CONCHDB_QDRANT_URL)",
                parameter="qdrant_url",
            ) from exc
        except UnexpectedResponse as exc:
            if exc.status_code in (401, 403):
                raise StoreError(
                    f"{self.location} refused the API key ({exc.status_code})",
                    fix="set CONCHDB_QDRANT_API_KEY to the server's key",
                    parameter="qdrant_api_key",
                ) from exc
            if name is not None and exc.status_code == 404:
                raise no_collection(self.location, name) from exc
            raise
        except ValueError as exc:  # local mode's "Collection ... not found"
            if name is not None and "not found" in str(exc):
                raise no_collection(self.location, name) from exc
            raise

    def _read_record(self, name: str) -> CollectionRecord | None:
        if name in self._records:
            return self._records[name]
        if not self._call(None, self.client.collection_exists, check_name(name)):
            return None
        info = self._call(name, self.client.get_collection, name)
        data = (info.config.metadata or {}).get(META_KEY)
        if not isinstance(data, dict):
            raise StoreError(
                f"collection '{name}' on {self.location} was not created by conchdb (it has no conchdb record)",
                fix="choose another collection name",
                parameter="collection",
            )
        record = CollectionRecord.from_dict(data)
        self._records[name] = record
        return record

    # -- collections -------------------------------------------------------------------

    def _create_indexes(self, name: str, indexes: dict[str, FieldType], graph: set[str]) -> None:
        for key, kind in indexes.items():
            schema = _index_params(kind, key in graph)
            self._call(name, self.client.create_payload_index, name, key, field_schema=schema, wait=True)

    def _create(self, spec: CollectionSpec) -> bool:
        """Create the collection with HNSW off; False if another process created it first."""
        record = CollectionRecord.new(spec)
        quantization = (
            models.ScalarQuantization(
                scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, quantile=0.99, always_ram=True)
            )
            if self.tuning.quantization
            else None
        )
        try:
            self._call(
                None,
                self.client.create_collection,
                spec.name,
                vectors_config=models.VectorParams(size=spec.dim, distance=models.Distance.COSINE),
                hnsw_config=models.HnswConfigDiff(
                    m=0, ef_construct=self.tuning.hnsw_ef_construct, full_scan_threshold=self.tuning.full_scan_kb
                ),
                quantization_config=quantization,
                shard_number=self.shard_number,
                replication_factor=self.replication_factor,
                metadata={META_KEY: record.to_dict()},
            )
        except (UnexpectedResponse, ValueError) as exc:
            if "already exists" in str(exc):
                return False
            raise
        self._records[spec.name] = record
        self._create_indexes(spec.name, spec.index_fields(), graph_fields(spec))
        return True

    def ensure_collection(self, spec: CollectionSpec) -> None:
        """Create the collection, or check an existing one and add the payload indexes it lacks.

        Safe when several workers start at once: the loser of the creation race checks the
        winner's record like any existing collection.
        """
        check_spec(spec)
        self._records.pop(spec.name, None)  # another process may have changed it
        record = self._read_record(spec.name)
        if record is None and self._create(spec):
            return
        self._join(self._record(spec.name), spec)

    def _save_record(self, record: CollectionRecord) -> None:
        self._call(record.name, self.client.update_collection, record.name, metadata={META_KEY: record.to_dict()})
        self._records[record.name] = record

    def collections(self) -> list[str]:
        names = [c.name for c in self._call(None, self.client.get_collections).collections]
        ours = []
        for name in names:
            info = self._call(name, self.client.get_collection, name)
            if isinstance((info.config.metadata or {}).get(META_KEY), dict):
                ours.append(name)
        return sorted(ours)

    # -- writes ------------------------------------------------------------------------

    def upsert(self, name: str, points: Sequence[Point], shared: dict[str, Any] | None = None) -> None:
        """Insert or overwrite points; `shared` is merged into each payload (one request, all or none)."""
        if not points:
            return
        vectors = vectors_of(points, self._record(name), self.location)
        payloads = [p.payload for p in points]
        if shared:
            check_shared(points, shared)
            payloads = [{**payload, **shared} for payload in payloads]
        batch = models.Batch(ids=[p.id for p in points], vectors=vectors.tolist(), payloads=payloads)
        self._call(name, self.client.upsert, name, points=batch, wait=True)

    def delete(self, name: str, flt: Filter) -> None:
        record = self._delete_filter(name, flt)
        selector = models.FilterSelector(filter=self._filter(record, flt))
        self._call(name, self.client.delete, name, points_selector=selector, wait=True)

    def set_payload(
        self, name: str, payload: dict[str, Any], *, flt: Filter | None = None, ids: Sequence[str] | None = None
    ) -> None:
        native, wanted = self._selection(name, flt, ids)
        if not payload or wanted == []:
            return
        points = wanted if wanted is not None else models.FilterSelector(filter=native)
        self._call(name, self.client.set_payload, name, payload=payload, points=points, wait=True)

    def delete_payload(
        self, name: str, keys: Sequence[str], *, flt: Filter | None = None, ids: Sequence[str] | None = None
    ) -> None:
        native, wanted = self._selection(name, flt, ids)
        if not keys or wanted == []:
            return
        points = wanted if wanted is not None else models.FilterSelector(filter=native)
        self._call(name, self.client.delete_payload, name, keys=list(keys), points=points, wait=True)

    def finish_bulk_load(self, name: str) -> None:
        """Switch HNSW on (`m` > 0); the server builds the index in the background."""
        self._record(name)
        hnsw = models.HnswConfigDiff(
            m=self.tuning.hnsw_m,
            ef_construct=self.tuning.hnsw_ef_construct,
            full_scan_threshold=self.tuning.full_scan_kb,
        )
        self._call(name, self.client.update_collection, name, hnsw_config=hnsw)

    # -- reads -------------------------------------------------------------------------

    def _search_params(self, walk: Walk, wanted: int) -> models.SearchParams:
        """The search parameters of a walk for `wanted` hits (k + offset), its beam widened to them."""
        params = self._params[walk]
        beam = self.tuning.beam(walk, wanted)
        return params if beam == params.hnsw_ef else params.model_copy(update={"hnsw_ef": beam})

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
        if k <= 0:
            return []
        record = self._record(name)
        result = self._call(
            name,
            self.client.query_points,
            name,
            query=query_vector(vector, record, self.location),
            query_filter=self._filter(record, flt),
            limit=int(k),
            offset=int(offset) or None,
            score_threshold=min_score,
            with_payload=True,
            with_vectors=with_vectors,
            search_params=self._search_params(walk_of(flt, record.graph), int(k) + int(offset)),
        )
        return [to_hit(p, with_vectors) for p in result.points]

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
        """One `query_batch_points` request (see `Store.query_batch`)."""
        plan = self._plan_batch(name, vectors, flts, payload_fields, group_by, rows)
        if k <= 0 or not plan.vectors:
            return [[] for _ in plan.vectors]
        # No payload asked for: False, which spares the server reading each hit's payload.
        selector: bool | list[str] = True if plan.payload_fields is None else plan.payload_fields or False
        requests = [
            models.QueryRequest(
                query=row,
                filter=native,
                limit=int(k),
                with_payload=selector,
                with_vector=False,
                params=self._params[walk],
            )
            for row, native, walk in zip(plan.vectors, plan.filters, plan.walks, strict=True)
        ]
        results = self._call(name, self.client.query_batch_points, name, requests=requests)
        return plan.hits([result.points for result in results])

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
        if groups <= 0 or group_size <= 0:
            return []
        record = self._record(name)
        result = self._call(
            name,
            self.client.query_points_groups,
            name,
            group_by=group_by,
            query=query_vector(vector, record, self.location),
            query_filter=self._filter(record, flt),
            limit=int(groups),
            group_size=int(group_size),
            score_threshold=min_score,
            with_payload=True,
            search_params=self._params[walk_of(flt, record.graph)],
        )
        found = [Group(key=g.id, hits=[to_hit(p, False) for p in g.hits]) for g in result.groups]
        return sort_groups(found)

    def _fetch(self, name: str, ids: list[str], with_vectors: bool) -> list[Any]:
        return self._call(name, self.client.retrieve, name, ids=ids, with_payload=True, with_vectors=with_vectors)

    def _page(self, name: str, native_filter: Any, offset: Any, with_vectors: bool) -> tuple[list[Any], Any]:
        return self._call(
            name,
            self.client.scroll,
            name,
            scroll_filter=native_filter,
            limit=SCROLL_PAGE,
            offset=offset,
            with_payload=True,
            with_vectors=with_vectors,
        )

    def count(self, name: str, flt: Filter | None = None) -> int:
        record = self._record(name)
        return int(self._call(name, self.client.count, name, count_filter=self._filter(record, flt), exact=True).count)

    def facet(self, name: str, key: str, *, flt: Filter | None = None, limit: int = 100) -> list[tuple[Any, int]]:
        record = self._record(name)
        answer = self._call(name, self.client.facet, name, key, facet_filter=self._filter(record, flt),
                            limit=limit, exact=True)
        return facet_counts((h.value, h.count) for h in answer.hits)

    # -- the store ---------------------------------------------------------------------

    def size_on_disk(self) -> int | None:
        """Unknown: the server's disk is not ours to measure."""
        return None

    def close(self) -> None:
        """Close the client if this store made it; a client passed in belongs to the caller."""
        if self._owns_client:
            self.client.close()
        self._records.clear()
