"""Embedded store speed and recall on slide-like data, beside exact search and qdrant-client's local mode.

    python benchmarks/store.py [--n 1000000] [--queries 200] [--json]

Makes N clustered 512-d unit vectors (tiles of ~2,000 per slide, each slide drawing on
100 of 1,000 tissue "patterns", so that a kind of tissue recurs across slides) with the
payload `conchdb ingest` writes (its fields, its payload indexes, a manifest column
`site`); writes them into the embedded store (qdrant-edge) through the conchdb store
interface as ingest does: per slide, in batches, the slide's fields shared by the batch;
builds the index; then measures query latency and recall@10 against exact numpy search, plain and
with a one-field filter that keeps about 20% of the points. qdrant-client's local mode,
the in-process option a user would otherwise pick, is measured on the first 20,000
points, since it searches by brute force in Python and would take hours at 1M.

Progress goes to stderr; stdout gets a table, or with --json one JSON object (and the
table goes to stderr).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from qdrant_client import QdrantClient

from conchdb.catalog import tiles_layout
from conchdb.store import CollectionSpec, Condition, Filter, Point, Store, StoreTuning, stable_id
from conchdb.store.edge import EdgeStore
from conchdb.store.server import ServerStore

DIM = 512
K = 10
SITES = ["lung", "breast", "colon", "skin", "kidney"]
PER_SLIDE = 2000
FILTER = Filter((Condition("site", "eq", "lung"),))
LOCAL_N = 20_000
# The --json keys, in the order.
KEYS = (
    "n",
    "upsert_per_s",
    "local_mode_upsert_per_s",
    "build_s",
    "p50_ms",
    "p99_ms",
    "filtered_p50_ms",
    "filtered_p99_ms",
    "recall_at_10",
    "filtered_recall_at_10",
    "exact_p50_ms",
    "local_mode_filtered_p50_ms",
    "rounds",
)
PATTERNS_PER_SLIDE = 100  # of 1,000: tissue kinds recur across slides, whatever the site


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


@dataclass
class Data:
    """Vectors and the columns their payloads are made from (dicts are made per batch, to save RAM)."""

    vectors: np.ndarray
    slide: np.ndarray
    site: np.ndarray
    x: np.ndarray
    y: np.ndarray
    tissue: np.ndarray

    def batches(self, n: int, size: int) -> Iterator[tuple[list[Point], dict]]:
        """The first n points as ingest hands them to the store: per slide, `size` at a time,
        each tile with its own x, y and tissue and the slide's fields shared by the batch."""
        start = 0
        while start < n:
            slide = int(self.slide[start])
            stop = min(n, start + size, (slide + 1) * PER_SLIDE if slide < self.slide[-1] else n)
            shared = {
                "slide_id": f"slide-{slide:05d}",
                "path": f"/data/cohort/slide-{slide:05d}.svs",
                "cohort": "bench",
                "size": 1024,
                "mpp": 0.2498,
                "mpp_source": "openslide",
                "target_mpp": 0.5,
                "tile_px": 512,
                "tiling": "0.5um-512px-s512",
                "ingest_run": "0b1c9e5e-3f6a-4d7e-9a51-6f1f3c2d8e77",
                "site": SITES[int(self.site[start])],
            }
            points = [
                Point(
                    stable_id("bench", i),
                    self.vectors[i],
                    {"x": int(self.x[i]), "y": int(self.y[i]), "tissue": float(self.tissue[i])},
                )
                for i in range(start, stop)
            ]
            yield points, shared
            start = stop


def _clustered(rng: np.random.Generator, centers: np.ndarray, which: np.ndarray, noise: float) -> np.ndarray:
    out = centers[which] + rng.standard_normal((len(which), DIM), dtype=np.float32) * (noise / np.sqrt(DIM))
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def make_data(n: int, n_queries: int, seed: int = 0) -> tuple[Data, np.ndarray]:
    """Clustered unit vectors: pairs of tiles from one pattern have cosine ~0.64, unrelated ones ~0."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((1000, DIM), dtype=np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    per_slide = PER_SLIDE
    n_slides = max(5, -(-n // per_slide))
    slide_patterns = rng.integers(0, len(centers), size=(n_slides, PATTERNS_PER_SLIDE))
    slide = np.minimum(np.arange(n) // per_slide, n_slides - 1)
    pattern = slide_patterns[slide, rng.integers(0, PATTERNS_PER_SLIDE, size=n)]
    vectors = np.empty((n, DIM), dtype=np.float32)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        vectors[start:stop] = _clustered(rng, centers, pattern[start:stop], noise=0.75)
    site = (rng.permutation(n_slides) % len(SITES))[slide]  # one site per slide, each on ~1/5 of them
    within = np.arange(n) % per_slide
    data = Data(
        vectors=vectors,
        slide=slide,
        site=site,
        x=(within % 50) * 1024,
        y=(within // 50) * 1024,
        tissue=np.round(rng.uniform(0.2, 1.0, size=n), 3),
    )
    # Queries are new tiles of patterns that occur in the data: searching for tissue that is there.
    queries = _clustered(rng, centers, pattern[rng.integers(0, n, size=n_queries)], noise=0.75)
    return data, queries


def exact_top(vectors: np.ndarray, queries: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """Indices of the exact top-K per query (cosine = dot on unit vectors), in chunks to bound memory."""
    pool = np.arange(len(vectors)) if mask is None else np.flatnonzero(mask)
    sub = vectors if mask is None else vectors[pool]
    out = np.empty((len(queries), K), dtype=np.int64)
    for start in range(0, len(queries), 32):
        scores = queries[start : start + 32] @ sub.T
        top = np.argpartition(-scores, K, axis=1)[:, :K]
        out[start : start + 32] = pool[top]
    return out


def upsert_rate(store: Store, name: str, data: Data, n: int, batch: int) -> float:
    """Points per second through `Store.upsert`, batch by batch as an ingest writes them.

    Only the `upsert` calls are timed: making the payload dicts is the caller's work.
    """
    spent, done = 0.0, 0
    for points, shared in data.batches(n, batch):
        started = time.perf_counter()
        store.upsert(name, points, shared)
        spent += time.perf_counter() - started
        if done // 100_000 != (done + len(points)) // 100_000:
            log(f"  {done + len(points):,} points, {(done + len(points)) / spent:,.0f}/s")
        done += len(points)
    return n / spent


def timed(fn: Callable[[np.ndarray], list], queries: np.ndarray) -> tuple[np.ndarray, list]:
    """Per-query latency in ms, after two warm-up calls, and the results."""
    for q in queries[:2]:
        fn(q)
    times, results = [], []
    for q in queries:
        t = time.perf_counter()
        results.append(fn(q))
        times.append((time.perf_counter() - t) * 1000)
    return np.array(times), results


def recall(results: list, truth: np.ndarray, ids: list[str]) -> float:
    return float(
        np.mean([len({h.id for h in r} & {ids[i] for i in t}) / K for r, t in zip(results, truth, strict=True)])
    )


def run(args: argparse.Namespace) -> dict:
    n = args.n
    log(f"making {n:,} clustered {DIM}-d vectors and {args.queries} queries")
    data, queries = make_data(n, args.queries)
    mask = data.site == SITES.index("lung")
    ids = [stable_id("bench", i) for i in range(n)]
    layout = tiles_layout({"site": "string"})  # as ingest lays out a cohort with a manifest column `site`
    spec = CollectionSpec("bench", DIM, {"model_fingerprint": "bench"}, **asdict(layout))
    result: dict = {"n": n}

    chosen = (("hnsw_m", args.m), ("hnsw_ef_construct", args.ef_construct), ("hnsw_ef", args.ef))
    options = {k: v for k, v in chosen if v}
    with tempfile.TemporaryDirectory(prefix="conchdb-bench-") as tmp:
        # One folder per size and index options, so a kept store is reused only with the options it was built with.
        folder = Path(args.keep or tmp) / "-".join([f"store-{n}", *(f"{k}{v}" for k, v in sorted(options.items()))])
        built = folder / "build.json"
        reused = built.is_file()
        if reused:  # --keep: this store was written and built by an earlier run with these options
            result.update(json.loads(built.read_text()))
            log(f"reusing the store built in {folder} (its write and build figures are that run's)")
        else:
            result.update(write_and_build(folder, spec, data, n, queries, args.batch, options))
            built.write_text(json.dumps({k: v for k, v in result.items() if k != "n"}))
        log("exact ground truth")
        truth, truth_f = exact_top(data.vectors, queries, None), exact_top(data.vectors, queries, mask)
        rounds = []
        for number in range(1, args.rounds + 1):
            # Each round opens the store as a new process would (conchdb serve, a search).
            log(f"embedded store: queries, round {number} of {args.rounds}")
            with EdgeStore(folder / "edge", tuning=StoreTuning(**options)) as edge:
                plain_ms, plain = timed(lambda q, e=edge: e.query("bench", q, k=K), queries)
                filt_ms, filt = timed(lambda q, e=edge: e.query("bench", q, k=K, flt=FILTER), queries)
            rounds.append({
                "p50_ms": float(np.percentile(plain_ms, 50)),
                "p99_ms": float(np.percentile(plain_ms, 99)),
                "filtered_p50_ms": float(np.percentile(filt_ms, 50)),
                "filtered_p99_ms": float(np.percentile(filt_ms, 99)),
                "recall_at_10": recall(plain, truth, ids),
                "filtered_recall_at_10": recall(filt, truth_f, ids),
            })
        # The figures of the table are the worst round's: a tail that shows in one round of three counts.
        result.update({key: max(r[key] for r in rounds) for key in rounds[0] if key.endswith("_ms")})
        result.update({key: min(r[key] for r in rounds) for key in rounds[0] if "recall" in key})
        result["rounds"] = rounds
        log(
            f"embedded store: p50 {result['p50_ms']:.2f} ms, filtered p50 {result['filtered_p50_ms']:.2f} ms, "
            f"recall@10 {result['recall_at_10']:.3f}, filtered {result['filtered_recall_at_10']:.3f}"
        )

        log("exact numpy search latency")
        exact_ms, _ = timed(lambda q: np.argpartition(-(data.vectors @ q), K)[:K], queries[:30])
        result["exact_p50_ms"] = float(np.percentile(exact_ms, 50))

    extra = {"selectivity": float(mask.mean()), "local_n": result.pop("local_n"), "queries": len(queries),
             "reused": reused,
             "batch": args.batch}
    return {"result": {key: result[key] for key in KEYS}, "extra": extra}


def write_and_build(folder: Path, spec: CollectionSpec, data: Data, n: int, queries: np.ndarray, batch: int,
                    options: dict) -> dict:
    """qdrant-client local mode's figures (the baseline), then the embedded store written and built in `folder`."""
    # The baseline goes first, on a disk that the embedded store's gigabytes have not
    # yet filled with writeback: local mode commits once per point, so its rate is the
    # disk's sync latency, and measuring it on a busy disk could flatter the ratio.
    local_n = min(n, LOCAL_N)
    log(f"qdrant-client local mode on {local_n:,} points (persisted in a folder, like the embedded store)")
    local_rate, local_ms = local_mode(folder / "local", spec, data, local_n, queries[:20], batch)
    log(f"local mode: {local_rate:,.0f} points/s")
    out = {"local_mode_upsert_per_s": local_rate, "local_mode_filtered_p50_ms": float(np.percentile(local_ms, 50)),
           "local_n": local_n}
    log("embedded store: upserting")
    with EdgeStore(folder / "edge", tuning=StoreTuning(**options)) as edge:
        edge.ensure_collection(spec)
        out["upsert_per_s"] = upsert_rate(edge, "bench", data, n, batch)
        log(f"embedded store: {out['upsert_per_s']:,.0f} points/s; building the index")
        started = time.perf_counter()
        edge.finish_bulk_load("bench")
        out["build_s"] = time.perf_counter() - started
    log(f"embedded store: index built in {out['build_s']:.1f} s")
    return out


def local_mode(
    path: Path, spec: CollectionSpec, data: Data, n: int, queries: np.ndarray, batch: int
) -> tuple[float, np.ndarray]:
    """qdrant-client local mode persisted in a folder (like the embedded store), through the same interface."""
    warnings.filterwarnings("ignore", message="(Payload indexes have no effect|Local mode performs exact)")
    client = QdrantClient(path=str(path))
    store = ServerStore(client=client)
    store.ensure_collection(spec)
    rate = upsert_rate(store, spec.name, data, n, batch)
    ms, _ = timed(lambda q: store.query(spec.name, q, k=K, flt=FILTER), queries)
    client.close()
    return rate, ms


def table(result: dict, extra: dict) -> str:
    r = result
    rows = [
        ("", "embedded (qdrant-edge)", f"local mode ({extra['local_n']:,} pts)", "exact numpy"),
        ("upsert points/s", f"{r['upsert_per_s']:,.0f}", f"{r['local_mode_upsert_per_s']:,.0f}", "-"),
        ("  ratio to local mode", f"{r['upsert_per_s'] / r['local_mode_upsert_per_s']:.1f}x", "1x", "-"),
        ("HNSW build s", f"{r['build_s']:.1f}", "- (no index)", "-"),
        ("query p50 / p99 ms", f"{r['p50_ms']:.2f} / {r['p99_ms']:.2f}", "-", f"{r['exact_p50_ms']:.1f} (p50)"),
        (
            "filtered p50 / p99 ms",
            f"{r['filtered_p50_ms']:.2f} / {r['filtered_p99_ms']:.2f}",
            f"{r['local_mode_filtered_p50_ms']:.1f} (p50)",
            "-",
        ),
        ("recall@10", f"{r['recall_at_10']:.4f}", "1 (exact)", "1"),
        ("filtered recall@10", f"{r['filtered_recall_at_10']:.4f}", "1 (exact)", "1"),
    ]
    rows += [
        (f"  round {i}: p99 / filtered p99 ms", f"{one['p99_ms']:.2f} / {one['filtered_p99_ms']:.2f}", "-", "-")
        for i, one in enumerate(r["rounds"], 1)
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = [
        f"conchdb store benchmark: {r['n']:,} x {DIM}-d unit vectors, upserts of {extra['batch']}, "
        f"{extra['queries']} queries, k={K}, filter site=lung keeps {extra['selectivity']:.1%}",
    ]
    if extra["reused"]:
        lines.append("(--keep: the upsert, build and local-mode figures are from the earlier run that built the store)")
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="number of points (default 1,000,000)")
    parser.add_argument("--queries", type=int, default=200, help="number of queries (default 200)")
    parser.add_argument("--batch", type=int, default=256, help="points per upsert (default 256)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--rounds", type=int, default=3,
                        help="query rounds, each on the store opened anew (default 3); each round's p99 is shown")
    parser.add_argument("--keep", default=None,
                        help="write and build the store in this folder, or reuse the one an earlier run built there")
    parser.add_argument("--m", type=int, default=None, help="HNSW m (default: the store's)")
    parser.add_argument("--ef-construct", type=int, default=None, help="HNSW ef_construct (default: the store's)")
    parser.add_argument("--ef", type=int, default=None, help="HNSW search ef (default: the store's)")
    args = parser.parse_args(argv)
    out = run(args)
    if args.json:  # stdout stays one JSON object; the table joins the progress on stderr
        print(table(out["result"], out["extra"]), file=sys.stderr)
        print(json.dumps(out["result"]))
    else:
        print(table(out["result"], out["extra"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
