"""Archive upkeep on the embedded store: relabelling a slide in place, beside writing its
points again (what re-ingesting it would cost in the store alone, before any embedding),
and copying a store.

    python benchmarks/archive.py [--tiles 20000] [--slides 5] [--json]

Writes `--slides` slides of `--tiles` tiles each (512-d unit vectors, the payload ingest
writes, a manifest's `diagnosis`), through the archive's SlideWriter as ingest does, and
builds the index. Then, for the first slide:
- relabel: a changed manifest value and a new column, through `SlideCatalog.relabel`
  (payload updates by filter; no vector read or written), timed to the last write;
- baseline: the same slide's points upserted again with their vectors (the store's share of
  re-ingesting it; the model's share, about a second a tile on this CPU, comes on top).
Then the whole store is copied to a new embedded store with `conchdb.store.copy` (points
per second, index build included), beside the rate at which the store was first written
(ingest's writes and index build, no model). Run it alone: figures next to other jobs mean little.
Progress goes to stderr; stdout gets a table, or with --json one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from conchdb.archive import SlideCatalog, SlideWriter, Tiling
from conchdb.catalog import SlideStatus
from conchdb.slides.grid import TilingParams
from conchdb.store import Condition, Filter, Point
from conchdb.store.copy import copy_store
from conchdb.store.edge import EdgeStore

DIM = 512
COLLECTION = "bench_tiles"
BATCH = 1024


class _Model:
    dim, fingerprint = DIM, "sha256:benchmark"

    def describe(self) -> dict:
        return {"model": "benchmark", "model_fingerprint": self.fingerprint, "embed_dim": DIM}


class _Manifest:
    """A manifest whose rows can be changed between steps."""

    def __init__(self, rows: dict[str, dict]):
        self.path: Path | None = Path("manifest.csv")
        self.rows = rows
        self.columns = {"diagnosis": "string", "site": "string"}

    def payload_for(self, slide_id: str) -> dict:
        return dict(self.rows.get(slide_id, {}))

    def labels_for(self, slide_id: str) -> dict | None:
        return self.payload_for(slide_id) if slide_id in self.rows else None


class _Slide:
    def __init__(self, n: int):
        self.id, self.path, self.identity = f"slide{n:03d}.svs", Path(f"/archive/slide{n:03d}.svs"), f"id-{n}"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def build(store: EdgeStore, slides: int, tiles: int, rng: np.random.Generator) -> tuple[SlideWriter, list]:
    manifest = _Manifest({_Slide(s).id: {"diagnosis": "benign"} for s in range(slides)})
    writer = SlideWriter(store, COLLECTION, _Model(), manifest, "bench")
    writer.prepare({"tiling": TilingParams().to_dict()})
    tiling = Tiling.of(TilingParams())
    side = int(np.ceil(np.sqrt(tiles)))
    for s in range(slides):
        slide = _Slide(s)
        writer.begin(slide, tiling, tiles)
        vectors = rng.normal(size=(tiles, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        shared = writer.shared_payload(slide, tiling, 1024, {"mpp": 0.25, "mpp_source": "file"})
        for start in range(0, tiles, BATCH):
            own = [{"x": 1024 * (i % side), "y": 1024 * (i // side), "tissue": 0.9}
                   for i in range(start, min(tiles, start + BATCH))]
            store.upsert(COLLECTION, writer.tile_points(slide, tiling, 1024, own, vectors[start:start + BATCH]), shared)
        writer.write_record(slide, tiling, SlideStatus.DONE, vector=vectors.mean(axis=0), tiles=tiles)
        log(f"slide {s + 1}/{slides} written")
    store.finish_bulk_load(COLLECTION)
    return writer, [_Slide(s) for s in range(slides)]


def run(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="conchdb-bench-archive-") as tmp:
        store = EdgeStore(Path(tmp) / "store")
        start = time.perf_counter()
        writer, slides = build(store, args.slides, args.tiles, rng)
        build_s = time.perf_counter() - start  # the copy's baseline: the same points written as ingest writes them
        catalog = SlideCatalog(store, COLLECTION)
        record = catalog.records(Filter((Condition("slide_id", "eq", slides[0].id),)))[0]
        start = time.perf_counter()
        changed = catalog.relabel(record, {"diagnosis": "malignant", "site": "breast"})
        relabel_s = time.perf_counter() - start
        assert changed and store.count(COLLECTION, Filter((Condition("diagnosis", "eq", "malignant"),))) == args.tiles
        # Baseline: the store's part of ingesting the slide again, its points written with vectors.
        tiles = catalog.tiles(record, with_vectors=True)
        start = time.perf_counter()
        for first in range(0, len(tiles), BATCH):
            batch = tiles[first:first + BATCH]
            store.upsert(COLLECTION, [Point(t.id, t.vector, t.payload) for t in batch])
        rewrite_s = time.perf_counter() - start
        total = store.count(COLLECTION) + store.count(catalog.records_collection)
        target = EdgeStore(Path(tmp) / "copy")
        start = time.perf_counter()
        copy_store(store, target)
        copy_s = time.perf_counter() - start
        target.close()
        store.close()
    return {
        "tiles_per_slide": args.tiles,
        "slides": args.slides,
        "relabel_s": round(relabel_s, 3),
        "rewrite_points_s": round(rewrite_s, 3),
        "relabel_speedup": round(rewrite_s / relabel_s, 1) if relabel_s > 0 else None,
        "copy_points": total,
        "copy_s": round(copy_s, 3),
        "copy_points_per_s": round(total / copy_s, 1) if copy_s > 0 else None,
        "build_s": round(build_s, 3),
        "build_points_per_s": round(total / build_s, 1) if build_s > 0 else None,
    }


def table(result: dict) -> str:
    n = result["tiles_per_slide"]
    rows = [
        ("relabel one slide (payload update by filter)", f"{result['relabel_s']:.3f} s", f"{n} tiles"),
        ("baseline: write its points again (store only)", f"{result['rewrite_points_s']:.3f} s",
         f"{result['relabel_speedup']}x the relabel"),
        ("copy the store, embedded -> embedded", f"{result['copy_s']:.1f} s",
         f"{result['copy_points']} points, {result['copy_points_per_s']:.0f} points/s"),
        ("baseline: write the store as ingest does", f"{result['build_s']:.1f} s",
         f"{result['build_points_per_s']:.0f} points/s (index built)"),
    ]
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b:>9}  {c}" for a, b, c in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiles", type=int, default=20_000, help="tiles per slide (default 20,000)")
    parser.add_argument("--slides", type=int, default=5, help="slides in the store (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = parser.parse_args(argv)
    if args.tiles < 1 or args.slides < 1:
        parser.error("--tiles and --slides must be at least 1")
    result = run(args)
    print(json.dumps(result) if args.json else table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
