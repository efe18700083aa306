"""What travels through the broker, as JSON: slide jobs in tasks, and events coming back.

A task carries a `SlideJob` as plain data. A worker answers on the run's events list
with one JSON object per event, in order:

- `start` (tiles planned, their level-0 size, slide info), then `batch` (the tiles' own
  payloads and vectors, when the ingesting process writes: its `SlideWriter` names the
  points and adds what the slide's tiles share) or `progress` (tiles embedded, when the
  worker writes);
- one final event: `done`, `no_tissue` or `failed`. Its `recorded` says whether the
  worker already wrote the slide record (it does when it writes into a Qdrant server);
  otherwise the ingesting process applies the pipeline's record rules itself.

Vectors go as base64 float32 bytes: a third larger than raw, a quarter of the size of
JSON numbers, and decoded without a loop over floats.
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conchdb.catalog import SlideStatus
from conchdb.ingest.cohort import CohortSlide
from conchdb.ingest.pipeline import SlideJob
from conchdb.slides.grid import TilingParams
from conchdb.slides.reader import READ_BATCH
from conchdb.slides.tissue import TissueParams

FINAL = frozenset(s.value for s in (SlideStatus.DONE, SlideStatus.NO_TISSUE, SlideStatus.FAILED))


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


def job_from_dict(doc: dict[str, Any]) -> SlideJob:
    s = doc["slide"]
    slide = CohortSlide(s["id"], Path(s["path"]), s["identity"], tuple(Path(f) for f in s["files"]))
    params = dict(doc["params"])
    params["tissue"] = TissueParams(**params["tissue"])
    return SlideJob(
        slide, doc["cohort"], doc["run_id"], TilingParams(**params), dict(doc["metadata"]),
        doc["mpp_override"], doc["override_source"], int(doc["batch_size"]), int(doc["readers"]),
        int(doc.get("read_batch", READ_BATCH)), bool(doc.get("gpu_jpeg", False)), doc.get("roi"),
    )


def pack_vectors(vectors: np.ndarray) -> str:
    return base64.b64encode(np.ascontiguousarray(vectors, dtype=np.float32).tobytes()).decode("ascii")


def unpack_vectors(text: str, dim: int) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=np.float32).reshape(-1, dim)


@dataclass
class Event:
    """One message from a slide's task to the ingesting process."""

    task: str
    kind: str  # start | batch | progress | done | no_tissue | failed
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def final(self) -> bool:
        return self.kind in FINAL

    def encode(self) -> bytes:
        return json.dumps({"task": self.task, "kind": self.kind, **self.data}).encode()

    @classmethod
    def decode(cls, raw: bytes) -> Event:
        doc = json.loads(raw)
        return cls(doc.pop("task"), doc.pop("kind"), doc)


def batch_event(task: str, tiles: list[dict[str, Any]], vectors: np.ndarray) -> Event:
    """A batch of embedded tiles as `embed_slide` gives it: each tile's own payload and its vector."""
    return Event(task, "batch", {"tiles": tiles, "dim": int(vectors.shape[1]), "vectors": pack_vectors(vectors)})


def batch_tiles(event: Event) -> tuple[list[dict[str, Any]], np.ndarray]:
    data = event.data
    vectors = unpack_vectors(data["vectors"], data["dim"])
    if len(vectors) != len(data["tiles"]):
        raise ValueError(f"a batch of {len(data['tiles'])} tiles came with {len(vectors)} vectors")
    return data["tiles"], vectors
