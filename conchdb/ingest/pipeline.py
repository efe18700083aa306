"""The ingest pipeline: cohort -> tiles -> CONCH vectors -> points in the store.

This is the only module of `ingest` that talks to `model` and `store`. Per slide it
plans the grid (tissue mask), streams tile batches from the reader's worker processes,
embeds them, and hands points to a writer thread, so reading, embedding and writing
overlap; the next slide is planned while the current one is embedded.

Consistency comes from ids and records, not from transactions:
- tile point ids are deterministic, so writing a slide again overwrites instead of
  duplicating, and a crash loses at most the batches in flight;
- each slide has a record (collection `slides_collection(<tiles>)`) whose status says whether the
  slide is done; a run skips done slides whose file has not changed, and redoes the rest;
- every point carries the `ingest_run` that wrote it; when a slide completes, points of
  that slide and tiling left by earlier runs (an interrupted run over a file since
  replaced, a changed tissue setting) are deleted, and only then is the slide marked done.

The per-slide work is split so that `conchdb.workers` runs the same code in another
process: a `SlideJob` (plain data) says what to do, `plan_slide` grids it, `embed_slide`
turns pixels into vectors, and a `SlideWriter` does everything the store sees (point ids,
payloads, records, cleanup, the done rule) wherever the writing happens. Feature import
(`conchdb.features`) writes through the same `SlideWriter`.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conchdb.catalog import (
    FINISHED,
    RESERVED_FIELDS,
    TILES_COLLECTION,
    Layout,
    SlideStatus,
    slides_collection,
    slides_layout,
    tiles_layout,
    tiling_key,
)
from conchdb.errors import ConchdbError, SlideError
from conchdb.ingest.cohort import Cohort, CohortSlide, discover
from conchdb.ingest.gpu_jpeg import JpegTileSource, open_jpeg_source
from conchdb.ingest.inflight import slides_in_flight
from conchdb.ingest.manifest import Manifest, ManifestRow, read_manifest
from conchdb.ingest.mosaic import remark
from conchdb.model.encoder import Encoder
from conchdb.model.feed import DeviceFeed, embed_batches, pinned
from conchdb.slides.grid import TileGrid, TilingParams, plan_tiles
from conchdb.slides.reader import READ_BATCH, TileReader
from conchdb.slides.slide import Slide, open_slide
from conchdb.store import CollectionSpec, Condition, Filter, Point, Store, stable_id, tile_point_id


@dataclass
class IngestOptions:
    """How to tile and embed; `slide_mpp` applies to slides whose manifest row gives no `mpp`."""

    params: TilingParams = field(default_factory=TilingParams)
    batch_size: int = 32
    readers: int = 2
    force: bool = False
    cohort_name: str | None = None
    slide_mpp: float | None = None
    slides_in_flight: int = 1  # slides whose tiles are read at once (the current one and those after it)
    compile: bool = False  # torch.compile the vision tower
    gpu_jpeg: bool = False  # decode tiled-JPEG levels on the model's device (CPU reader otherwise)
    read_batch: int = READ_BATCH  # tiles per reader task; model batches (batch_size) are joined on the device


@dataclass
class SlideOutcome:
    slide_id: str
    path: str
    status: SlideStatus  # done | skipped | no_tissue | failed
    tiles: int = 0
    error: str | None = None
    seconds: float = 0.0


@dataclass
class IngestSummary:
    """What a run did; `to_dict()` is the `--json` output."""

    store: str
    collection: str
    outcomes: list[SlideOutcome] = field(default_factory=list)
    not_slides: int = 0
    manifest: str | None = None
    manifest_unmatched: list[str] = field(default_factory=list)
    manifest_missing: list[str] = field(default_factory=list)
    seconds: float = 0.0
    interrupted: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    resent: list[tuple[str, str]] = field(default_factory=list)  # (slide id, why): sent to a worker again

    def count(self, status: SlideStatus) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failed(self) -> list[SlideOutcome]:
        return [o for o in self.outcomes if o.status == SlideStatus.FAILED]

    @property
    def tiles_written(self) -> int:
        return sum(o.tiles for o in self.outcomes if o.status == SlideStatus.DONE)

    @property
    def exit_code(self) -> int:
        return 3 if self.failed else 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "store": self.store,
            "collection": self.collection,
            "slides": len(self.outcomes),
            "ingested": self.count(SlideStatus.DONE),
            "skipped": self.count(SlideStatus.SKIPPED),
            "no_tissue": self.count(SlideStatus.NO_TISSUE),
            "failed": [{"slide": o.path, "slide_id": o.slide_id, "error": o.error} for o in self.failed],
            "not_slides": self.not_slides,
            "tiles_written": self.tiles_written,
            "seconds": round(self.seconds, 3),
            "tiles_per_s": round(self.tiles_written / self.seconds, 3) if self.seconds > 0 else 0.0,
            "manifest": self.manifest,
            "manifest_rows_unmatched": self.manifest_unmatched,
            "slides_without_manifest_row": self.manifest_missing,
            "interrupted": self.interrupted,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "resent": [{"slide": slide, "reason": reason} for slide, reason in self.resent],
        }


@dataclass
class Progress:
    """Callbacks for a progress display; every one is optional."""

    on_start: Callable[[int], None] | None = None  # number of slides
    on_slide: Callable[[str, int], None] | None = None  # slide id, tiles planned
    on_batch: Callable[[int], None] | None = None  # tiles embedded
    on_outcome: Callable[[SlideOutcome], None] | None = None
    # What a run through workers waits for (slides running where, a slide sent again because
    # its worker was lost): a line for people and the same as data (`event` names the kind).
    on_notice: Callable[[str, dict[str, Any]], None] | None = None


class Writer:
    """A thread that upserts batches of points in order, so the store write overlaps the
    next batch's embedding. `flush()` waits for everything handed over and re-raises a
    write error in the caller's thread."""

    def __init__(self, store: Store, collection: str, timings: dict[str, float]):
        self._store, self._collection, self._timings = store, collection, timings
        self._queue: queue.Queue[tuple[list[Point], dict[str, Any]] | None] = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="conchdb-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                if self._error is None:
                    start = time.perf_counter()
                    self._store.upsert(self._collection, *item)
                    self._timings["write_s"] = self._timings.get("write_s", 0.0) + time.perf_counter() - start
            except BaseException as exc:  # handed to the caller's thread by flush()/put()
                self._error = exc
            finally:
                self._queue.task_done()

    def _raise(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def put(self, points: list[Point], shared: dict[str, Any]) -> None:
        self._raise()
        self._queue.put((points, shared))

    def flush(self) -> None:
        self._queue.join()
        self._raise()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join()


@dataclass(frozen=True)
class Tiling:
    """What decides the pixels of a slide's tiles, as the store records it: the tiling key
    (part of the record id and a filter on tiles) and the tile resolution. `target_mpp` is
    None only for imported features whose slide, hence pixel size, is unknown."""

    key: str
    target_mpp: float | None
    tile_px: int

    @classmethod
    def of(cls, params: TilingParams) -> Tiling:
        return cls(tiling_key(params.target_mpp, params.tile_px, params.stride), params.target_mpp, params.tile_px)


@dataclass
class SlideJob:
    """Everything one slide's embedding needs, as plain data: what the in-process run hands
    its per-slide code and what a worker receives in a task (`conchdb.workers`)."""

    slide: CohortSlide
    cohort: str
    run_id: str
    params: TilingParams
    metadata: dict[str, Any] = field(default_factory=dict)  # the slide's manifest row
    mpp_override: float | None = None
    override_source: str = "--slide-mpp"
    batch_size: int = 32
    readers: int = 2
    read_batch: int = READ_BATCH
    gpu_jpeg: bool = False

    @property
    def tiling(self) -> Tiling:
        return Tiling.of(self.params)


@dataclass
class _Plan:
    """A slide opened and gridded, ready to read (or the error that stopped it)."""

    slide: CohortSlide
    mpp_override: float | None
    grid: TileGrid | None = None
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def plan_slide(job: SlideJob) -> _Plan:
    """Open the slide and plan its tiles; a slide that cannot be opened comes back with `error`."""
    plan = _Plan(job.slide, job.mpp_override)
    try:
        with open_slide(job.slide.path, job.mpp_override, job.override_source) as opened:
            _, plan.grid = plan_tiles(opened, job.params)
            plan.info = _slide_info(opened)
    except SlideError as exc:
        plan.error = str(exc)
    return plan


def _slide_info(slide: Slide) -> dict[str, Any]:
    return {"mpp": slide.mpp, "mpp_source": slide.mpp_source, "width": slide.dimensions[0],
            "height": slide.dimensions[1]}


class SlideWriter:
    """Everything one run writes for a cohort's slides into a tiles collection and its records
    collection: point ids, tile payloads, slide records, stale-tile cleanup and the done rule.

    Ingest (tiles embedded from pixels, in this process or by workers) and feature import
    (tiles projected from TRIDENT or CLAM files) all write through this, so their points get
    the same ids and payload fields, and reruns, cleanup and statuses work the same. A slide
    goes through `begin` (no tissue: finished; else in progress), its tiles, then `finish`
    (done only after every tile is written and older runs' tiles are gone) or `fail`.

    `encoder` needs only `dim`, `fingerprint` and `describe()` (the broker run passes the
    workers' model description); `run_id` is given when the run was started elsewhere.
    """

    def __init__(
        self,
        store: Store,
        collection: str,
        encoder: Encoder,
        manifest: Manifest,
        cohort_name: str,
        run_id: str | None = None,
    ):
        self.store, self.collection, self.encoder, self.manifest = store, collection, encoder, manifest
        self.slides = slides_collection(collection)
        self.cohort_name = cohort_name
        self.run_id = run_id or uuid.uuid4().hex

    @classmethod
    def for_job(cls, store: Store, collection: str, encoder: Encoder, job: SlideJob) -> SlideWriter:
        """The writer a worker uses for one job: the job's run, cohort and manifest row."""
        row = ManifestRow(0, job.slide.id, job.mpp_override, dict(job.metadata))
        return cls(store, collection, encoder, Manifest(None, {job.slide.id: row}), job.cohort, job.run_id)

    # -- collections ---------------------------------------------------------------------

    def prepare(
        self,
        metadata: dict[str, Any],
        tiles: Layout | None = None,
        slides: Layout | None = None,
        reserved: frozenset[str] | set[str] = RESERVED_FIELDS,
    ) -> None:
        """Create or check both collections; refuses another model's collection before any work.

        `metadata` is what the collections record beside the model (tiling, cohort); the
        layouts default to the catalog's tiles and slides layouts with the manifest's columns;
        `reserved` are the field names a manifest column may not take."""
        metadata = {**self.encoder.describe(), **metadata}
        clash = sorted(set(self.manifest.columns) & reserved)
        if clash:
            raise ConchdbError(
                f"manifest {self.manifest.path}: column(s) {', '.join(clash)} would overwrite conchdb's own fields",
                fix="rename those columns in the manifest",
                parameter="manifest",
            )
        tiles = tiles or tiles_layout(self.manifest.columns)
        slides = slides or slides_layout(self.manifest.columns)
        self.store.ensure_collection(CollectionSpec(self.collection, self.encoder.dim, metadata, **asdict(tiles)))
        self.store.ensure_collection(CollectionSpec(self.slides, self.encoder.dim, metadata, **asdict(slides)))

    # -- records -------------------------------------------------------------------------

    def record_id(self, slide: CohortSlide, tiling: Tiling) -> str:
        return stable_id("slide", self.cohort_name, slide.id, tiling.key)

    def record(self, slide: CohortSlide, tiling: Tiling) -> dict[str, Any] | None:
        """The slide's record payload at this tiling, or None if it was never written."""
        hits = self.store.retrieve(self.slides, [self.record_id(slide, tiling)])
        return hits[0].payload if hits else None

    def is_done(self, slide: CohortSlide, record: dict[str, Any] | None, **same: Any) -> bool:
        """Whether a record says the slide is finished from the same file (and the same
        values of any other record fields named in `same`)."""
        return (
            record is not None
            and record.get("status") in FINISHED
            and record.get("identity") == slide.identity
            and all(record.get(key) == value for key, value in same.items())
        )

    def write_record(
        self, slide: CohortSlide, tiling: Tiling, status: SlideStatus, vector: np.ndarray | None = None, **extra: Any
    ) -> None:
        if vector is None:
            # Records of unfinished slides still need a vector; a fixed axis keeps them apart
            # from real means, and slide search filters on status anyway.
            vector = np.zeros(self.encoder.dim, dtype=np.float32)
            vector[0] = 1.0
        payload = {
            "slide_id": slide.id,
            "path": str(slide.path),
            "cohort": self.cohort_name,
            "identity": slide.identity,
            "status": status.value,
            "tiling": tiling.key,
            "target_mpp": tiling.target_mpp,
            "tile_px": tiling.tile_px,
            "ingest_run": self.run_id,
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **self.manifest.payload_for(slide.id),
            **extra,
        }
        self.store.upsert(self.slides, [Point(self.record_id(slide, tiling), vector, payload)])

    def slide_filter(self, slide: CohortSlide, tiling: Tiling, *more: Condition) -> Filter:
        return Filter((
            Condition("slide_id", "eq", slide.id),
            Condition("cohort", "eq", self.cohort_name),
            Condition("tiling", "eq", tiling.key),
            *more,
        ))

    def delete_stale(self, slide: CohortSlide, tiling: Tiling) -> None:
        """Drop the slide's tiles at this tiling left by earlier runs."""
        self.store.delete(self.collection, self.slide_filter(slide, tiling, Condition("ingest_run", "ne", self.run_id)))

    def delete_tiles(self, slide: CohortSlide, tiling: Tiling) -> None:
        self.store.delete(self.collection, self.slide_filter(slide, tiling))

    # -- one slide's steps ---------------------------------------------------------------

    def begin(self, slide: CohortSlide, tiling: Tiling, tiles: int, **extra: Any) -> SlideOutcome | None:
        """Before the first tile: a slide without tissue is finished here (its outcome is
        returned); otherwise it is recorded in progress and None returned. `extra` are the
        record's further fields (pixel size, dimensions, an import's source)."""
        if tiles == 0:
            self.write_record(slide, tiling, SlideStatus.NO_TISSUE, tiles=0, error=None, **extra)
            self.delete_stale(slide, tiling)
            return SlideOutcome(slide.id, str(slide.path), SlideStatus.NO_TISSUE)
        self.write_record(slide, tiling, SlideStatus.IN_PROGRESS, tiles=0, error=None, **extra)
        return None

    def finish(
        self,
        slide: CohortSlide,
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
        stored = list(self.store.scroll(self.collection, self.slide_filter(slide, tiling), with_vectors=True))
        if stored:
            remark(self.store, self.collection, stored)
        self.write_record(slide, tiling, SlideStatus.DONE, vector=mean, tiles=tiles, error=None, **extra)
        return SlideOutcome(slide.id, str(slide.path), SlideStatus.DONE, tiles)

    def fail(
        self,
        slide: CohortSlide,
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
        return SlideOutcome(slide.id, str(slide.path), SlideStatus.FAILED, error=error)

    # -- tiles ---------------------------------------------------------------------------

    def shared_payload(
        self, slide: CohortSlide, tiling: Tiling, size: int, info: dict[str, Any], **extra: Any
    ) -> dict[str, Any]:
        """What every tile of the slide shares; it goes to the store once per batch, not per tile."""
        return {
            "slide_id": slide.id,
            "path": str(slide.path),
            "cohort": self.cohort_name,
            "size": size,
            "mpp": info.get("mpp"),
            "mpp_source": info.get("mpp_source"),
            "target_mpp": tiling.target_mpp,
            "tile_px": tiling.tile_px,
            "tiling": tiling.key,
            "ingest_run": self.run_id,
            **extra,
            **self.manifest.payload_for(slide.id),
        }

    def tile_points(
        self, slide: CohortSlide, tiling: Tiling, size: int, tiles: list[dict[str, Any]], vectors: np.ndarray
    ) -> list[Point]:
        """Points of tiles given as payloads with level-0 `x` and `y` (and per-tile fields)."""
        identity = f"{self.cohort_name}/{slide.id}@{slide.identity}"
        fingerprint = self.encoder.fingerprint
        return [
            Point(tile_point_id(identity, t["x"], t["y"], size, tiling.target_mpp, fingerprint), vec, t)
            for t, vec in zip(tiles, vectors, strict=True)
        ]

    def sink(
        self, slide: CohortSlide, tiling: Tiling, size: int, info: dict[str, Any], writer: Writer
    ) -> Callable[[list[dict[str, Any]], np.ndarray], None]:
        """What `embed_slide` hands its batches to when this process writes them: named
        points, with the slide's shared payload, queued on the writer thread."""
        shared = self.shared_payload(slide, tiling, size, info)

        def put(tiles: list[dict[str, Any]], vectors: np.ndarray) -> None:
            writer.put(self.tile_points(slide, tiling, size, tiles, vectors), shared)

        return put


TileSink = Callable[[list[dict[str, Any]], np.ndarray], None]
"""Takes one embedded batch: the tiles' own payloads (level-0 `x`, `y`, `tissue`) and their vectors."""


def open_tile_source(job: SlideJob, grid: TileGrid, encoder: Encoder) -> TileReader | JpegTileSource | None:
    """The slide's tile source, not yet started: the device JPEG decoder when asked for and
    it applies, else the reader processes handing out views of their shared slots; None
    when the grid is empty."""
    if len(grid) == 0:
        return None
    if job.gpu_jpeg:
        source = open_jpeg_source(job.slide.path, grid, job.batch_size, encoder.device, job.mpp_override)
        if source is not None:
            return source
    return TileReader(
        job.slide.path, grid, batch_size=min(job.read_batch, job.batch_size), workers=job.readers,
        mpp_override=job.mpp_override, copy=False,
    )


def embed_slide(
    job: SlideJob,
    grid: TileGrid,
    encoder: Encoder,
    sink: TileSink,
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
    *,
    feed: DeviceFeed | None = None,
    reader: TileReader | JpegTileSource | None = None,
) -> np.ndarray:
    """Stream and embed every tile of the slide, handing each batch to `sink`; returns the
    normalized mean vector. Naming and writing the points is the sink's (a `SlideWriter`'s)
    job, so a worker can embed here and leave the writing to the ingesting process.

    `feed` (one per run, so a compiled model compiles once) and `reader` (already reading,
    from `slides_in_flight`) are made here when not given; the reader is closed here."""
    progress = progress or Progress()
    timings = timings if timings is not None else {}
    if progress.on_slide:
        progress.on_slide(job.slide.id, len(grid))
    total = np.zeros(encoder.dim, dtype=np.float64)
    feed = feed or DeviceFeed(encoder, timings=timings, batch_size=job.batch_size)
    reader = reader or open_tile_source(job, grid, encoder)
    assert reader is not None  # a slide without tiles is finished before its embedding
    # --- the device feed (conchdb.model.feed): reader batches in, (start, vectors) out ---
    with reader, pinned(reader.slots):
        for first, vectors in embed_batches(reader, feed, timings):
            total += vectors.sum(axis=0)
            tiles = grid.tiles[first : first + len(vectors)]
            sink([{"x": t.x, "y": t.y, "tissue": t.tissue} for t in tiles], vectors)
            if progress.on_batch:
                progress.on_batch(len(tiles))
    norm = np.linalg.norm(total)
    return (total / norm if norm > 0 else total).astype(np.float32)


def ingest_one_slide(
    job: SlideJob,
    plan: _Plan,
    encoder: Encoder,
    slide_writer: SlideWriter,
    writer: Writer,
    previous: str | None,
    progress: Progress | None = None,
    timings: dict[str, float] | None = None,
    *,
    feed: DeviceFeed | None = None,
    reader: TileReader | JpegTileSource | None = None,
) -> SlideOutcome:
    """One slide's whole work where the embedding process also writes: records, tiles, done rule.

    The in-process run calls it per slide; a worker writing into a Qdrant server calls it
    per task. `previous` is the slide record's status before this run (None: no record).
    `feed` and `reader` go to `embed_slide`; a given reader is closed here in every case.
    """
    start = time.perf_counter()
    slide, tiling = job.slide, job.tiling
    outcome: SlideOutcome | None = None
    error = plan.error
    # A given reader is closed whatever happens (unused without tissue; closing is idempotent).
    with reader if reader is not None else contextlib.nullcontext():
        if error is None and plan.grid is not None:
            grid = plan.grid
            outcome = slide_writer.begin(slide, tiling, len(grid), **plan.info)
            if outcome is None:
                try:
                    sink = slide_writer.sink(slide, tiling, grid.tile_size_level0, plan.info, writer)
                    mean = embed_slide(job, grid, encoder, sink, progress, timings, feed=feed, reader=reader)
                    outcome = slide_writer.finish(slide, tiling, len(grid), mean, writer.flush, **plan.info)
                except SlideError as exc:
                    error = str(exc)
    if error is not None:
        outcome = slide_writer.fail(slide, tiling, error, previous, writer.flush, **plan.info)
    assert outcome is not None
    outcome.seconds = time.perf_counter() - start
    return outcome


class Ingest:
    """One ingest run over a cohort into one store collection.

    The run decides what to do (discovery, records, the skip rule) and hands each slide to
    the per-slide code above; `conchdb.workers` sends the same `SlideJob`s to workers.
    """

    def __init__(
        self,
        cohort: Cohort,
        manifest: Manifest,
        encoder: Encoder,
        store: Store,
        collection: str,
        options: IngestOptions | None = None,
        progress: Progress | None = None,
    ):
        self.cohort, self.manifest, self.encoder, self.store = cohort, manifest, encoder, store
        self.collection = collection
        self.options = options or IngestOptions()
        self.progress = progress or Progress()
        self.cohort_name = self.options.cohort_name or cohort.root.name
        self.slide_writer = SlideWriter(store, collection, encoder, manifest, self.cohort_name)
        self.slides = self.slide_writer.slides
        self.tiling = Tiling.of(self.options.params)
        self.run_id = self.slide_writer.run_id
        self.timings: dict[str, float] = {}
        self._feed: DeviceFeed | None = None

    @property
    def feed(self) -> DeviceFeed:
        """The device feed of this run, made when a slide is first embedded here: an ingest
        through workers (whose `encoder` describes the workers' model) never makes one."""
        if self._feed is None:
            self._feed = DeviceFeed(self.encoder, self.options.compile, self.timings, self.options.batch_size)
        return self._feed

    def prepare(self) -> None:
        """Create or check both collections; refuses another model's collection before any work."""
        self.slide_writer.prepare({"tiling": self.options.params.to_dict(), "cohort": self.cohort_name})

    def job(self, slide: CohortSlide) -> SlideJob:
        """The plain-data description of one slide's work in this run."""
        mpp, source = self._override(slide)
        return SlideJob(
            slide, self.cohort_name, self.run_id, self.options.params, self.manifest.payload_for(slide.id),
            mpp, source, self.options.batch_size, self.options.readers, self.options.read_batch,
            self.options.gpu_jpeg,
        )

    def record(self, slide: CohortSlide) -> dict[str, Any] | None:
        """The slide's record as stored now (None: never seen)."""
        return self.slide_writer.record(slide, self.tiling)

    # -- the run -------------------------------------------------------------------------

    def is_done(self, slide: CohortSlide, record: dict[str, Any] | None) -> bool:
        """The skip rule: done (or without tissue) from this very file, and not forced."""
        return not self.options.force and self.slide_writer.is_done(slide, record)

    def _override(self, slide: CohortSlide) -> tuple[float | None, str]:
        mpp = self.manifest.mpp_for(slide.id)
        if mpp is not None:
            return mpp, "manifest"
        return self.options.slide_mpp, "--slide-mpp"

    def new_summary(self) -> IngestSummary:
        """An empty summary of this run: store, manifest findings, files that are not slides."""
        # The manifest lies among the cohort's files but is not a slide passed over.
        manifest = self.manifest.path.resolve() if self.manifest.path else None
        not_slides = sum(Path(f).resolve() != manifest for f in self.cohort.skipped)
        summary = IngestSummary(self.store.location, self.collection, not_slides=not_slides)
        summary.manifest = str(self.manifest.path) if self.manifest.path else None
        summary.manifest_unmatched = [f"line {line}: {value}" for line, value in self.manifest.unmatched]
        summary.manifest_missing = list(self.manifest.missing) if self.manifest.path else []
        summary.timings = self.timings
        return summary

    def pending(self, summary: IngestSummary) -> list[tuple[CohortSlide, dict[str, Any] | None]]:
        """The slides still to do, with their records; the done ones go into `summary` as skipped."""
        work = [(slide, self.record(slide)) for slide in self.cohort.slides]
        for slide, record in work:
            if self.is_done(slide, record):
                assert record is not None
                skipped = SlideOutcome(slide.id, str(slide.path), SlideStatus.SKIPPED, int(record.get("tiles", 0)))
                self.emit(summary, skipped)
        return [(s, r) for s, r in work if not self.is_done(s, r)]

    def finish(self, summary: IngestSummary, start: float) -> IngestSummary:
        """After the last slide: build the indexes deferred while loading and close the timings."""
        # Also when nothing was written now: a run that died before this point left its
        # slides done but their index unbuilt (a no-op on a finished collection).
        t = time.perf_counter()
        self.store.finish_bulk_load(self.collection)
        self.timings["index_s"] = time.perf_counter() - t
        summary.seconds = time.perf_counter() - start
        return summary

    def run(self) -> IngestSummary:
        summary = self.new_summary()
        start = time.perf_counter()
        self.prepare()
        if self.progress.on_start:
            self.progress.on_start(len(self.cohort.slides))
        writer = Writer(self.store, self.collection, self.timings)
        try:
            pending = self.pending(summary)
            work = [(self.job(slide), record) for slide, record in pending]
            # --- slides in flight (conchdb.ingest.inflight): plans and readers run ahead ---
            flight = slides_in_flight(
                work,
                lambda item: plan_slide(item[0]),
                lambda item, plan: self._open_source(item[0], plan),
                self.options.slides_in_flight,
            )
            with contextlib.closing(flight):
                for (job, record), plan, reader in flight:
                    previous = record.get("status") if record else None
                    outcome = ingest_one_slide(
                        job, plan, self.encoder, self.slide_writer, writer, previous, self.progress, self.timings,
                        feed=self.feed, reader=reader,
                    )
                    self.emit(summary, outcome)
        except KeyboardInterrupt:
            summary.interrupted = True
            raise
        finally:
            try:
                writer.flush()
            finally:
                writer.close()
                summary.seconds = time.perf_counter() - start
        return self.finish(summary, start)

    def _open_source(self, job: SlideJob, plan: _Plan) -> TileReader | JpegTileSource | None:
        """The slide's tile source, or None when there is nothing to read (a failed open, no tissue)."""
        if plan.error is not None or plan.grid is None:
            return None
        return open_tile_source(job, plan.grid, self.encoder)

    def emit(self, summary: IngestSummary, outcome: SlideOutcome) -> None:
        summary.outcomes.append(outcome)
        if self.progress.on_outcome:
            self.progress.on_outcome(outcome)


def ingest(
    path: str | Path,
    encoder: Encoder,
    store: Store,
    collection: str = TILES_COLLECTION,
    manifest: str | Path | None = None,
    options: IngestOptions | None = None,
    progress: Progress | None = None,
) -> IngestSummary:
    """Ingest every slide under `path` into `collection`; see the module docstring."""
    cohort = discover(path)
    table = read_manifest(manifest, cohort)  # a malformed manifest fails here, before any work
    return Ingest(cohort, table, encoder, store, collection, options, progress).run()
