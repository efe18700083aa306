"""The archive: the one owner of what a store knows about slides.

Below `ingest` and `search` (which both use it and know nothing of each other), above
`store`: slide records and a slide's tiles as a unit (`SlideCatalog`: find, read, relabel,
move, remove), what a run writes (`SlideWriter`: ids, payloads, the done rule, a rerun's
upkeep), the run skeleton every ingest and import shares (`RunFrame`), and mosaics (the
pure-numpy choice and the marks in the store).
"""

from conchdb.archive.noise import NoiseFloor, measure_noise_floor, record_noise_floor
from conchdb.archive.records import Removal, SlideCatalog, file_state, labels_of, of_slide, record_id, scope
from conchdb.archive.run import IngestSummary, Progress, RunFrame, SlideOutcome, Writer
from conchdb.archive.writer import Reconciled, SlideWriter, Tiling

__all__ = [
    "IngestSummary",
    "NoiseFloor",
    "Progress",
    "Reconciled",
    "Removal",
    "RunFrame",
    "SlideCatalog",
    "SlideOutcome",
    "SlideWriter",
    "Tiling",
    "Writer",
    "file_state",
    "labels_of",
    "measure_noise_floor",
    "of_slide",
    "record_id",
    "record_noise_floor",
    "scope",
]
