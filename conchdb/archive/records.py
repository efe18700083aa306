"""`SlideCatalog`: the one place that knows how a slide is kept in a store.

A stored slide is a record (one point in `slides_collection(tiles)`, one per cohort, slide
id and tiling, whose vector is the slide's mean tile vector once done) and its tiles (the
points of the tiles collection with the same `slide_id`, `cohort` and `tiling`). Everything
that finds, reads or changes slides as a unit goes through here: record ids and filters,
the read side (records by filter, done slides, slide ids, a file's recorded pixel size,
the slides nearest a vector), and the archive's upkeep (relabel, move, remove, whether
the file is still there), so that ingest, workers, feature import, search, export, the
API and the CLI agree on what a slide is.

Labels are the manifest's columns. A record lists the ones it got in `manifest_columns`, so
that a later manifest without a column removes that column, and nothing else, from the
record and its tiles. Records written before that field existed have their labels worked
out as the fields conchdb does not own.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from conchdb.catalog import (
    DICOM_FIELDS,
    IMPORT_RECORD_FIELDS,
    MANIFEST_COLUMNS_FIELD,
    SLIDE_FIELDS,
    TILE_ONLY_FIELDS,
    SlideStatus,
    slides_collection,
)
from conchdb.errors import QueryError, StoreError
from conchdb.slides.dicom import is_dicomweb, source_text
from conchdb.store import Condition, Filter, Hit, Point, Store, stable_id

OWN_RECORD_FIELDS = frozenset({*SLIDE_FIELDS, *DICOM_FIELDS, *IMPORT_RECORD_FIELDS, MANIFEST_COLUMNS_FIELD})
"""Fields of a record that conchdb writes; any other field came from a manifest."""


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def record_id(cohort: str, slide_id: str, tiling: str) -> str:
    """The point id of a slide's record: one per cohort, slide id and tiling."""
    return stable_id("slide", cohort, slide_id, tiling)


def scope(record: Mapping[str, Any], *more: Condition) -> Filter:
    """The filter that selects one stored copy of a slide, in the tiles collection and in the
    records collection alike (records carry the same three fields as their tiles)."""
    return Filter((
        Condition("slide_id", "eq", record["slide_id"]),
        Condition("cohort", "eq", record["cohort"]),
        Condition("tiling", "eq", record["tiling"]),
        *more,
    ))


def of_slide(slide_id: str, *more: Condition) -> Filter:
    """The filter that selects every stored copy of a slide id (all cohorts and tilings), with
    more conditions; `scope` narrows to one copy."""
    return Filter((Condition("slide_id", "eq", slide_id), *more))


def labels_of(record: Mapping[str, Any]) -> dict[str, Any]:
    """The manifest values a record holds (see the module docstring)."""
    columns = record.get(MANIFEST_COLUMNS_FIELD)
    if isinstance(columns, list):
        return {k: record[k] for k in columns if k in record}
    return {k: v for k, v in record.items() if k not in OWN_RECORD_FIELDS}


def file_state(record: Mapping[str, Any]) -> str:
    """`present` or `missing` for the slide file the record names; `remote` for a slide on a
    DICOMweb server (not looked up: a server that is down must not make slides missing);
    `none` when it names none (features imported without their slide)."""
    path = record.get("path")
    if not path:
        return "none"
    if is_dicomweb(str(path)):
        return "remote"
    return "present" if Path(str(path)).exists() else "missing"


def recorded_mpp(path: str | Path, payloads: Iterable[Mapping[str, Any]]) -> float | None:
    """The pixel size that records or tile payloads (`path` and `mpp` fields) give the slide
    file at `path`; None when none of them is that file or none gives a size.

    Paths are compared resolved, relative to the working folder, as slides are opened.
    Payloads of one file that disagree (ingested twice with different sizes) are an error,
    since a region could then be cut at either."""
    target = Path(path).resolve()
    found: set[float] = set()
    for payload in payloads:
        stored, mpp = payload.get("path"), payload.get("mpp")
        if stored and isinstance(mpp, (int, float)) and not isinstance(mpp, bool) and Path(stored).resolve() == target:
            found.add(float(mpp))
    if len(found) > 1:
        sizes = ", ".join(f"{m:g}" for m in sorted(found))
        raise QueryError(
            f"{path} is stored with several pixel sizes ({sizes} µm/px)",
            fix="give the slide's pixel size for the query explicitly",
            parameter="slide_mpp",
        )
    return found.pop() if found else None


@dataclass
class Removal:
    """What removing one stored copy of a slide took away."""

    slide_id: str
    cohort: str
    tiling: str
    tiles: int
    side_files: list[str]

    def to_dict(self) -> dict[str, Any]:
        return {"slide_id": self.slide_id, "cohort": self.cohort, "tiling": self.tiling, "tiles": self.tiles,
                "side_files": self.side_files}


class SlideCatalog:
    """The slides of one tiles collection (and its records collection) in a store."""

    def __init__(self, store: Store, collection: str):
        self.store, self.collection = store, collection
        self.records_collection = slides_collection(collection)

    # -- reading -------------------------------------------------------------------------

    def has_records(self) -> bool:
        """Whether the collection has a records collection (one conchdb ingest or import made)."""
        return self.store.collection_metadata(self.records_collection) is not None

    def record(self, cohort: str, slide_id: str, tiling: str) -> dict[str, Any] | None:
        """One record's payload, or None if it was never written."""
        if not self.has_records():
            return None
        hits = self.store.retrieve(self.records_collection, [record_id(cohort, slide_id, tiling)])
        return hits[0].payload if hits else None

    def records(self, flt: Filter | None = None) -> list[dict[str, Any]]:
        """The records matching `flt` (all of them without), ordered by slide id, cohort and
        tiling; none when the collection has no records."""
        if not self.has_records():
            return []
        found = [h.payload for h in self.store.scroll(self.records_collection, flt)]
        return sorted(found, key=lambda r: (str(r.get("slide_id")), str(r.get("cohort")), str(r.get("tiling"))))

    def records_of(self, slide_id: str) -> list[dict[str, Any]]:
        """Every record of one slide id (one per cohort and tiling), done ones first."""
        found = self.records(Filter((Condition("slide_id", "eq", slide_id),)))
        return sorted(found, key=lambda r: r.get("status") != SlideStatus.DONE.value)

    def done(self, flt: Filter | None = None) -> list[dict[str, Any]]:
        """The records of finished slides with tiles (status done) matching `flt`."""
        status = Condition("status", "eq", SlideStatus.DONE.value)
        return self.records(Filter((status, *(flt.must if flt else ()))))

    def slide_ids(self, flt: Filter | None = None) -> list[str]:
        """The stored slide ids: from the records when there are some and no filter narrows
        the tiles (one point a slide), else from the matching tiles' payloads."""
        if flt or not self.has_records():
            ids = {h.payload.get("slide_id") for h in self.store.scroll(self.collection, flt)}
        else:
            ids = {r.get("slide_id") for r in self.records()}
        return sorted(str(i) for i in ids if i is not None)

    def known_ids(self) -> list[str]:
        """Slide ids with a record (for "did you mean" in errors); none without records."""
        return sorted({str(r.get("slide_id")) for r in self.records()})

    def recorded_mpp(self, path: str | Path) -> float | None:
        """The pixel size stored for the slide file at `path` (see `recorded_mpp`): from its
        records, else from one of its tiles (a store filled without records)."""
        candidates: list[Mapping[str, Any]] = self.records()
        if not candidates:
            target = Path(path).resolve()
            spellings = sorted({str(path), str(Path(path)), str(target)})
            tiles = self.store.scroll(self.collection, Filter((Condition("path", "in", spellings),)))
            candidates = [next((h.payload for h in tiles), {})]
        return recorded_mpp(path, candidates)

    def source_of(self, slide_id: str) -> dict[str, Any] | None:
        """Where a stored slide's pixels are: its record (a done one first), else one of its
        tiles (a store filled without records); each holds `path` and the `mpp` it was read at.
        None when the store does not hold the slide."""
        records = self.records_of(slide_id)
        if records:
            return records[0]
        return next((h.payload for h in self.store.scroll(self.collection, of_slide(slide_id))), None)

    def nearest_done(self, vector: np.ndarray, n: int, flt: Filter | None = None) -> list[str]:
        """The ids of the `n` done slides whose mean tile vectors are nearest `vector`, best
        first, under `flt`'s conditions that a record can answer (those on a tile's own
        fields are dropped: the caller checks them on the tiles)."""
        keep = (c for c in (flt.must if flt else ()) if c.field not in TILE_ONLY_FIELDS)
        where = Filter((Condition("status", "eq", SlideStatus.DONE.value), *keep))
        # A slide stored at two tilings has two records: ask for more, keep each slide once.
        hits = self.store.query_batch(self.records_collection, np.asarray(vector)[None], k=2 * n, flts=where,
                                      payload_fields=("slide_id",))[0]
        found = dict.fromkeys(str(h.payload["slide_id"]) for h in hits if h.payload.get("slide_id") is not None)
        return list(found)[:n]

    def mean_vectors(self, slide_ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The mean tile vector (unit length) that the done records of `slide_ids` hold, by
        slide id; a slide stored at several tilings gives one of its records' means, and a
        slide without a done record is left out."""
        if not slide_ids or not self.has_records():
            return {}
        done = Condition("status", "eq", SlideStatus.DONE.value)
        found = self.store.scroll(self.records_collection, Filter((done, Condition("slide_id", "in", list(slide_ids)))),
                                  with_vectors=True)
        return {str(h.payload["slide_id"]): h.vector for h in found
                if h.vector is not None and h.payload.get("slide_id") is not None}

    def tiles(self, record: Mapping[str, Any], *, with_vectors: bool = False) -> list[Hit]:
        """The tiles of one stored copy of a slide."""
        return list(self.store.scroll(self.collection, scope(record), with_vectors=with_vectors))

    def count_tiles(self, record: Mapping[str, Any]) -> int:
        return self.store.count(self.collection, scope(record))

    # -- upkeep --------------------------------------------------------------------------

    def relabel(self, record: Mapping[str, Any], labels: Mapping[str, Any]) -> bool:
        """Give a stored slide (its record and every tile) the manifest values `labels`,
        removing the manifest fields it has that `labels` lacks; returns whether anything
        changed. Payload updates by filter: no vector is read or written."""
        old = labels_of(record)
        if old == dict(labels) and isinstance(record.get(MANIFEST_COLUMNS_FIELD), list):
            return False
        gone = sorted(set(old) - set(labels))
        if labels:
            self.store.set_payload(self.collection, dict(labels), flt=scope(record))
        if gone:
            self.store.delete_payload(self.collection, gone, flt=scope(record))
        ids = [record_id(record["cohort"], record["slide_id"], record["tiling"])]
        self.store.set_payload(self.records_collection,
                               {**labels, MANIFEST_COLUMNS_FIELD: sorted(labels), "updated_at": now()}, ids=ids)
        if gone:
            self.store.delete_payload(self.records_collection, gone, ids=ids)
        return old != dict(labels)

    def move(self, record: Mapping[str, Any], slide_id: str, path: str | Path) -> dict[str, Any]:
        """The same slide file found at a new place: its record and tiles take the new slide
        id and path, without a vector recomputed; returns the new record.

        Tile point ids stay as they were (they are names fixed when a tile is first written;
        a later forced ingest writes new ones and deletes these as stale). The tiles go
        first, then the new record, then the old record: a move cut short is finished by the
        next run, which finds the file at its new place again."""
        old_scope = scope(record)
        path = source_text(path)
        new = {**record, "slide_id": slide_id, "path": path, "updated_at": now()}
        self.store.set_payload(self.collection, {"slide_id": slide_id, "path": path}, flt=old_scope)
        old_id = record_id(record["cohort"], record["slide_id"], record["tiling"])
        found = self.store.retrieve(self.records_collection, [old_id], with_vectors=True)
        if not found or found[0].vector is None:
            raise StoreError(f"slide '{record['slide_id']}' has no record in {self.store.location} to move",
                             fix="ingest the folder again; the slide is then ingested as new")
        vector = found[0].vector
        new_id = record_id(record["cohort"], slide_id, record["tiling"])
        self.store.upsert(self.records_collection, [Point(new_id, vector, new)])
        if new_id != old_id:
            self.store.delete(self.records_collection, old_scope)
        return new

    def remove(self, record: Mapping[str, Any]) -> Removal:
        """Remove one stored copy of a slide: its tiles (mosaic marks with them), its record and
        its side files (kept pre-projection features)."""
        tiles = self.count_tiles(record)
        self.store.delete(self.collection, scope(record))
        self.store.delete(self.records_collection, scope(record))
        side = [str(record["raw_features"])] if record.get("raw_features") else []
        for file in side:
            Path(file).unlink(missing_ok=True)
        return Removal(str(record["slide_id"]), str(record["cohort"]), str(record["tiling"]), tiles, side)


STATUS_CHOICES = ("done", "failed", "in_progress", "no_tissue", "missing")
"""What `conchdb slides --status` takes: a stored status, or `missing` (the file is gone)."""


def listing(record: Mapping[str, Any]) -> dict[str, Any]:
    """One stored slide as `conchdb slides` shows it: status, tiles, where its file is and
    whether it is still there, its pixel size and where that came from, and its labels."""
    return {
        "slide_id": record.get("slide_id"),
        "cohort": record.get("cohort"),
        "tiling": record.get("tiling"),
        "status": record.get("status"),
        "tiles": record.get("tiles"),
        "path": record.get("path"),
        "file": file_state(record),
        "mpp": record.get("mpp"),
        "mpp_source": record.get("mpp_source"),
        "labels": labels_of(record),
        "updated_at": record.get("updated_at"),
    }


def select(catalog: SlideCatalog, *, flt: Filter | None = None, status: str | None = None,
           slide_ids: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The records that a filter over record fields, a status (`missing`: the file is gone)
    and slide ids all allow; a slide id that none of the records so chosen has is an error
    that suggests close ones."""
    if status is not None and status not in STATUS_CHOICES:
        raise QueryError(f"unknown status '{status}'", fix=f"one of {', '.join(STATUS_CHOICES)}", parameter="status")
    records = catalog.records(flt)
    if status == "missing":
        records = [r for r in records if file_state(r) == "missing"]
    elif status is not None:
        records = [r for r in records if r.get("status") == status]
    if not slide_ids:
        return records
    known = sorted({str(r.get("slide_id")) for r in records})
    unknown = [s for s in slide_ids if s not in known]
    if unknown:
        import difflib

        close = sorted({m for s in unknown for m in difflib.get_close_matches(s, known, n=2)})
        which = f"{status} " if status else "stored "
        raise QueryError(
            f"no {which}slide {', '.join(repr(s) for s in unknown)} in collection '{catalog.collection}'",
            fix=f"did you mean {', '.join(close)}?" if close else "see the stored slides with `conchdb slides`",
            parameter="slide_ids",
        )
    wanted = set(slide_ids)
    return [r for r in records if r.get("slide_id") in wanted]
