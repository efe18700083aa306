"""What travels through the broker, as typed messages with JSON on the wire.

A task carries one `SlideTask`: the slide's `SlideJob` and what the worker must know
besides (collection, model, where to write, how often the slide was sent before). A
worker answers on the run's events list with one event per JSON object, in order:

- `Started` (tiles planned, their level-0 size, slide info), then `Batch`es (the tiles'
  own payloads and vectors, when the ingesting process writes: its `SlideWriter` names the
  points and adds what the slide's tiles share) or `Embedded` (tiles embedded, when the
  worker writes);
- one `Finished`, whose status is done, no_tissue or failed. Its `recorded` says whether
  the worker already wrote the slide record (it does when it writes into a Qdrant server);
  otherwise the ingesting process applies the pipeline's record rules itself.

Every message has `to_dict` and `from_dict`; `from_dict` refuses a missing or unknown
field with a `MessageError` naming it, so a dispatcher and a worker of different versions
fail loudly instead of reading a default. Vectors go as base64 float32 bytes: a third
larger than raw, a quarter of the size of JSON numbers, and decoded without a loop over
floats.
"""

from __future__ import annotations

import base64
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from conchdb.catalog import SlideStatus
from conchdb.errors import ConchdbError
from conchdb.ingest.cohort import CohortSlide
from conchdb.ingest.pipeline import SlideJob
from conchdb.slides.grid import TilingParams

# The statuses a slide's last event may carry.
FINAL = (SlideStatus.DONE, SlideStatus.NO_TISSUE, SlideStatus.FAILED)


class MessageError(ValueError):
    """A broker message that is not what this version of conchdb sends (a field missing or unknown)."""


def _fields(doc: Any, what: str, names: tuple[str, ...]) -> Mapping[str, Any]:
    """`doc` when it is an object with exactly the fields `names`; else a `MessageError` naming them."""
    if not isinstance(doc, Mapping):
        raise MessageError(f"{what}: expected a JSON object, got {type(doc).__name__}")
    missing = [n for n in names if n not in doc]
    unknown = sorted(set(doc) - set(names))
    if missing or unknown:
        said = [f"missing {', '.join(missing)}"] * bool(missing) + [f"unknown {', '.join(unknown)}"] * bool(unknown)
        raise MessageError(f"{what}: {'; '.join(said)} (expected {', '.join(names)}); "
                           "are the ingest and the workers the same conchdb version?")
    return doc


# -- the task -----------------------------------------------------------------------------

_SLIDE = ("id", "path", "identity", "files")
_JOB = ("slide", "cohort", "run_id", "params", "metadata", "mpp_override", "override_source", "batch_size",
        "readers", "read_batch", "gpu_jpeg", "roi")


def job_to_dict(job: SlideJob) -> dict[str, Any]:
    slide = job.slide
    return {
        "slide": {"id": slide.id, "path": str(slide.path), "identity": slide.identity,
                  "files": [str(f) for f in slide.files]},
        "cohort": job.cohort,
        "run_id": job.run_id,
        "params": job.params.to_dict(),
        "metadata": job.metadata,
        "mpp_override": job.mpp_override,
        "override_source": job.override_source,
        "batch_size": job.batch_size,
        "readers": job.readers,
        "read_batch": job.read_batch,
        "gpu_jpeg": job.gpu_jpeg,
        "roi": job.roi,
    }


def job_from_dict(doc: Any) -> SlideJob:
    d = _fields(doc, "slide job", _JOB)
    s = _fields(d["slide"], "slide job: slide", _SLIDE)
    slide = CohortSlide(s["id"], Path(s["path"]), s["identity"], tuple(Path(f) for f in s["files"]))
    try:
        params = TilingParams.from_dict(d["params"])
    except ConchdbError as exc:
        raise MessageError(f"slide job: {exc.message}") from None
    return SlideJob(
        slide=slide, cohort=d["cohort"], run_id=d["run_id"], params=params, metadata=dict(d["metadata"]),
        mpp_override=d["mpp_override"], override_source=d["override_source"], batch_size=int(d["batch_size"]),
        readers=int(d["readers"]), read_batch=int(d["read_batch"]), gpu_jpeg=bool(d["gpu_jpeg"]),
        roi=d["roi"],
    )


@dataclass(kw_only=True)
class SlideTask:
    """One slide's task: what the dispatcher sends and a worker receives (Celery's kwargs)."""

    job: SlideJob
    collection: str
    fingerprint: str  # the model the collection holds; a worker with another refuses the slide
    previous: str | None = None  # the slide record's status before this run (None: no record)
    qdrant_url: str | None = None  # set: the worker writes into this server; None: it streams back
    # Deliveries of this slide under earlier task ids: the dispatcher sends a slide again, under
    # a new id, when the worker holding it is lost. They count toward `max_deliveries`.
    sent_before: int = 0

    FIELDS: ClassVar[tuple[str, ...]] = ("job", "collection", "fingerprint", "previous", "qdrant_url",
                                         "sent_before")

    def to_dict(self) -> dict[str, Any]:
        return {"job": job_to_dict(self.job), "collection": self.collection, "fingerprint": self.fingerprint,
                "previous": self.previous, "qdrant_url": self.qdrant_url, "sent_before": self.sent_before}

    @classmethod
    def from_dict(cls, doc: Any) -> SlideTask:
        d = _fields(doc, "slide task", cls.FIELDS)
        return cls(job=job_from_dict(d["job"]), collection=str(d["collection"]), fingerprint=str(d["fingerprint"]),
                   previous=d["previous"], qdrant_url=d["qdrant_url"], sent_before=int(d["sent_before"]))


# -- events -------------------------------------------------------------------------------

def pack_vectors(vectors: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vectors, dtype=np.float32).tobytes()).decode("ascii")


def unpack_vectors(text: str, dim: int) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.float32).reshape(-1, dim)


class _Event(ABC):
    """What every event shares: the id of the task that sent it, its wire form."""

    KIND: ClassVar[str]
    task: str

    @abstractmethod
    def to_dict(self) -> dict[str, Any]:
        """The event as JSON-ready data, its `kind` included."""

    def encode(self) -> bytes:
        return json.dumps(self.to_dict()).encode()


@dataclass(kw_only=True)
class Started(_Event):
    """The slide is planned: its tiles (none: the slide has no tissue) follow."""

    KIND: ClassVar[str] = "start"
    task: str
    tiles: int
    size: int | None = None  # the tiles' level-0 side; given when the ingesting process writes
    info: dict[str, Any] = field(default_factory=dict)  # pixel size and dimensions, for the record

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, "task": self.task, "tiles": self.tiles, "size": self.size, "info": self.info}

    @classmethod
    def from_dict(cls, doc: Any) -> Started:
        d = _fields(doc, "start event", ("kind", "task", "tiles", "size", "info"))
        size = None if d["size"] is None else int(d["size"])
        return cls(task=str(d["task"]), tiles=int(d["tiles"]), size=size, info=dict(d["info"]))


@dataclass(kw_only=True)
class Batch(_Event):
    """Embedded tiles going back to the ingesting process: each tile's own payload and its vector."""

    KIND: ClassVar[str] = "batch"
    task: str
    tiles: list[dict[str, Any]]
    vectors: np.ndarray

    def __post_init__(self) -> None:
        if len(self.vectors) != len(self.tiles):
            raise MessageError(f"a batch of {len(self.tiles)} tiles came with {len(self.vectors)} vectors")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, "task": self.task, "tiles": self.tiles, "dim": int(self.vectors.shape[1]),
                "vectors": pack_vectors(self.vectors)}

    @classmethod
    def from_dict(cls, doc: Any) -> Batch:
        d = _fields(doc, "batch event", ("kind", "task", "tiles", "dim", "vectors"))
        return cls(task=str(d["task"]), tiles=list(d["tiles"]), vectors=unpack_vectors(d["vectors"], int(d["dim"])))


@dataclass(kw_only=True)
class Embedded(_Event):
    """Tiles embedded and written by the worker itself (it writes into a Qdrant server)."""

    KIND: ClassVar[str] = "progress"
    task: str
    n: int

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.KIND, "task": self.task, "n": self.n}

    @classmethod
    def from_dict(cls, doc: Any) -> Embedded:
        d = _fields(doc, "progress event", ("kind", "task", "n"))
        return cls(task=str(d["task"]), n=int(d["n"]))


@dataclass(kw_only=True)
class Finished(_Event):
    """The slide's last event; its kind on the wire is the status it ended in."""

    KIND: ClassVar[str] = "finished"  # not on the wire: `status` is
    task: str
    status: SlideStatus  # done, no_tissue or failed
    tiles: int = 0
    error: str | None = None
    info: dict[str, Any] = field(default_factory=dict)
    mean: np.ndarray | None = None  # the slide's mean vector, when the ingesting process writes the record
    recorded: bool = False  # the worker wrote the slide record itself

    def __post_init__(self) -> None:
        self.status = SlideStatus(self.status)
        if self.status not in FINAL:
            raise MessageError(f"a slide cannot finish as {self.status.value!r}")

    def to_dict(self) -> dict[str, Any]:
        mean = None if self.mean is None else pack_vectors(self.mean[None, :])
        return {"kind": self.status.value, "task": self.task, "tiles": self.tiles, "error": self.error,
                "info": self.info, "mean": mean, "recorded": self.recorded}

    @classmethod
    def from_dict(cls, doc: Any) -> Finished:
        d = _fields(doc, "final event", ("kind", "task", "tiles", "error", "info", "mean", "recorded"))
        mean = None if d["mean"] is None else np.frombuffer(base64.b64decode(d["mean"]), dtype=np.float32)
        return cls(task=str(d["task"]), status=SlideStatus(d["kind"]), tiles=int(d["tiles"]), error=d["error"],
                   info=dict(d["info"]), mean=mean, recorded=bool(d["recorded"]))


Event = Started | Batch | Embedded | Finished

_BY_KIND: dict[str, Any] = {
    Started.KIND: Started, Batch.KIND: Batch, Embedded.KIND: Embedded,
    **{status.value: Finished for status in FINAL},
}


def event_from_dict(doc: Any) -> Event:
    """The event a JSON object holds, by its `kind`."""
    if not isinstance(doc, Mapping):
        raise MessageError(f"event: expected a JSON object, got {type(doc).__name__}")
    kind = doc.get("kind")
    if kind not in _BY_KIND:
        raise MessageError(f"event: unknown kind {kind!r} (expected one of {', '.join(_BY_KIND)})")
    return _BY_KIND[kind].from_dict(doc)


def decode_event(raw: bytes | str) -> Event:
    return event_from_dict(json.loads(raw))
