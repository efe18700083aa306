"""The collection record, and the checks both backends make against it.

The collection record is what conchdb writes beside a collection when it creates it:
its vector size, its payload fields and indexes and the metadata of the model, preprocessing and
tiling that built it. The embedded store keeps it as `collection.json` beside the shard,
the server store in the collection's own Qdrant metadata under the key `conchdb`; both
read and check it here, so the two refuse the same things with the same words.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from conchdb import __version__
from conchdb.catalog import FIELD_TYPES, GRAPH_TYPES, FieldType
from conchdb.errors import StoreError
from conchdb.store.types import CollectionSpec, Filter, Point

RECORD_FORMAT = 2  # 1 had `indexes` only: every declared field was indexed
FINGERPRINT = "model_fingerprint"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass
class CollectionRecord:
    """The persisted description of a conchdb collection (JSON-ready)."""

    name: str
    dim: int
    metadata: dict[str, Any] = field(default_factory=dict)
    fields: dict[str, FieldType] = field(default_factory=dict)
    indexed: list[str] = field(default_factory=list)
    graph: list[str] = field(default_factory=list)  # indexed fields with per-value HNSW graphs
    format: int = RECORD_FORMAT
    created_at: str = ""
    created_by: str = ""

    @classmethod
    def new(cls, spec: CollectionSpec) -> CollectionRecord:
        return cls(
            name=spec.name,
            dim=int(spec.dim),
            metadata=dict(spec.metadata),
            fields=dict(spec.fields),
            indexed=sorted(spec.index_fields()),
            graph=sorted(graph_fields(spec)),
            created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            created_by=f"conchdb {__version__}",
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CollectionRecord:
        if "fields" not in data and "indexes" in data:  # format 1
            data = {**data, "fields": data["indexes"], "indexed": sorted(data["indexes"])}
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def check_name(name: str) -> str:
    """Collection names are folder names in the embedded store, so both backends take the same safe set."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise StoreError(
            f"invalid collection name {name!r}",
            fix="use 1-128 letters, digits, '_', '-' or '.', starting with a letter or digit",
            parameter="collection",
        )
    return name


def check_spec(spec: CollectionSpec) -> None:
    """Refuse a spec that no backend could honour, before anything is created."""
    check_name(spec.name)
    if not isinstance(spec.dim, int) or spec.dim <= 0:
        raise StoreError(f"collection '{spec.name}': vector size {spec.dim!r} must be a positive integer")
    for key, kind in spec.fields.items():
        if kind not in FIELD_TYPES:
            raise StoreError(
                f"collection '{spec.name}': field '{key}' has unknown type {kind!r}",
                fix=f"use one of {', '.join(FIELD_TYPES)}",
            )
    undeclared = sorted(set(spec.indexed or ()) - set(spec.fields))
    if undeclared:
        raise StoreError(
            f"collection '{spec.name}': cannot index {', '.join(undeclared)}, which the spec does not declare",
            fix="add them to the spec's fields with their types",
        )
    unindexed = sorted(set(spec.load_indexed or ()) - set(spec.index_fields()))
    if unindexed:
        raise StoreError(
            f"collection '{spec.name}': load_indexed names {', '.join(unindexed)}, which get no index",
            fix="list only fields that `indexed` names",
        )


def check_compatible(location: str, record: CollectionRecord, spec: CollectionSpec) -> None:
    """Refuse to write into an existing collection built by another model or with another vector size.

    Only the fingerprint and the size are binding: other metadata (tiling, preprocessing
    notes) may differ between runs, and the record keeps what the first writer recorded.
    A spec without a fingerprint (a reader, or a collection that is not about a model) is
    not refused.
    """
    if record.dim != spec.dim:
        raise StoreError(
            f"collection '{record.name}' in {location} holds {record.dim}-d vectors; {spec.dim}-d were offered",
            fix="choose another collection, or another store",
            parameter="collection",
        )
    have, offered = record.metadata.get(FINGERPRINT), spec.metadata.get(FINGERPRINT)
    if have is not None and offered is not None and have != offered and have not in spec.model_aliases:
        raise StoreError(
            f"collection '{record.name}' in {location} was built with model fingerprint {have}; "
            f"refusing vectors from model fingerprint {offered}",
            fix="embed with the checkpoint that built this collection, or write to another collection "
            "or another store",
            parameter="collection",
        )


def graph_fields(spec: CollectionSpec) -> set[str]:
    """The indexed fields whose values get HNSW graphs of their own (see CollectionSpec.graph_fields)."""
    categorical = {key for key, kind in spec.index_fields().items() if kind in GRAPH_TYPES}
    return categorical if spec.graph_fields is None else categorical & set(spec.graph_fields)


def widen(record: CollectionRecord, spec: CollectionSpec) -> tuple[dict[str, FieldType], dict[str, FieldType]]:
    """The spec's fields that the record lacks, and those that need an index the
    collection lacks. A field declared with another type is an error."""
    for key, kind in spec.fields.items():
        have = record.fields.get(key)
        if have is not None and have != kind:
            raise StoreError(
                f"collection '{record.name}': field '{key}' is declared as {have}, not {kind}",
                fix=f"write '{key}' as {have} values, or use another collection",
            )
    new_fields = {key: kind for key, kind in spec.fields.items() if key not in record.fields}
    new_indexes = {key: kind for key, kind in spec.index_fields().items() if key not in record.indexed}
    return new_fields, new_indexes


def no_collection(location: str, name: str) -> StoreError:
    return StoreError(
        f"collection '{name}' does not exist in {location}",
        fix="ingest slides into it first (conchdb ingest), or choose one of the collections "
        "there (conchdb stats lists them)",
        parameter="collection",
    )


def vectors_of(points: Sequence[Point], record: CollectionRecord, location: str) -> np.ndarray:
    """The points' vectors as one float32 (n, dim) array, after checking ids and sizes."""
    for p in points:
        if isinstance(p.id, str) and _CANONICAL_UUID.fullmatch(p.id):
            continue  # what ids.py makes; 7x cheaper to check than parsing with uuid.UUID
        try:
            uuid.UUID(p.id)
        except (ValueError, TypeError, AttributeError):
            raise StoreError(
                f"point id {p.id!r} for collection '{record.name}' is not a UUID string",
                fix="make ids with conchdb.store.ids.tile_point_id or stable_id",
            ) from None
    vectors = np.asarray([p.vector for p in points], dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[1] != record.dim:
        raise StoreError(
            f"collection '{record.name}' in {location} holds {record.dim}-d vectors; "
            f"got an array of shape {vectors.shape[1:] if vectors.ndim == 2 else vectors.shape}"
        )
    if not np.isfinite(vectors).all():
        raise StoreError(f"vectors for collection '{record.name}' contain NaN or infinity")
    return vectors


def check_shared(points: Sequence[Point], shared: dict[str, Any]) -> None:
    """`shared` fields must not also be in a point's own payload (which value would win is
    then a guess, and the embedded store tells half-written batches by their absence)."""
    keys = shared.keys()
    for p in points:
        if not keys.isdisjoint(p.payload):
            both = sorted(keys & p.payload.keys())
            raise StoreError(
                f"payload field(s) {', '.join(both)} of point {p.id} are also in the batch's shared fields",
                fix="give each field either in the points' payloads or in `shared`, not both",
            )


def query_vector(vector: np.ndarray, record: CollectionRecord, location: str) -> list[float]:
    """A query vector as the list both engines take, checked against the collection's size."""
    array = np.asarray(vector, dtype=np.float32).reshape(-1)
    if array.shape[0] != record.dim:
        raise StoreError(
            f"collection '{record.name}' in {location} holds {record.dim}-d vectors; "
            f"the query vector has {array.shape[0]}"
        )
    return array.tolist()


def batch_filters(flts: Sequence[Filter | None] | Filter | None, rows: int) -> list[Filter | None]:
    """One filter per query row of a batch: the same filter for all, or the list given (checked for length)."""
    if flts is None or isinstance(flts, Filter):
        return [flts] * rows
    out = list(flts)
    if len(out) != rows:
        raise StoreError(f"a batch of {rows} query vectors got {len(out)} filters", fix="give one filter per vector")
    return out


def batch_vectors(vectors: np.ndarray, record: CollectionRecord, location: str) -> list[list[float]]:
    """A batch's query vectors as lists, each checked against the collection's size."""
    array = np.asarray(vectors, dtype=np.float32)
    if array.ndim == 1:
        array = array.reshape(1, -1)
    return [query_vector(row, record, location) for row in array]
