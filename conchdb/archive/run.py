"""The run skeleton that ingest in this process, ingest through workers and feature import share.

A run is: a summary, the collections prepared, a writer thread for the points, the
slides one by one (each ending in a `SlideOutcome`), Ctrl-C recorded as an interrupted
run, and at the end the indexes built that a bulk load went without. `RunFrame` does the
parts that are the same for all three, so each run writes only how it gets its slides'
vectors.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from conchdb.archive.noise import record_noise_floor
from conchdb.catalog import SlideStatus
from conchdb.store import Point, Store


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
    """What a run did; `to_dict()` is the `--json` output.

    Besides each slide's outcome: slides whose manifest values changed and were relabelled
    in place, slides found at a new path (moved, not embedded again), and stored slides of
    the cohort whose file is gone (missing, kept until removed on purpose)."""

    store: str
    collection: str
    outcomes: list[SlideOutcome] = field(default_factory=list)
    not_slides: int = 0
    passed_over: list[dict[str, str]] = field(default_factory=list)  # DICOM series that are not WSIs, and why
    manifest: str | None = None
    manifest_unmatched: list[str] = field(default_factory=list)
    manifest_missing: list[str] = field(default_factory=list)
    relabelled: list[str] = field(default_factory=list)
    moved: list[dict[str, str]] = field(default_factory=list)
    missing: list[dict[str, Any]] = field(default_factory=list)
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

    def note_manifest(self, manifest: Any) -> None:
        """What the manifest's join found: rows naming no slide, slides without a row."""
        if manifest.path is None:
            return
        self.manifest = str(manifest.path)
        self.manifest_unmatched = [f"line {line}: {value}" for line, value in manifest.unmatched]
        self.manifest_missing = list(manifest.missing)

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
            "passed_over": self.passed_over,
            "tiles_written": self.tiles_written,
            "relabelled": self.relabelled,
            "moved": self.moved,
            "missing": self.missing,
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


class RunFrame:
    """The parts of a run that ingest, ingest through workers and feature import share:
    the clock, the progress callbacks, the writer thread, Ctrl-C, and the end."""

    def __init__(self, store: Store, collection: str, summary: IngestSummary, progress: Progress | None = None):
        self.store, self.collection, self.summary = store, collection, summary
        self.progress = progress or Progress()
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def running(self, slides: int, *, writer: bool = True) -> Iterator[Writer | None]:
        """The slides' loop: a writer thread (or None, where nothing is written here) that is
        flushed and closed however the loop ends; an interrupt is recorded and raised on."""
        self.start = time.perf_counter()
        if self.progress.on_start:
            self.progress.on_start(slides)
        thread = Writer(self.store, self.collection, self.summary.timings) if writer else None
        try:
            yield thread
        except KeyboardInterrupt:
            self.summary.interrupted = True
            raise
        finally:
            try:
                if thread is not None:
                    thread.flush()
            finally:
                if thread is not None:
                    thread.close()
                self.summary.seconds = time.perf_counter() - self.start

    def emit(self, outcome: SlideOutcome) -> None:
        self.summary.outcomes.append(outcome)
        if self.progress.on_outcome:
            self.progress.on_outcome(outcome)

    def finish(self, *, index: bool = True) -> IngestSummary:
        """After the last slide: build the indexes deferred while loading, measure and record
        the collection's noise floor (see `conchdb.archive.noise`), and stop the clock.

        Also when nothing was written now: a run that died before this point left its slides
        done but their index unbuilt (a no-op on a finished collection)."""
        if index:
            t = time.perf_counter()
            self.store.finish_bulk_load(self.collection)
            self.summary.timings["index_s"] = time.perf_counter() - t
        if self.summary.tiles_written:
            # Measured again whenever tiles were added: a new cohort can move it.
            t = time.perf_counter()
            record_noise_floor(self.store, self.collection)
            self.summary.timings["noise_floor_s"] = time.perf_counter() - t
        self.summary.seconds = time.perf_counter() - self.start
        return self.summary
