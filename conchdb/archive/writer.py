"""`SlideWriter`: everything one run writes for a cohort's slides, and the rerun's upkeep.

Consistency comes from ids and records, not from transactions:
- tile point ids are deterministic, so writing a slide again overwrites instead of
  duplicating, and a crash loses at most the batches in flight;
- each slide has a record whose status says whether the slide is done; a run skips done
  slides whose file has not changed, and redoes the rest;
- every point carries the `ingest_run` that wrote it; when a slide completes, points of
  that slide and tiling left by earlier runs are deleted, and only then is the slide done.

Ingest (tiles embedded from pixels, in this process or by workers) and feature import
(tiles projected from TRIDENT or CLAM files) all write through this, so their points get
the same ids and payload fields. Before any slide is embedded, `reconcile` brings the
stored slides of the cohort up to date with the folder and the manifest: a file found at a
new path is moved, changed manifest values are relabelled, and stored slides whose file is
gone are reported missing (never deleted unasked).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from conchdb.archive.marks import remark
from conchdb.archive.records import SlideCatalog, file_state, now, record_id, scope
from conchdb.archive.run import SlideOutcome, Writer
from conchdb.catalog import (
    DICOM_FIELDS,
    FINISHED,
    MANIFEST_COLUMNS_FIELD,
    RESERVED_FIELDS,
    Layout,
    SlideStatus,
    slides_layout,
    tiles_layout,
    tiling_key,
)
from conchdb.errors import ConchdbError
from conchdb.slides.dicom import source_text
from conchdb.store import CollectionSpec, Condition, Filter, Point, tile_point_id
from conchdb.store.base import Store


class SlideFile(Protocol):
    """A slide as a run finds it: its id (path in the cohort), its file, its content identity."""

    @property
    def id(self) -> str: ...
    @property
    def path(self) -> Path | str: ...
    @property
    def identity(self) -> str: ...


class Labels(Protocol):
    """A manifest as the archive reads it: each slide's values, and the typed columns."""

    path: Path | None
    columns: Mapping[str, str]

    def payload_for(self, slide_id: str) -> dict[str, Any]: ...
    def labels_for(self, slide_id: str) -> dict[str, Any] | None: ...


class ModelInfo(Protocol):
    """What a run records of the model that made the vectors (an `Encoder`, or the workers')."""

    @property
    def dim(self) -> int: ...
    @property
    def fingerprint(self) -> str: ...
    @property
    def aliases(self) -> tuple[str, ...]: ...
    def describe(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Tiling:
    """What decides the pixels of a slide's tiles, as the store records it: the tiling key
    (part of the record id and a filter on tiles) and the tile resolution. `target_mpp` is
    None only for imported features whose slide, hence pixel size, is unknown."""

    key: str
    target_mpp: float | None
    tile_px: int

    @classmethod
    def of(cls, params: Any) -> Tiling:
        """The tiling of `TilingParams` (target µm/px, tile px, stride)."""
        return cls(tiling_key(params.target_mpp, params.tile_px, params.stride), params.target_mpp, params.tile_px)


@dataclass
class Reconciled:
    """What `SlideWriter.reconcile` found: each discovered slide's record after moves (None:
    never stored), and what changed."""

    records: dict[str, dict[str, Any] | None] = field(default_factory=dict)
    moved: list[dict[str, str]] = field(default_factory=list)
    missing: list[dict[str, Any]] = field(default_factory=list)


class SlideWriter:
    """Everything one run writes for a cohort's slides into a tiles collection and its
    records collection: point ids, tile payloads, slide records, stale-tile cleanup, the done
    rule, and the upkeep of slides stored by earlier runs.

    A slide goes through `begin` (no tissue: finished; else in progress), its tiles, then
    `finish` (done only after every tile is written and older runs' tiles are gone) or
    `fail`. `model` needs only `dim`, `fingerprint` and `describe()`; `run_id` is given
    when the run was started elsewhere (a worker)."""

    def __init__(
        self,
        store: Store,
        collection: str,
        model: ModelInfo,
        manifest: Labels,
        cohort_name: str,
        run_id: str | None = None,
    ):
        self.store, self.collection, self.model, self.manifest = store, collection, model, manifest
        self.catalog = SlideCatalog(store, collection)
        self.slides = self.catalog.records_collection
        self.cohort_name = cohort_name
        self.run_id = run_id or uuid.uuid4().hex

    # -- collections ---------------------------------------------------------------------

    def prepare(
        self,
        metadata: dict[str, Any],
        tiles: Layout | None = None,
        slides: Layout | None = None,
        reserved: frozenset[str] | set[str] = RESERVED_FIELDS,
    ) -> None:
        """Create or check both collections; refuses another model's collection before any
        work, and declares (and indexes) manifest columns the collections do not have yet.

        `metadata` is what the collections record beside the model (tiling, cohort); the
        layouts default to the catalog's tiles and slides layouts with the manifest's columns;
        `reserved` are the field names a manifest column may not take."""
        metadata = {**self.model.describe(), **metadata}
        clash = sorted(set(self.manifest.columns) & reserved)
        if clash:
            raise ConchdbError(
                f"manifest {self.manifest.path}: column(s) {', '.join(clash)} would overwrite conchdb's own fields",
                fix="rename those columns in the manifest",
                parameter="manifest",
            )
        tiles = tiles or tiles_layout(self.manifest.columns)
        slides = slides or slides_layout(self.manifest.columns)
        aliases = tuple(self.model.aliases)
        for name, layout in ((self.collection, tiles), (self.slides, slides)):
            self.store.ensure_collection(
                CollectionSpec(name, self.model.dim, metadata, **asdict(layout), model_aliases=aliases)
            )

    # -- records -------------------------------------------------------------------------

    def key(self, slide: SlideFile, tiling: Tiling) -> dict[str, str]:
        """The fields that name one stored copy of a slide (see `records.scope`)."""
        return {"slide_id": slide.id, "cohort": self.cohort_name, "tiling": tiling.key}

    def record_id(self, slide: SlideFile, tiling: Tiling) -> str:
        return record_id(self.cohort_name, slide.id, tiling.key)

    def record(self, slide: SlideFile, tiling: Tiling) -> dict[str, Any] | None:
        """The slide's record payload at this tiling, or None if it was never written."""
        return self.catalog.record(self.cohort_name, slide.id, tiling.key)

    def is_done(self, slide: SlideFile, record: Mapping[str, Any] | None, **same: Any) -> bool:
        """Whether a record says the slide is finished from the same file (and the same
        values of any other record fields named in `same`)."""
        return (
            record is not None
            and record.get("status") in FINISHED
            and record.get("identity") == slide.identity
            and all(record.get(key) == value for key, value in same.items())
        )

    def write_record(
        self, slide: SlideFile, tiling: Tiling, status: SlideStatus, vector: np.ndarray | None = None, **extra: Any
    ) -> None:
        if vector is None:
            # Records of unfinished slides still need a vector; a fixed axis keeps them apart
            # from real means, and slide search filters on status anyway.
            vector = np.zeros(self.model.dim, dtype=np.float32)
            vector[0] = 1.0
        labels = self.manifest.payload_for(slide.id)
        payload = {
            **self.key(slide, tiling),
            "path": source_text(slide.path),
            "identity": slide.identity,
            "status": status.value,
            "target_mpp": tiling.target_mpp,
            "tile_px": tiling.tile_px,
            "ingest_run": self.run_id,
            "updated_at": now(),
            **labels,
            MANIFEST_COLUMNS_FIELD: sorted(labels),
            **extra,
        }
        self.store.upsert(self.slides, [Point(self.record_id(slide, tiling), vector, payload)])

    def slide_filter(self, slide: SlideFile, tiling: Tiling, *more: Condition) -> Filter:
        return scope(self.key(slide, tiling), *more)

    def delete_stale(self, slide: SlideFile, tiling: Tiling) -> None:
        """Drop the slide's tiles at this tiling left by earlier runs."""
        self.store.delete(self.collection, self.slide_filter(slide, tiling, Condition("ingest_run", "ne", self.run_id)))

    def delete_tiles(self, slide: SlideFile, tiling: Tiling) -> None:
        self.store.delete(self.collection, self.slide_filter(slide, tiling))

    # -- a rerun's upkeep ----------------------------------------------------------------

    def reconcile(self, slides: Sequence[SlideFile], tiling: Tiling) -> Reconciled:
        """Match the slides found now with this cohort's records at this tiling, before any
        embedding: a stored slide whose file turns up at another path (same content
        identity, its old file gone) is moved there; a done slide found at its id under a new
        absolute path (the cohort folder moved) gets that path; stored slides whose file is
        gone and did not turn up are reported missing."""
        stored = self.catalog.records(Filter((Condition("cohort", "eq", self.cohort_name),
                                              Condition("tiling", "eq", tiling.key))))
        by_id = {str(r["slide_id"]): r for r in stored}
        found = {slide.id for slide in slides}
        # Records whose slide id was not found now: candidates for a slide that moved.
        away: dict[str, list[dict[str, Any]]] = {}
        for record in stored:
            if record["slide_id"] not in found and file_state(record) not in ("present", "remote"):
                away.setdefault(str(record.get("identity")), []).append(record)
        out = Reconciled()
        for slide in slides:
            record = by_id.get(slide.id)
            if record is None and away.get(slide.identity):
                old = away[slide.identity].pop(0)
                record = self.catalog.move(old, slide.id, slide.path)
                out.moved.append({"from": str(old["slide_id"]), "to": slide.id, "path": source_text(slide.path)})
            elif (record is not None and record.get("identity") == slide.identity
                  and record.get("path") != source_text(slide.path)):
                record = self.catalog.move(record, slide.id, slide.path)
                out.moved.append({"from": slide.id, "to": slide.id, "path": source_text(slide.path)})
            out.records[slide.id] = record
        out.missing = [{"slide_id": r["slide_id"], "path": r.get("path"), "status": r.get("status")}
                       for rs in away.values() for r in rs]
        return out

    def relabel(self, slide: SlideFile, record: Mapping[str, Any]) -> bool:
        """Bring a stored slide's manifest values up to date with its row now, in place;
        returns whether they changed. A slide the manifest has no row for keeps its values."""
        labels = self.manifest.labels_for(slide.id)
        if labels is None:
            return False
        return self.catalog.relabel(record, labels)

    # -- one slide's steps ---------------------------------------------------------------

    def begin(self, slide: SlideFile, tiling: Tiling, tiles: int, **extra: Any) -> SlideOutcome | None:
        """Before the first tile: a slide without tissue is finished here (its outcome is
        returned); otherwise it is recorded in progress and None returned. `extra` are the
        record's further fields (pixel size, dimensions, an import's source)."""
        if tiles == 0:
            self.write_record(slide, tiling, SlideStatus.NO_TISSUE, tiles=0, error=None, **extra)
            self.delete_stale(slide, tiling)
            return SlideOutcome(slide.id, source_text(slide.path), SlideStatus.NO_TISSUE)
        self.write_record(slide, tiling, SlideStatus.IN_PROGRESS, tiles=0, error=None, **extra)
        return None

    def finish(
        self,
        slide: SlideFile,
        tiling: Tiling,
        tiles: int,
        mean: np.ndarray,
        flush: Callable[[], None] | None = None,
        **extra: Any,
    ) -> SlideOutcome:
        """The done rule: every tile written (`flush`, for tiles handed to a writer thread),
        older runs' tiles deleted, the slide's mosaic marked, then the record says done.

        The mosaic is chosen from the tiles as stored (read back with their vectors), so every
        way a slide gets its tiles (this process, a worker, a feature import) marks the same
        mosaic that `conchdb mosaic` would."""
        if flush is not None:
            flush()
        self.delete_stale(slide, tiling)
        stored = self.catalog.tiles(self.key(slide, tiling), with_vectors=True)
        if stored:
            remark(self.store, self.collection, stored)
        self.write_record(slide, tiling, SlideStatus.DONE, vector=mean, tiles=tiles, error=None, **extra)
        return SlideOutcome(slide.id, source_text(slide.path), SlideStatus.DONE, tiles)

    def fail(
        self,
        slide: SlideFile,
        tiling: Tiling,
        error: str,
        previous: str | None,
        flush: Callable[[], None] | None = None,
        **extra: Any,
    ) -> SlideOutcome:
        """Record the failure once; `previous` is the record's status before this run."""
        if flush is not None:
            flush()
        self.write_record(slide, tiling, SlideStatus.FAILED, tiles=0, error=error, **extra)
        if previous != SlideStatus.DONE:
            # Nothing good was stored for this slide before: drop the partial tiles.
            self.delete_tiles(slide, tiling)
        return SlideOutcome(slide.id, source_text(slide.path), SlideStatus.FAILED, error=error)

    # -- tiles ---------------------------------------------------------------------------

    def shared_payload(
        self, slide: SlideFile, tiling: Tiling, size: int, info: dict[str, Any], **extra: Any
    ) -> dict[str, Any]:
        """What every tile of the slide shares; it goes to the store once per batch, not per tile."""
        return {
            **self.key(slide, tiling),
            "path": source_text(slide.path),
            "size": size,
            "mpp": info.get("mpp"),
            "mpp_source": info.get("mpp_source"),
            "target_mpp": tiling.target_mpp,
            "tile_px": tiling.tile_px,
            "ingest_run": self.run_id,
            **{k: v for k, v in info.items() if k in DICOM_FIELDS},
            **extra,
            **self.manifest.payload_for(slide.id),
        }

    def tile_points(
        self, slide: SlideFile, tiling: Tiling, size: int, tiles: list[dict[str, Any]], vectors: np.ndarray
    ) -> list[Point]:
        """Points of tiles given as payloads with level-0 `x` and `y` (and per-tile fields)."""
        identity = f"{self.cohort_name}/{slide.id}@{slide.identity}"
        fingerprint = self.model.fingerprint
        return [
            Point(tile_point_id(identity, t["x"], t["y"], size, tiling.target_mpp, fingerprint), vec, t)
            for t, vec in zip(tiles, vectors, strict=True)
        ]

    def sink(
        self, slide: SlideFile, tiling: Tiling, size: int, info: dict[str, Any], writer: Writer
    ) -> Callable[[list[dict[str, Any]], np.ndarray], None]:
        """What the embedding hands its batches to when this process writes them: named
        points, with the slide's shared payload, queued on the writer thread."""
        shared = self.shared_payload(slide, tiling, size, info)

        def put(tiles: list[dict[str, Any]], vectors: np.ndarray) -> None:
            writer.put(self.tile_points(slide, tiling, size, tiles, vectors), shared)

        return put
