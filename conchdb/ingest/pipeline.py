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
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conchdb.catalog import (
    FINISHED,
    RESERVED_FIELDS,
    TILES_COLLECTION,
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
from conchdb.ingest.manifest import Manifest, read_manifest
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
        }


@dataclass
class Progress:
    """Callbacks for a progress display; every one is optional."""

    on_start: Callable[[int], None] | None = None  # number of slides
    on_slide: Callable[[str, int], None] | None = None  # slide id, tiles planned
    on_batch: Callable[[int], None] | None = None  # tiles embedded
    on_outcome: Callable[[SlideOutcome], None] | None = None


class _Writer:
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


@dataclass
class _Plan:
    """A slide opened and gridded, ready to read (or the error that stopped it)."""

    slide: CohortSlide
    mpp_override: float | None
    grid: TileGrid | None = None
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


def _plan(slide: CohortSlide, mpp_override: float | None, override_source: str, params: TilingParams) -> _Plan:
    plan = _Plan(slide, mpp_override)
    try:
        with open_slide(slide.path, mpp_override, override_source) as opened:
            _, plan.grid = plan_tiles(opened, params)
            plan.info = _slide_info(opened)
    except SlideError as exc:
        plan.error = str(exc)
    return plan


def _slide_info(slide: Slide) -> dict[str, Any]:
    return {"mpp": slide.mpp, "mpp_source": slide.mpp_source, "width": slide.dimensions[0],
            "height": slide.dimensions[1]}


class Ingest:
    """One ingest run over a cohort into one store collection."""

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
        self.slides = slides_collection(collection)
        self.options = options or IngestOptions()
        self.progress = progress or Progress()
        self.cohort_name = self.options.cohort_name or cohort.root.name
        params = self.options.params
        self.tiling = tiling_key(params.target_mpp, params.tile_px, params.stride)
        self.run_id = uuid.uuid4().hex
        self.timings: dict[str, float] = {}
        self.feed = DeviceFeed(encoder, self.options.compile, self.timings, self.options.batch_size)

    # -- collections and records ---------------------------------------------------------

    def prepare(self) -> None:
        """Create or check both collections; refuses another model's collection before any work."""
        metadata = {
            **self.encoder.describe(),
            "tiling": self.options.params.to_dict(),
            "cohort": self.cohort_name,
        }
        clash = sorted(set(self.manifest.columns) & RESERVED_FIELDS)
        if clash:
            raise ConchdbError(
                f"manifest {self.manifest.path}: column(s) {', '.join(clash)} would overwrite conchdb's own fields",
                fix="rename those columns in the manifest",
                parameter="manifest",
            )
        tiles, slides = tiles_layout(self.manifest.columns), slides_layout(self.manifest.columns)
        self.store.ensure_collection(CollectionSpec(self.collection, self.encoder.dim, metadata, **asdict(tiles)))
        self.store.ensure_collection(CollectionSpec(self.slides, self.encoder.dim, metadata, **asdict(slides)))

    def record_id(self, slide: CohortSlide) -> str:
        return stable_id("slide", self.cohort_name, slide.id, self.tiling)

    def _record(self, slide: CohortSlide) -> dict[str, Any] | None:
        hits = self.store.retrieve(self.slides, [self.record_id(slide)])
        return hits[0].payload if hits else None

    def _write_record(
        self, slide: CohortSlide, status: SlideStatus, vector: np.ndarray | None = None, **extra: Any
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
            "tiling": self.tiling,
            "target_mpp": self.options.params.target_mpp,
            "tile_px": self.options.params.tile_px,
            "ingest_run": self.run_id,
            "updated_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            **self.manifest.payload_for(slide.id),
            **extra,
        }
        self.store.upsert(self.slides, [Point(self.record_id(slide), vector, payload)])

    def _slide_filter(self, slide: CohortSlide, *more: Condition) -> Filter:
        return Filter((
            Condition("slide_id", "eq", slide.id),
            Condition("cohort", "eq", self.cohort_name),
            Condition("tiling", "eq", self.tiling),
            *more,
        ))

    # -- the run -------------------------------------------------------------------------

    def _todo(self) -> Iterator[tuple[CohortSlide, dict[str, Any] | None]]:
        for slide in self.cohort.slides:
            yield slide, self._record(slide)

    def _is_done(self, slide: CohortSlide, record: dict[str, Any] | None) -> bool:
        return (
            not self.options.force
            and record is not None
            and record.get("status") in FINISHED
            and record.get("identity") == slide.identity
        )

    def _override(self, slide: CohortSlide) -> tuple[float | None, str]:
        mpp = self.manifest.mpp_for(slide.id)
        if mpp is not None:
            return mpp, "manifest"
        return self.options.slide_mpp, "--slide-mpp"

    def run(self) -> IngestSummary:
        # The manifest lies among the cohort's files but is not a slide passed over.
        manifest = self.manifest.path.resolve() if self.manifest.path else None
        not_slides = sum(Path(f).resolve() != manifest for f in self.cohort.skipped)
        summary = IngestSummary(self.store.location, self.collection, not_slides=not_slides)
        summary.manifest = str(self.manifest.path) if self.manifest.path else None
        summary.manifest_unmatched = [f"line {line}: {value}" for line, value in self.manifest.unmatched]
        summary.manifest_missing = list(self.manifest.missing) if self.manifest.path else []
        summary.timings = self.timings
        start = time.perf_counter()
        self.prepare()
        if self.progress.on_start:
            self.progress.on_start(len(self.cohort.slides))
        writer = _Writer(self.store, self.collection, self.timings)
        try:
            work = [(s, r) for s, r in self._todo()]
            pending = [(s, r) for s, r in work if not self._is_done(s, r)]
            for slide, record in work:
                if self._is_done(slide, record):
                    skipped = SlideOutcome(slide.id, str(slide.path), SlideStatus.SKIPPED, int(record.get("tiles", 0)))
                    self._emit(summary, skipped)
            # --- slides in flight (conchdb.ingest.inflight): plans and readers run ahead ---
            flight = slides_in_flight(
                pending,
                lambda item: _plan(item[0], *self._override(item[0]), self.options.params),
                lambda _item, plan: self._open_reader(plan),
                self.options.slides_in_flight,
            )
            with contextlib.closing(flight):
                for (_, record), plan, reader in flight:
                    self._emit(summary, self._ingest_slide(plan, record, writer, reader))
        except KeyboardInterrupt:
            summary.interrupted = True
            raise
        finally:
            try:
                writer.flush()
            finally:
                writer.close()
                summary.seconds = time.perf_counter() - start
        # Also when nothing was written now: a run that died before this point left its
        # slides done but their index unbuilt (a no-op on a finished collection).
        t = time.perf_counter()
        self.store.finish_bulk_load(self.collection)
        self.timings["index_s"] = time.perf_counter() - t
        summary.seconds = time.perf_counter() - start
        return summary

    def _emit(self, summary: IngestSummary, outcome: SlideOutcome) -> None:
        summary.outcomes.append(outcome)
        if self.progress.on_outcome:
            self.progress.on_outcome(outcome)

    def _open_reader(self, plan: _Plan) -> TileReader | JpegTileSource | None:
        """The slide's tile reader (not yet started), or None when there is nothing to read."""
        if plan.error is not None or plan.grid is None or len(plan.grid) == 0:
            return None
        if self.options.gpu_jpeg:
            source = open_jpeg_source(plan.slide.path, plan.grid, self.options.batch_size, self.encoder.device,
                                      plan.mpp_override)
            if source is not None:
                return source
        return TileReader(
            plan.slide.path, plan.grid, batch_size=min(self.options.read_batch, self.options.batch_size),
            workers=self.options.readers, mpp_override=plan.mpp_override, copy=False,
        )

    def _ingest_slide(
        self, plan: _Plan, record: dict[str, Any] | None, writer: _Writer, reader: TileReader | JpegTileSource | None
    ) -> SlideOutcome:
        """One slide's records and tiles; `reader` (closed here) is None when there is nothing to read."""
        with reader if reader is not None else contextlib.nullcontext():
            return self._ingest_read(plan, record, writer, reader)

    def _ingest_read(
        self, plan: _Plan, record: dict[str, Any] | None, writer: _Writer, reader: TileReader | JpegTileSource | None
    ) -> SlideOutcome:
        slide, start = plan.slide, time.perf_counter()
        outcome = SlideOutcome(slide.id, str(slide.path), SlideStatus.FAILED)
        if plan.error is None and plan.grid is not None and len(plan.grid) == 0:
            self._write_record(slide, SlideStatus.NO_TISSUE, tiles=0, error=None, **plan.info)
            self._delete_stale(slide)
            outcome.status = SlideStatus.NO_TISSUE
            return outcome
        if plan.error is None:
            self._write_record(slide, SlideStatus.IN_PROGRESS, tiles=0, error=None, **plan.info)
            try:
                assert reader is not None
                mean = self._embed_slide(plan, reader, writer)
                writer.flush()
                self._delete_stale(slide)
                self._write_record(slide, SlideStatus.DONE, vector=mean, tiles=len(plan.grid), error=None, **plan.info)
                outcome.status, outcome.tiles = SlideStatus.DONE, len(plan.grid)
            except SlideError as exc:
                writer.flush()
                plan.error = str(exc)
        if plan.error is not None:
            outcome.error = plan.error
            self._write_record(slide, SlideStatus.FAILED, tiles=0, error=plan.error, **plan.info)
            if record is None or record.get("status") != SlideStatus.DONE:
                # Nothing good was stored for this slide before: drop the partial tiles.
                self.store.delete(self.collection, self._slide_filter(slide))
        outcome.seconds = time.perf_counter() - start
        return outcome

    def _delete_stale(self, slide: CohortSlide) -> None:
        self.store.delete(self.collection, self._slide_filter(slide, Condition("ingest_run", "ne", self.run_id)))

    def _embed_slide(self, plan: _Plan, reader: TileReader | JpegTileSource, writer: _Writer) -> np.ndarray:
        """Stream, embed and hand over every tile of the slide; returns the normalized mean vector."""
        slide, grid = plan.slide, plan.grid
        assert grid is not None
        if self.progress.on_slide:
            self.progress.on_slide(slide.id, len(grid))
        # What every tile of the slide shares goes to the store once per batch, not per tile.
        shared = {
            "slide_id": slide.id,
            "path": str(slide.path),
            "cohort": self.cohort_name,
            "size": grid.tile_size_level0,
            "mpp": plan.info.get("mpp"),
            "mpp_source": plan.info.get("mpp_source"),
            "target_mpp": grid.target_mpp,
            "tile_px": grid.tile_px,
            "tiling": self.tiling,
            "ingest_run": self.run_id,
            **self.manifest.payload_for(slide.id),
        }
        identity = f"{self.cohort_name}/{slide.id}@{slide.identity}"
        total = np.zeros(self.encoder.dim, dtype=np.float64)
        # --- the device feed (conchdb.model.feed): batches in, (start, vectors) out ---
        with pinned(reader.slots):
            for first, vectors in embed_batches(reader, self.feed, self.timings):
                total += vectors.sum(axis=0)
                tiles = grid.tiles[first : first + len(vectors)]
                points = [
                    Point(
                        tile_point_id(identity, t.x, t.y, t.size, grid.target_mpp, self.encoder.fingerprint),
                        vec,
                        {"x": t.x, "y": t.y, "tissue": t.tissue},
                    )
                    for t, vec in zip(tiles, vectors, strict=True)
                ]
                writer.put(points, shared)
                if self.progress.on_batch:
                    self.progress.on_batch(len(points))
        norm = np.linalg.norm(total)
        return (total / norm if norm > 0 else total).astype(np.float32)


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
