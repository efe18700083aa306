"""A synthetic slide archive with class structure, written as ingest writes tiles.

Each slide belongs to a class and a patient; its tile vectors mix the class's planted
direction, a direction of the slide's own, one of a few tissue patterns shared by every
class, and noise. So slides of one class resemble each other more than any other slide,
and a slide search must find them first.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from conchdb.catalog import TILE_FIELDS, SlideStatus, slides_collection, slides_layout
from conchdb.store import CollectionSpec, Point, Store, stable_id

DIM = 512
CLASSES = ("adenoma", "carcinoma", "normal")
PATTERNS = 6


@dataclass
class Archive:
    """The slides' ids, classes, patients and tile vectors (slide -> (tiles, DIM)), and the
    class directions planted in them. Tile t of a slide is stored as `stable_id(cohort, slide, t)`."""

    slides: list[str]
    labels: dict[str, str]
    patients: dict[str, str]
    vectors: dict[str, np.ndarray]
    directions: np.ndarray

    def exact_scores(self, query: np.ndarray, exclude: str) -> dict[str, float]:
        """Median over query rows of the best cosine to each other slide's tiles."""
        return {
            s: float(np.median((v @ query.T).max(axis=0))) for s, v in self.vectors.items() if s != exclude
        }


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def make_archive(per_class: int = 4, tiles: int = 30, seed: int = 0) -> Archive:
    """`per_class` slides per class, two slides per patient (patients cross classes)."""
    rng = np.random.default_rng(seed)
    directions = unit(rng.normal(size=(len(CLASSES), DIM)))
    patterns = unit(rng.normal(size=(PATTERNS, DIM)))
    slides, labels, patients, vectors = [], {}, {}, {}
    for n in range(per_class * len(CLASSES)):
        slide = f"s{n:02d}.svs"
        label = CLASSES[n % len(CLASSES)]
        own = unit(rng.normal(size=DIM))
        kinds = patterns[rng.integers(PATTERNS, size=tiles)]
        noise = rng.normal(size=(tiles, DIM)) / np.sqrt(DIM)
        vectors[slide] = unit(1.0 * directions[CLASSES.index(label)] + 0.5 * own + 0.7 * kinds + 0.4 * noise)
        slides.append(slide)
        labels[slide] = label
        patients[slide] = f"P{n // 2:02d}"
    return Archive(slides, labels, patients, vectors, directions)


def write_archive(store: Store, name: str, archive: Archive, labels: dict[str, str | None] | None = None,
                  cohort: str = "archive", records: bool = True) -> None:
    """The archive's tiles in `name`, with the payload ingest writes and a manifest's
    `diagnosis` and `patient_id` (`labels` overrides a slide's diagnosis; None leaves it out),
    and, with `records`, each slide's done record holding its mean tile vector, as ingest
    writes it in `slides_collection(name)`."""
    fields = {**TILE_FIELDS, "diagnosis": "keyword", "patient_id": "keyword"}
    store.ensure_collection(CollectionSpec(name, DIM, {"model_fingerprint": "archive"}, fields))  # type: ignore[arg-type]
    if records:
        layout = slides_layout({"diagnosis": "string", "patient_id": "string"})
        store.ensure_collection(CollectionSpec(slides_collection(name), DIM, {"model_fingerprint": "archive"},
                                               **asdict(layout)))
    for slide in archive.slides:
        label = (labels or {}).get(slide, archive.labels[slide])
        shared = {"slide_id": slide, "path": f"/nowhere/{slide}", "cohort": cohort, "size": 512, "mpp": 0.5,
                  "mpp_source": "manifest", "target_mpp": 0.5, "tile_px": 512, "tiling": "0.5um-512px-s512",
                  "ingest_run": "test", "patient_id": archive.patients[slide]}
        if label is not None:
            shared["diagnosis"] = label
        points = [
            Point(stable_id(cohort, slide, t), vector, {"x": 512 * t, "y": 0, "tissue": 1.0})
            for t, vector in enumerate(archive.vectors[slide])
        ]
        store.upsert(name, points, shared)
        if records:
            mean = archive.vectors[slide].mean(axis=0)
            record = {**shared, "status": SlideStatus.DONE.value, "identity": slide, "tiles": len(points)}
            store.upsert(slides_collection(name), [Point(stable_id("slide", cohort, slide, shared["tiling"]),
                                                         unit(mean), record)])
