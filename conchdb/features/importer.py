"""Import TRIDENT or CLAM CONCH v1 feature files into a store, without reading an image.

The files hold CONCH's pre-projection image features; multiplied by the checkpoint's
`proj_contrast` and L2-normalized they are exactly the vectors `conchdb ingest` stores
(`Encoder.project`), so a cohort extracted on a GPU becomes searchable by text on a CPU.

Everything is written through the archive's `SlideWriter`: the same point ids,
tile payload (plus `source` and `magnification`), slide records, statuses, rerun skips
and stale-tile cleanup as ingest. What differs is where a tile's geometry comes from:

- the tiling is the file's: `tile_px` is its patch size, `size` its level-0 patch size,
  and the tiling key starts with the tool's name (`trident-0.5um-512px-s512`), so an
  imported grid never overwrites or deletes tiles that ingest cut from the same slide;
- with the slide file (found by name in the slides folder), its pixel size (or the
  manifest's `mpp`) gives the tiles' µm/px, and tile images, thumbnails and heatmaps work;
- without it, the tiles are stored with the level-0 patch size and the magnification the
  tool recorded, `mpp` and `target_mpp` unknown, no `path`, and the slide is reported as
  missing. Importing again with the slides replaces those points.

Pre-projection features are kept, when a folder is given, as one TRIDENT-layout file per
slide record (named in the record as `raw_features`), so `conchdb export --raw` can give
them back for MIL training; they do not go into the vector store, whose one vector per
point is the searchable projection.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from conchdb.archive import IngestSummary, Progress, RunFrame, SlideCatalog, SlideOutcome, SlideWriter, Tiling
from conchdb.catalog import IMPORT_RESERVED, SlideStatus, imported_tiles_layout, tiling_key
from conchdb.errors import SlideError
from conchdb.features.files import (
    TRIDENT_FOLDER,
    FeatureFile,
    FeatureFileError,
    find_feature_files,
    read_feature_file,
    write_trident,
)
from conchdb.ingest.cohort import Cohort, CohortSlide, content_identity, discover
from conchdb.ingest.manifest import Manifest, read_manifest
from conchdb.model.encoder import Encoder
from conchdb.slides.slide import open_slide
from conchdb.store import Condition, Filter, Point, Store

WRITE_BATCH = 1024
"""Points per upsert: projection is a matrix product, so the store write is the slow part."""


@dataclass
class ImportOptions:
    """How to import: the tool's layout, where the slides and CLAM's patch files are,
    where to keep the pre-projection features (None: not kept)."""

    fmt: str
    slides: Path | None = None
    patches: Path | None = None
    raw_dir: Path | None = None
    cohort_name: str | None = None
    force: bool = False


@dataclass
class ImportSummary(IngestSummary):
    """An ingest summary, plus the slides imported without their slide file."""

    source: str = ""
    without_slide: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        doc = super().to_dict()
        doc["source"] = self.source
        doc["feature_files"] = doc.pop("slides")
        doc["not_feature_files"] = doc.pop("not_slides")
        doc["slides_without_slide_file"] = self.without_slide
        return doc


@dataclass
class _Job:
    """One feature file joined to its slide (a `CohortSlide` of the slides folder, or one
    standing for the file alone when the slide is not there)."""

    file: Path
    name: str
    slide: CohortSlide
    joined: bool
    file_identity: str


def _stem(path: Path) -> str:
    return path.name[: -len(path.suffix)] if path.suffix else path.name


def _jobs(files: list[Path], slides: Cohort | None) -> list[_Job]:
    """Join every feature file to the slide of the same name (TRIDENT and CLAM name a
    slide's file by the slide's file name without its extension)."""
    by_name: dict[str, list[CohortSlide]] = {}
    for slide in slides.slides if slides else ():
        by_name.setdefault(_stem(slide.path), []).append(slide)
    jobs = []
    for file in files:
        name = _stem(file)
        identity = content_identity(file)
        found = by_name.get(name, [])
        if len(found) == 1:
            jobs.append(_Job(file, name, found[0], True, identity))
        else:
            jobs.append(_Job(file, name, CohortSlide(name, file, identity, ()), False, identity))
    return jobs


def _cohort(root: Path, jobs: list[_Job]) -> Cohort:
    """The slides as a cohort for the manifest: joined ones answer to their files' names,
    the others to their name (the feature file's name without extension)."""
    return Cohort(root, tuple(sorted((j.slide for j in jobs), key=lambda s: s.id)), ())


@dataclass
class ImportPlan:
    """The feature files found, joined to their slides and manifest rows; made before the
    model loads, so that a wrong folder or a malformed manifest fails at once."""

    root: Path
    options: ImportOptions
    jobs: list[_Job]
    skipped: list[Path]
    manifest: Manifest
    cohort_name: str


def plan_import(root: str | Path, options: ImportOptions, manifest: str | Path | None = None) -> ImportPlan:
    """Find the feature files under `root`, join them to the slides folder and the manifest.

    Raises `FeatureFileError` when `root` holds no feature files of the format, and
    `ManifestError` for a malformed manifest."""
    root = Path(root).expanduser().resolve()
    files, skipped = find_feature_files(root, options.fmt)
    if not files:
        layout = f"{TRIDENT_FOLDER}/*.h5" if options.fmt == "trident" else "h5_files/*.h5 or pt_files/*.pt"
        raise FeatureFileError(
            f"{root}: no {options.fmt} feature files ({layout})",
            fix="give the folder the tool wrote its features to, and the matching format",
            parameter="path",
        )
    slides = discover(options.slides) if options.slides is not None else None
    jobs = _jobs(files, slides)
    cohort_root = slides.root if slides is not None else root
    # As ingest: the given manifest, else `manifest.csv` in the slides (or features) folder.
    table = read_manifest(manifest, _cohort(cohort_root, jobs))
    return ImportPlan(root, options, jobs, skipped, table, options.cohort_name or cohort_root.name)


class FeatureImport:
    """One import run of planned feature files into one store collection."""

    def __init__(
        self, plan: ImportPlan, encoder: Encoder, store: Store, collection: str, progress: Progress | None = None
    ):
        self.plan, self.options, self.jobs, self.manifest = plan, plan.options, plan.jobs, plan.manifest
        self.encoder, self.store, self.collection = encoder, store, collection
        self.progress = progress or Progress()
        self.cohort_name = plan.cohort_name
        self.writer = SlideWriter(store, collection, encoder, self.manifest, self.cohort_name)
        self._prepared = False
        self.relabelled: list[str] = []  # done slides whose manifest values changed, updated in place

    # -- per slide -----------------------------------------------------------------------

    def _prepare(self, tiling: Tiling) -> None:
        """Create or check the collections when the first slide is written; the collection
        records the first slide's tiling as its resolution (region queries use it)."""
        if self._prepared:
            return
        metadata: dict[str, Any] = {"cohort": self.cohort_name, "source": self.options.fmt}
        if tiling.target_mpp is not None:
            metadata["tiling"] = {"target_mpp": tiling.target_mpp, "tile_px": tiling.tile_px}
        self.writer.prepare(metadata, imported_tiles_layout(self.manifest.columns), reserved=IMPORT_RESERVED)
        self._prepared = True

    def _slide_info(self, job: _Job, features: FeatureFile) -> dict[str, Any]:
        """Pixel size and dimensions from the slide file, checked against the coordinates."""
        if not job.joined:
            return {"mpp": None, "mpp_source": None}
        mpp = self.manifest.mpp_for(job.slide.id)
        with open_slide(job.slide.path, mpp, "manifest") as slide:
            width, height = slide.dimensions
            info: dict[str, Any] = {"mpp": slide.mpp, "mpp_source": slide.mpp_source, "width": width,
                                    "height": height}
            if features.patch_size_level0 is None and features.patch_level is not None:
                if features.patch_level >= slide.level_count:
                    raise FeatureFileError(
                        f"{features.path}: patch_level {features.patch_level}, but {job.slide.path} has "
                        f"{slide.level_count} level(s)",
                        fix="the feature file belongs to another slide; check the slides folder",
                    )
                factor = slide.level_downsamples[features.patch_level]
                features.patch_size_level0 = int(round(features.patch_px * factor))
        if len(features) and (features.coords[:, 0].max() >= width or features.coords[:, 1].max() >= height):
            raise FeatureFileError(
                f"{features.path}: coordinates reach ({features.coords[:, 0].max()}, {features.coords[:, 1].max()}), "
                f"outside {job.slide.path} ({width}×{height})",
                fix="the feature file belongs to another slide; check the slides folder",
            )
        return info

    def _tiling(self, features: FeatureFile, mpp: float | None) -> Tiling:
        """The file's tiling, labelled by the tool: at a µm/px when the slide's pixel size is
        known, else by the recorded magnification or level-0 patch size."""
        size = features.patch_size_level0
        assert size is not None
        source, px, stride = features.source, features.patch_px, features.stride_px
        if mpp:
            target = float(f"{mpp * size / px:.6g}")
            return Tiling(f"{source}-{tiling_key(target, px, stride)}", target, px)
        label = f"{features.magnification:g}x" if features.magnification else f"l0-{size}px"
        return Tiling(f"{source}-{label}-{px}px-s{stride}", None, px)

    def _raw_file(self, job: _Job, tiling: Tiling, features: FeatureFile, info: dict[str, Any]) -> str | None:
        """Keep the pre-projection features of this slide record (for `export --raw`)."""
        if self.options.raw_dir is None:
            return None
        folder = self.options.raw_dir / self.collection
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{self.writer.record_id(job.slide, tiling)}.h5"
        write_trident(path, features.features, features.coords, self._coords_attrs(features, info),
                      {"name": job.name, "embedding": "CONCH v1 pre-projection", "source_file": str(job.file)})
        return str(path)

    @staticmethod
    def _coords_attrs(features: FeatureFile, info: dict[str, Any]) -> dict[str, Any]:
        return {
            "patch_size": features.patch_px,
            "patch_size_level0": features.patch_size_level0,
            "level0_magnification": features.level0_magnification,
            "target_magnification": features.magnification,
            "overlap": features.overlap,
            "name": features.name,
            "level0_width": info.get("width"),
            "level0_height": info.get("height"),
        }

    def _import(self, job: _Job) -> SlideOutcome:
        start = time.perf_counter()
        outcome = SlideOutcome(job.slide.id, str(job.file), SlideStatus.FAILED)
        try:
            features = read_feature_file(job.file, self.options.fmt, self.encoder.dim, self.options.patches)
            info = self._slide_info(job, features)
        except (FeatureFileError, SlideError) as exc:
            outcome.error = exc.message if not exc.fix else f"{exc.message} (fix: {exc.fix})"
            return outcome
        if features.patch_size_level0 is None:
            outcome.error = (
                f"{job.file}: patches at level {features.patch_level} of a slide that is not in the slides "
                "folder, so their level-0 size is unknown (fix: give the slides folder)"
            )
            return outcome
        tiling = self._tiling(features, info.get("mpp"))
        self._prepare(tiling)
        slide = job.slide
        record = self.writer.record(slide, tiling)
        if not self.options.force and self.writer.is_done(slide, record, source_identity=job.file_identity):
            assert record is not None
            outcome.status, outcome.tiles = SlideStatus.SKIPPED, int(record.get("tiles", 0))
            if self.writer.relabel(slide, record):
                self.relabelled.append(slide.id)
            return outcome
        if job.joined:
            self._drop_unjoined(job)
        extra = {
            "source": features.source,
            "source_file": str(job.file),
            "source_identity": job.file_identity,
            "magnification": features.magnification,
            "level0_magnification": features.level0_magnification,
            "patch_size_level0": features.patch_size_level0,
            "overlap": features.overlap,
            "slide_missing": not job.joined,
            **info,
            **({} if job.joined else {"path": None}),
        }
        # The pipeline's steps: no tissue is finished at once, else in progress, tiles, done.
        finished = self.writer.begin(slide, tiling, len(features), **extra)
        if finished is None:
            if self.progress.on_slide:
                self.progress.on_slide(slide.id, len(features))
            mean = self._write_tiles(job, tiling, features, info)  # upserted synchronously: nothing to flush
            raw = self._raw_file(job, tiling, features, info)
            finished = self.writer.finish(slide, tiling, len(features), mean, raw_features=raw, **extra)
        outcome.status, outcome.tiles = finished.status, finished.tiles
        outcome.seconds = time.perf_counter() - start
        return outcome

    def _write_tiles(self, job: _Job, tiling: Tiling, features: FeatureFile, info: dict[str, Any]) -> np.ndarray:
        """Project, normalize and upsert the slide's tiles; returns their normalized mean."""
        size = features.patch_size_level0
        assert size is not None
        extra: dict[str, Any] = {"source": features.source, "magnification": features.magnification}
        if not job.joined:
            extra["path"] = None
        shared = self.writer.shared_payload(job.slide, tiling, size, info, **extra)
        total = np.zeros(self.encoder.dim, dtype=np.float64)
        for start in range(0, len(features), WRITE_BATCH):
            vectors = self.encoder.project(features.features[start : start + WRITE_BATCH])
            total += vectors.sum(axis=0)
            tiles = [{"x": int(x), "y": int(y)} for x, y in features.coords[start : start + WRITE_BATCH]]
            points: list[Point] = self.writer.tile_points(job.slide, tiling, size, tiles, vectors)
            self.store.upsert(self.collection, points, shared)
            if self.progress.on_batch:
                self.progress.on_batch(len(points))
        norm = np.linalg.norm(total)
        return (total / norm if norm > 0 else total).astype(np.float32)

    def _drop_unjoined(self, job: _Job) -> None:
        """A slide imported before from this file without its slide file (under the file's
        name, in whatever cohort) is replaced by the joined import: its tiles and record go."""
        flt = Filter((
            Condition("slide_id", "eq", job.name),
            Condition("source", "eq", self.options.fmt),
            Condition("source_file", "eq", str(job.file)),
        ))
        catalog = SlideCatalog(self.store, self.collection)
        for record in catalog.records(flt):
            catalog.remove(record)

    # -- the run -------------------------------------------------------------------------

    def run(self) -> ImportSummary:
        summary = ImportSummary(self.store.location, self.collection, source=self.options.fmt)
        summary.not_slides = len(self.plan.skipped)
        summary.note_manifest(self.manifest)
        summary.relabelled = self.relabelled
        frame = RunFrame(self.store, self.collection, summary, self.progress)
        with frame.running(len(self.jobs), writer=False):  # tiles are upserted as they are projected
            for job in self.jobs:
                outcome = self._import(job)
                if outcome.status != SlideStatus.FAILED and not job.joined:
                    summary.without_slide.append(job.slide.id)
                frame.emit(outcome)
        return frame.finish(index=self._prepared)


def import_features(
    root: str | Path,
    encoder: Encoder,
    store: Store,
    collection: str = "conch_tiles",
    options: ImportOptions | None = None,
    manifest: str | Path | None = None,
    progress: Progress | None = None,
) -> ImportSummary:
    """Import every feature file under `root` into `collection`; see the module docstring."""
    plan = plan_import(root, options or ImportOptions("trident"), manifest)
    return FeatureImport(plan, encoder, store, collection, progress).run()
