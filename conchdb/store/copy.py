"""Copy collections from one store to another: embedded <-> server, or a backup folder.

The copy knows collections and points, not slides: each collection's record (vector size,
model fingerprint, tiling, declared fields, payload indexes, graph fields) is made again
in the target, then its points are read page by page from the source and written in
bounded batches. It is resumable because it compares before it writes: for each page,
the target is asked which ids it already holds; the missing points are written, a present
point is written again only when its payload differs from the source's (labels changed
since an earlier copy), and the rest are left alone. So a rerun after an interruption
writes only what the first run did not, and a rerun after a relabel only what changed.

At the end, each target collection's index is built (`finish_bulk_load`) and the copy is
checked: the point counts must be equal and a sample of points spread over the id order
must have the same payloads and vectors in both stores. A copy never deletes: points in
the target that the source lacks are reported by the check, never removed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from conchdb.catalog import slides_collection, texts_collection
from conchdb.errors import StoreError
from conchdb.store.base import Store
from conchdb.store.record import CollectionRecord, check_compatible, no_collection, widen
from conchdb.store.types import CollectionSpec, Hit, Point

BATCH = 1000
"""Points per upsert (and per look-up of the ids the target holds): large enough that a
server round trip is a small share of a batch, small enough to hold a few MB of vectors."""
SAMPLE = 100
"""Points per collection compared between the stores after the copy."""
MAX_BATCH = 10_000
VECTOR_TOLERANCE = 1e-5
"""Engines normalise cosine vectors on write; a unit vector normalised again moves by float32 rounding."""

OnProgress = Callable[[str, int, int], None]
"""Called with (collection, points done, points in the source) when a collection starts and after each batch."""

TARGET_PARAMETERS = frozenset({"store", "qdrant_url", "qdrant_api_key"})
"""Error parameters that name the store itself; raised by the target, they are about `target`."""


@dataclass(kw_only=True)
class CollectionCopy:
    """What the copy did to one collection: `points` in the source, of which `copied` were
    missing from the target, `already_there` were present with the same payload (left as they
    were) and `rewritten` were present with another payload; `checked` points were compared
    after the copy."""

    name: str
    points: int
    copied: int = 0
    already_there: int = 0
    rewritten: int = 0
    checked: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"points": self.points, "copied": self.copied, "already_there": self.already_there,
                "rewritten": self.rewritten, "checked": self.checked}


@dataclass(kw_only=True)
class CopySummary:
    """One copy: where from and to, each collection's counts, and the time it took."""

    source: str
    target: str
    collections: list[CollectionCopy] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def points(self) -> int:
        return sum(c.points for c in self.collections)

    @property
    def written(self) -> int:
        return sum(c.copied + c.rewritten for c in self.collections)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "target": self.target,
            "seconds": round(self.seconds, 3),
            "points": self.points,
            "written": self.written,
            "collections": {c.name: c.to_dict() for c in self.collections},
        }


def copy_store(
    source: Store,
    target: Store,
    *,
    collection: str | None = None,
    batch_size: int = BATCH,
    sample: int = SAMPLE,
    on_progress: OnProgress | None = None,
) -> CopySummary:
    """Copy every conchdb collection of `source` into `target`, or, with `collection`, that
    tiles collection and its slide records and texts; see the module docstring.

    Everything that can be refused is refused before the first write: the target being the
    source, a collection missing from the source, a target collection built by another model
    (or declaring a field with another type). The target's own errors (unreachable, refused
    key, locked folder) carry the parameter `target`.

    Raises:
        StoreError: on any of those, or when the check after the copy finds a difference
            (naming the collection and how to put it right).
    """
    check_batch(batch_size=batch_size, sample=sample)
    check_distinct(source, target)
    names = collections_to_copy(source, collection)
    specs = {name: copy_spec(source_record(source, name)) for name in names}
    for spec in specs.values():
        check_target(target, spec)
    summary = CopySummary(source=source.location, target=target.location)
    start = time.perf_counter()
    for spec in specs.values():
        summary.collections.append(
            copy_collection(source, target, spec, batch_size=batch_size, sample=sample, on_progress=on_progress)
        )
    summary.seconds = time.perf_counter() - start
    return summary


def check_batch(*, batch_size: int, sample: int) -> None:
    if not 1 <= batch_size <= MAX_BATCH:
        raise StoreError(f"batch size {batch_size} is outside 1-{MAX_BATCH}", fix=f"use {BATCH}, the default",
                         parameter="batch_size")
    if sample < 0:
        raise StoreError(f"a check sample of {sample} points is negative", fix="give 0 or more points",
                         parameter="sample")


def check_distinct(source: Store, target: Store) -> None:
    """Refuse to copy a store onto itself: it would read and write the same points for nothing."""
    if source.identity == target.identity:
        raise StoreError(
            f"refusing to copy {source.location} onto itself",
            fix="give another folder or another Qdrant server to copy to",
            parameter="target",
        )


def collections_to_copy(source: Store, collection: str | None = None) -> list[str]:
    """Every conchdb collection of the source, or `collection` and those of its companions
    (slide records, texts) that exist."""
    present = source.collections()
    if collection is None:
        if not present:
            raise StoreError(
                f"{source.location} holds no conchdb collections: there is nothing to copy",
                fix="give the store to copy from (its folder or its server's URL)",
                parameter="store",
            )
        return present
    if collection not in present:
        raise no_collection(source.location, collection)
    companions = (slides_collection(collection), texts_collection(collection))
    return [collection, *(name for name in companions if name in present)]


def source_record(source: Store, name: str) -> CollectionRecord:
    record = source.collection_record(name)
    if record is None:
        raise no_collection(source.location, name)
    return record


def copy_spec(record: CollectionRecord) -> CollectionSpec:
    """The spec that makes a collection like `record` in another store: the same size,
    metadata, fields, payload indexes and graph fields. Every index waits for
    `finish_bulk_load` (`load_indexed=()`): the copy looks points up by id, never by a field."""
    return CollectionSpec(
        name=record.name,
        dim=record.dim,
        metadata=dict(record.metadata),
        fields=dict(record.fields),
        graph_fields=tuple(record.graph),
        indexed=tuple(record.indexed),
        load_indexed=(),
    )


def check_target(target: Store, spec: CollectionSpec) -> None:
    """Refuse, before anything is written, a target collection that the spec cannot join:
    one built by another model or with another vector size, or declaring a field with another type."""
    with target_errors():
        record = target.collection_record(spec.name)
    if record is not None:
        check_compatible(target.location, record, spec)
        widen(record, spec)


def copy_collection(
    source: Store,
    target: Store,
    spec: CollectionSpec,
    *,
    batch_size: int = BATCH,
    sample: int = SAMPLE,
    on_progress: OnProgress | None = None,
) -> CollectionCopy:
    """Create (or join) the collection in the target, bring its points up to date with the
    source's batch by batch, build its index and check it."""
    name = spec.name
    with target_errors():
        target.ensure_collection(spec)
    total = source.count(name)
    result = CollectionCopy(name=name, points=total)
    step = max(1, total // sample) if sample else 0
    picked: list[str] = []
    done = 0
    if on_progress:
        on_progress(name, 0, total)
    for chunk in chunks(source.scroll(name, with_vectors=True), batch_size):
        if step:
            picked += [hit.id for i, hit in enumerate(chunk, start=done) if i % step == 0][: sample - len(picked)]
        with target_errors():
            sync_batch(target, name, chunk, result)
        done += len(chunk)
        if on_progress:
            on_progress(name, done, total)
    with target_errors():
        target.finish_bulk_load(name)
    result.checked = check_copy(source, target, name, ids=picked)
    return result


def sync_batch(target: Store, name: str, hits: Sequence[Hit], result: CollectionCopy) -> None:
    """Write the points of `hits` that the target lacks or holds with another payload, as one upsert."""
    have = {hit.id: hit.payload for hit in target.retrieve(name, [hit.id for hit in hits])}
    missing = [hit for hit in hits if hit.id not in have]
    changed = [hit for hit in hits if hit.id in have and have[hit.id] != hit.payload]
    target.upsert(name, [Point(hit.id, hit.vector, hit.payload) for hit in [*missing, *changed]])
    result.copied += len(missing)
    result.rewritten += len(changed)
    result.already_there += len(hits) - len(missing) - len(changed)


def check_copy(source: Store, target: Store, name: str, *, ids: Sequence[str]) -> int:
    """Compare the collection's point counts and the points `ids` (payloads and vectors)
    between the stores; returns how many points were compared.

    Raises:
        StoreError: naming the collection, the difference and how to put it right.
    """
    with target_errors():
        have = target.count(name)
    want = source.count(name)
    if have > want:
        raise StoreError(
            f"copy check: collection '{name}' holds {have} points in {target.location} but {want} in "
            f"{source.location}; the target holds points that the source does not (removed from the source "
            "since an earlier copy, or written to the target by something else)",
            fix="remove that collection from the target, or copy into a new folder or server, and copy again",
            parameter="collection",
        )
    if have < want:
        raise StoreError(
            f"copy check: collection '{name}' holds {have} points in {target.location} but {want} in "
            f"{source.location} (was the source written to during the copy?)",
            fix="copy again once nothing writes to the source: the copy writes only what is missing",
            parameter="collection",
        )
    with target_errors():
        theirs = {hit.id: hit for hit in target.retrieve(name, ids, with_vectors=True)}
    ours = source.retrieve(name, ids, with_vectors=True)
    for hit in ours:
        other = theirs.get(hit.id)
        what = (
            "is missing" if other is None
            else "has another payload" if other.payload != hit.payload
            else "has another vector" if not same_vector(hit.vector, other.vector)
            else None
        )
        if what:
            raise StoreError(
                f"copy check: point {hit.id} of collection '{name}' {what} in {target.location}",
                fix="copy again (a changed payload is rewritten); if the check still fails, remove that "
                "collection from the target, or copy into a new folder or server",
                parameter="collection",
            )
    return len(ours)


def same_vector(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is b
    return a.shape == b.shape and bool(np.allclose(a, b, rtol=0.0, atol=VECTOR_TOLERANCE))


def chunks(hits: Iterable[Hit], size: int) -> Iterator[list[Hit]]:
    """Consecutive lists of at most `size` hits; the scroll behind them is read lazily."""
    chunk: list[Hit] = []
    for hit in hits:
        chunk.append(hit)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


@contextmanager
def target_errors() -> Iterator[None]:
    """Errors about the target store itself carry the parameter `target`: an unreachable
    server or a locked folder there is not the source's `store` or `qdrant_url`."""
    try:
        yield
    except StoreError as exc:
        if exc.parameter not in TARGET_PARAMETERS:
            raise
        raise StoreError(exc.message, exc.fix, parameter="target", exit_code=exc.exit_code) from exc
