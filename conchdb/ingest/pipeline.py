"""The ingest pipeline: cohort -> tiles -> CONCH vectors -> points in the store.

This is the only module of `ingest` that talks to `model` and `store`. Per slide it
plans the grid (tissue mask), streams tile batches from the reader's worker processes,
embeds them, and hands points to a writer thread, so reading, embedding and writing
overlap; the next slide is planned while the current one is embedded.

What the store sees of a slide (point ids, payloads, records, stale-tile cleanup, the done
rule, and a rerun's moves, relabels and missing slides) is the archive's
(`conchdb.archive.SlideWriter`); the run skeleton (summary, writer thread, interrupt,
end) is `conchdb.archive.RunFrame`, shared with ingest through workers and feature import.

The per-slide work is split so that `conchdb.workers` runs the same code in another
process: a `SlideJob` (plain data) says what to do, `plan_slide` grids it, `embed_slide`
turns pixels into vectors, and the `SlideWriter` writes wherever the writing happens.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conchdb.archive import IngestSummary, Progress, RunFrame, SlideOutcome, SlideWriter, Tiling, Writer
from conchdb.catalog import TILES_COLLECTION, SlideStatus
from conchdb.errors import SlideError
from conchdb.ingest.cohort import Cohort, CohortSlide, discover
from conchdb.ingest.gpu_jpeg import JpegTileSource, open_jpeg_source
from conchdb.ingest.inflight import slides_in_flight
from conchdb.ingest.manifest import Manifest, ManifestRow, read_manifest
from conchdb.model.encoder import Encoder
from conchdb.model.feed import DeviceFeed, embed_batches, pinned
from conchdb.slides.grid import TileGrid, TilingParams, plan_tiles
from conchdb.slides.reader import READ_BATCH, TileReader
from conchdb.slides.slide import Slide, open_slide
from conchdb.store import Store

__all__ = [  # the run's types, for callers of the pipeline (their home is conchdb.archive)
    "Ingest", "IngestOptions", "IngestSummary", "Progress", "SlideJob", "SlideOutcome", "ingest", "writer_for_job",
]


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
    roi: Path | None = None  # QuPath GeoJSON per slide: tile only inside its annotations


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
    roi: str | None = None  # "" (or a file): ingest --roi; the slide's annotations file, "" when it has none

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
            if job.roi is not None:
                plan.grid = _inside_roi(job, plan.grid, opened.dimensions)
    except SlideError as exc:
        plan.error = str(exc)
    return plan


def _inside_roi(job: SlideJob, grid: TileGrid, dimensions: tuple[int, int]) -> TileGrid:
    """The grid's tiles at least half inside the slide's annotations (ingest --roi); a slide
    without an annotations file fails with that reason rather than being stored empty."""
    from conchdb.slides.annotations import check_inside, keep_inside, read_regions

    if not job.roi:
        raise SlideError(f"no annotations file for slide '{job.slide.id}' in the --roi folder",
                         fix="export its annotations from QuPath as <slide name>.geojson, or ingest without --roi",
                         parameter="roi")
    regions = read_regions(job.roi)
    check_inside(regions, *dimensions, source=job.roi)
    return keep_inside(grid, regions)


def _slide_info(slide: Slide) -> dict[str, Any]:
    """The record's fields read from the slide: pixel size, level-0 size, and the DICOM
    attributes a search filters on (`conchdb.catalog.DICOM_FIELDS`), which its tiles get too."""
    return {"mpp": slide.mpp, "mpp_source": slide.mpp_source, "width": slide.dimensions[0],
            "height": slide.dimensions[1], **slide.attributes}


def writer_for_job(
    store: Store, collection: str, encoder: Encoder, job: SlideJob, *, cls: type[SlideWriter] = SlideWriter
) -> SlideWriter:
    """The writer a worker uses for one job: the job's run, cohort and manifest row (`cls`: a
    subclass that checks, before it writes, that the worker's delivery is still the live one)."""
    row = ManifestRow(0, job.slide.id, job.mpp_override, dict(job.metadata))
    return cls(store, collection, encoder, Manifest(None, {job.slide.id: row}), job.cohort, job.run_id)


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
        self.cohort_name = self.options.cohort_name or cohort.name
        self.slide_writer = SlideWriter(store, collection, encoder, manifest, self.cohort_name)
        self.slides = self.slide_writer.slides
        self.tiling = Tiling.of(self.options.params)
        self.run_id = self.slide_writer.run_id
        self.timings: dict[str, float] = {}
        self._feed: DeviceFeed | None = None
        self._frame: RunFrame | None = None

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
            self.options.gpu_jpeg, self._roi_file(slide),
        )

    def _roi_file(self, slide: CohortSlide) -> str | None:
        """With --roi, the slide's annotations file ("" when it has none); None without."""
        if self.options.roi is None:
            return None
        from conchdb.slides.annotations import find_annotation_file

        found = find_annotation_file(self.options.roi, slide.id)
        return "" if found is None else str(found)

    def record(self, slide: CohortSlide) -> dict[str, Any] | None:
        """The slide's record as stored now (None: never seen)."""
        return self.slide_writer.record(slide, self.tiling)

    # -- the run -------------------------------------------------------------------------

    def is_done(self, slide: CohortSlide, record: dict[str, Any] | None) -> bool:
        """The skip rule: done (or without tissue) from this very file, at the pixel size a
        manifest or `slide_mpp` asks for now (another one cuts other pixels), and not forced."""
        if self.options.force or not self.slide_writer.is_done(slide, record):
            return False
        assert record is not None
        wanted, _ = self._override(slide)
        stored = record.get("mpp")
        return wanted is None or not isinstance(stored, (int, float)) or abs(stored - wanted) <= 1e-9 * wanted

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
        summary.passed_over = [{"series": name, "reason": why} for name, why in self.cohort.passed_over]
        summary.note_manifest(self.manifest)
        summary.timings = self.timings
        return summary

    def frame(self, summary: IngestSummary) -> RunFrame:
        """This run's skeleton (see `conchdb.archive.run`); `emit` reports through it."""
        self._frame = RunFrame(self.store, self.collection, summary, self.progress)
        return self._frame

    def pending(self, summary: IngestSummary) -> list[tuple[CohortSlide, dict[str, Any] | None]]:
        """The slides still to do, with their records, after bringing the stored slides up to
        date (moves, relabels, missing slides: see `SlideWriter.reconcile`); the done ones
        go into `summary` as skipped."""
        found = self.slide_writer.reconcile(self.cohort.slides, self.tiling)
        summary.moved, summary.missing = found.moved, found.missing
        work = []
        for slide in self.cohort.slides:
            record = found.records.get(slide.id)
            if not self.is_done(slide, record):
                work.append((slide, record))
                continue
            assert record is not None
            if self.slide_writer.relabel(slide, record):
                summary.relabelled.append(slide.id)
            skipped = SlideOutcome(slide.id, str(slide.path), SlideStatus.SKIPPED, int(record.get("tiles", 0)))
            self.emit(summary, skipped)
        return work

    def run(self) -> IngestSummary:
        summary = self.new_summary()
        frame = self.frame(summary)
        self.prepare()
        with frame.running(len(self.cohort.slides)) as writer:
            assert writer is not None
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
        return frame.finish()

    def _open_source(self, job: SlideJob, plan: _Plan) -> TileReader | JpegTileSource | None:
        """The slide's tile source, or None when there is nothing to read (a failed open, no tissue)."""
        if plan.error is not None or plan.grid is None:
            return None
        return open_tile_source(job, plan.grid, self.encoder)

    def emit(self, summary: IngestSummary, outcome: SlideOutcome) -> None:
        if self._frame is None or self._frame.summary is not summary:
            self.frame(summary)
        assert self._frame is not None
        self._frame.emit(outcome)


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
