"""Slide search and retrieval evaluation speed on a synthetic archive, beside exact numpy.

    python benchmarks/slide_search.py [--slides 500] [--tiles 400] [--queries 50] [--keep DIR] [--warm] [--json]

Makes SLIDES x TILES unit 512-d vectors with class structure: each slide belongs to one of
`--classes` diagnoses and one patient (two slides a patient), and its tiles mix the
class's direction, the slide's own, and one of the slide's 20 "tissue patterns" drawn
from 300 shared by every class, plus noise. They are written into the embedded store as
ingest writes them (the slide's fields shared by each batch, the mosaic marked per slide,
and a done slide record holding the slide's mean tile vector), and the index is built.
Then, for `--queries` stored slides, a 32-tile mosaic query (k-means over the slide's
tiles, as ingest chooses mosaics, with k = 32) is ranked against every
other slide twice: by `rank_slides` (batched store queries) and by exact numpy over all
tile vectors in memory; the table gives both latencies (p50/p99), the overlap of their
top 5, and the store searches a query took on average (`searches`: set by `--candidates`,
not by the archive's size). Last, `evaluate_retrieval` runs leave-one-patient-out over
all slides.

Building the store takes most of a run (minutes at 1M points on 2 cores): with `--keep DIR`
the store is built in DIR once and reused by every later run with the same archive
(`--slides`, `--tiles`, `--classes` and payload indexes; the vectors are drawn again from
the same seed), so `write_s` and `build_s` are then 0.

Each query's candidates are read from the store when it is timed, and at 1M tiles most of
them for the first time in the run (200k tiles has five times fewer slides to spread the
queries over); a query's first run cost the engine 2-3x its second in our runs. `--warm`
answers every query once before the timed loops, as in a store that has been searched a
while (nothing is cached but what the engine and the kernel keep), to show the cost of
the searches alone.

Progress goes to stderr; stdout gets a table, or with --json one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from conchdb.archive.marks import mark_slide
from conchdb.archive.mosaic import kmeans
from conchdb.catalog import TILE_FIELDS, TILE_INDEXED, TILE_LOAD_INDEXED, slides_collection, slides_layout
from conchdb.search.evaluation import evaluate_retrieval
from conchdb.search.slide_search import CANDIDATES, QueryTile, SlideQuery, rank_slides
from conchdb.store import CollectionSpec, Point, stable_id
from conchdb.store.edge import EdgeStore

DIM = 512
COLLECTION = "bench_tiles"
MOSAIC_K = 32
PATTERNS, PATTERNS_PER_SLIDE = 300, 20
TOP = 5
ARCHIVE_FILE = "archive.json"
INDEXED = (*TILE_INDEXED, "diagnosis", "patient_id")
KEYS = (
    "slides", "tiles", "points", "candidates", "write_s", "build_s", "queries", "warm", "searches", "p50_ms", "p99_ms",
    "exact_p50_ms", "exact_p99_ms", "top5_overlap", "evaluate_s", "evaluate_top1", "evaluate_mmv5",
)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


def make_archive(slides: int, tiles: int, classes: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(slides, tiles, DIM) vectors and each slide's class."""
    rng = np.random.default_rng(seed)
    class_dirs = unit(rng.normal(size=(classes, DIM)))
    patterns = unit(rng.normal(size=(PATTERNS, DIM)))
    labels = np.arange(slides) % classes
    out = np.empty((slides, tiles, DIM), dtype=np.float32)
    for s in range(slides):
        own = unit(rng.normal(size=DIM))
        kinds = rng.choice(PATTERNS, size=PATTERNS_PER_SLIDE, replace=False)
        which = kinds[rng.integers(PATTERNS_PER_SLIDE, size=tiles)]
        noise = rng.normal(size=(tiles, DIM)) / np.sqrt(DIM)
        out[s] = unit(0.5 * class_dirs[labels[s]] + 0.3 * own + 0.7 * patterns[which] + 0.5 * noise)
    return out, labels


def slide_ids(slides: int, tiles: int) -> list[list[str]]:
    """Each slide's point ids, as `fill` writes them."""
    return [slide_ids_of(f"slide-{s:04d}", tiles) for s in range(slides)]


def slide_ids_of(slide_id: str, tiles: int) -> list[str]:
    return [stable_id("bench", slide_id, t) for t in range(tiles)]


def kept_archive(folder: Path, archive: dict) -> bool:
    """Whether `folder` (`--keep`) holds a finished store of this archive; False for a new or
    empty folder, where it is built. Any other folder is refused rather than overwritten."""
    marker = folder / ARCHIVE_FILE
    if marker.is_file() and json.loads(marker.read_text()) == archive:
        return True
    if folder.is_dir() and any(folder.iterdir()):
        held = marker.read_text().strip() if marker.is_file() else "no finished archive"
        sys.exit(f"--keep {folder} holds {held}, not {json.dumps(archive)}: delete the folder or give another one")
    folder.mkdir(parents=True, exist_ok=True)
    return False


def fill(store: EdgeStore, vectors: np.ndarray, labels: np.ndarray) -> None:
    """The archive written as ingest writes it (point ids as `slide_ids` gives them)."""
    fields = {**TILE_FIELDS, "diagnosis": "keyword", "patient_id": "keyword"}
    store.ensure_collection(CollectionSpec(
        COLLECTION, DIM, {"model_fingerprint": "bench"}, fields,
        graph_fields=("slide_id", "cohort", "diagnosis", "patient_id"),
        indexed=INDEXED, load_indexed=TILE_LOAD_INDEXED,
    ))
    records = slides_collection(COLLECTION)
    layout = slides_layout({"diagnosis": "string", "patient_id": "string"})
    store.ensure_collection(CollectionSpec(records, DIM, {"model_fingerprint": "bench"}, **asdict(layout)))
    side = int(np.ceil(np.sqrt(vectors.shape[1])))
    for s in range(vectors.shape[0]):
        slide_id = f"slide-{s:04d}"
        shared = {
            "slide_id": slide_id, "path": f"/archive/{slide_id}.svs", "cohort": "bench", "size": 1024,
            "mpp": 0.25, "mpp_source": "openslide", "target_mpp": 0.5, "tile_px": 512, "tiling": "0.5um-512px-s512",
            "ingest_run": "bench", "diagnosis": f"class-{labels[s]}", "patient_id": f"patient-{s // 2:04d}",
        }
        ids = slide_ids_of(slide_id, vectors.shape[1])
        own = [{"x": 1024 * (t % side), "y": 1024 * (t // side), "tissue": 0.9} for t in range(vectors.shape[1])]
        for start in range(0, len(ids), 64):
            points = [Point(i, v, p) for i, v, p in zip(ids[start:start + 64], vectors[s, start:start + 64],
                                                         own[start:start + 64], strict=True)]
            store.upsert(COLLECTION, points, shared)
        mark_slide(store, COLLECTION, ids, vectors[s])
        mean = vectors[s].mean(axis=0)
        record = {**shared, "status": "done", "tiles": vectors.shape[1], "identity": slide_id}
        store.upsert(records, [Point(stable_id("slide", "bench", slide_id, shared["tiling"]), unit(mean), record)])


def exact_ranking(flat: np.ndarray, slides: int, query: np.ndarray, exclude: int, k: int) -> list[str]:
    """Median over query tiles of the best cosine per slide, over every tile in memory."""
    best = (flat @ query.T).reshape(slides, -1, len(query)).max(axis=1)
    score = np.median(best, axis=1)
    score[exclude] = -np.inf
    order = np.lexsort((np.arange(slides), -score))[:k]
    return [f"slide-{s:04d}" for s in order]


def timed(run, queries: list[SlideQuery]) -> tuple[list[float], list]:
    """Seconds per query (the first, which warms caches, left out) and the answers."""
    seconds, answers = [], []
    for n, query in enumerate(queries):
        t = time.perf_counter()
        answers.append(run(query))
        if n > 0:
            seconds.append(time.perf_counter() - t)
    return seconds, answers


def count_searches(store: EdgeStore) -> list[int]:
    """Counts the searches of every later `query_batch` of `store` (one-hit pair searches and
    the candidates' one), into the list returned: what a query costs, whatever the machine."""
    counts: list[int] = []
    plain = store.query_batch

    def counting(name, vectors, **kwargs):
        found = plain(name, vectors, **kwargs)
        counts.append(len(found))
        return found

    store.query_batch = counting  # type: ignore[method-assign]
    return counts


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values) * 1000, q))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slides", type=int, default=500)
    parser.add_argument("--tiles", type=int, default=400)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--candidates", type=int, default=CANDIDATES, help="slides scored exactly per query")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="build the store in DIR once and reuse it in later runs with the same archive")
    parser.add_argument("--warm", action="store_true",
                        help="answer every query once, untimed, before timing them: a store that has been searched")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    archive = {"slides": args.slides, "tiles": args.tiles, "classes": args.classes, "dim": DIM,
               "indexed": sorted(INDEXED)}  # a store kept from before an index change is not reused
    reuse = kept_archive(args.keep, archive) if args.keep else False
    vectors, labels = make_archive(args.slides, args.tiles, args.classes)
    flat = vectors.reshape(-1, DIM)
    doc: dict = {"slides": args.slides, "tiles": args.tiles, "points": int(flat.shape[0]),
                 "candidates": args.candidates, "write_s": 0.0, "build_s": 0.0}
    with contextlib.ExitStack() as stack:
        folder = args.keep or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="conchdb-slide-bench-")))
        store = stack.enter_context(EdgeStore(folder / "store"))
        if reuse:
            log(f"reusing the store in {folder}")
        else:
            log(f"writing {flat.shape[0]} points")
            t = time.perf_counter()
            fill(store, vectors, labels)
            doc["write_s"] = round(time.perf_counter() - t, 2)
            log("building the index")
            t = time.perf_counter()
            store.finish_bulk_load(COLLECTION)
            doc["build_s"] = round(time.perf_counter() - t, 2)
            # The build leaves hundreds of MB for the kernel to write back; queries timed while it
            # does would measure the disk. (An archive is searched long after it was written.)
            os.sync()
            (folder / ARCHIVE_FILE).write_text(json.dumps(archive))  # last: a cut build is not reused
        ids = slide_ids(args.slides, args.tiles)
        picks = np.linspace(0, args.slides - 1, min(args.queries, args.slides)).astype(int)
        queries = []
        for s in picks:
            centres, _ = kmeans(vectors[s], min(MOSAIC_K, args.tiles))
            chosen = sorted(set(np.argmin(((vectors[s][:, None, :] - centres[None]) ** 2).sum(-1), axis=0)))
            queries.append(SlideQuery([QueryTile(vectors[s, i], id=ids[s][i]) for i in chosen], f"slide-{s:04d}",
                                      f"slide-{s:04d}"))
        # Each method in a loop of its own: numpy's threads stay busy a moment after a product,
        # which would slow whichever store query came next.
        if args.warm:
            for query in queries:
                rank_slides(store, COLLECTION, query, k=TOP, candidates=args.candidates)
        searches = count_searches(store)
        ours, found = timed(lambda q: rank_slides(store, COLLECTION, q, k=TOP, candidates=args.candidates), queries)
        del store.query_batch  # counted no more
        exact, truth = timed(lambda q: exact_ranking(flat, args.slides, q.vectors, int(q.source[-4:]), TOP), queries)
        overlap = [len({m.slide_id for m in f} & set(t)) / TOP for f, t in zip(found, truth, strict=True)]
        doc.update(queries=len(picks), warm=args.warm, searches=round(sum(searches) / len(picks)),
                   p50_ms=round(percentile(ours, 50), 1), p99_ms=round(percentile(ours, 99), 1),
                   exact_p50_ms=round(percentile(exact, 50), 1), exact_p99_ms=round(percentile(exact, 99), 1),
                   top5_overlap=round(float(np.mean(overlap)), 4))
        log(f"slide search p50/p99 {doc['p50_ms']}/{doc['p99_ms']} ms, exact numpy {doc['exact_p50_ms']}/"
            f"{doc['exact_p99_ms']} ms, top-5 overlap {doc['top5_overlap']}; evaluating retrieval over "
            f"{args.slides} slides")
        t = time.perf_counter()
        report = evaluate_retrieval(store, COLLECTION, label="diagnosis", group="patient_id",
                                    candidates=args.candidates)
        doc["evaluate_s"] = round(time.perf_counter() - t, 2)
        doc["evaluate_top1"] = round(report.top1, 4)
        doc["evaluate_mmv5"] = round(report.mmv5, 4)
    rows = [(key, doc[key]) for key in KEYS]
    table = "\n".join(f"{key:<16} {value}" for key, value in rows)
    if args.json:
        print(table, file=sys.stderr)
        print(json.dumps({key: doc[key] for key in KEYS}))
    else:
        print(table)


if __name__ == "__main__":
    main()
