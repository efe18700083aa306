"""End-to-end search latency: query embedding plus store search, as `conchdb search` runs it.

    python benchmarks/search.py [--n 200000] [--queries 100] [--tokenizer FILE] [--device cpu] [--json]

Builds an embedded store of N tiles with clustered 512-d unit vectors and slide-like
payloads (2,000 tiles per slide, each slide drawing on 60 of 500 tissue "patterns", sites
cycling over the slides), then times four kinds of query through `Searcher`, each over `--queries` different
queries: text -> tiles and image -> tiles, plain and with a `--where site=lung` filter
that keeps about 20% of the tiles. A query's time is split into encoding (tokenize or
preprocess, and the model) and searching (the store), so the share of each is visible.

The model is CONCH's full-size architecture (ViT-B/16 at 448 px and the 12-layer text
tower) with random weights: latency does not depend on the values, and the real weights
are gated. The vectors in the store are synthetic, so the hits are meaningless; only the
times are measured. One untimed warm-up query of each kind runs first. The built-in
vocabulary is embedded once (timed and reported on stderr) and then reused.

Progress goes to stderr; stdout gets a table, or with --json one JSON object:
{"n_tiles", "text": {"p50_ms", "p99_ms", "encode_share"}, "text_filtered": {...}, "image": {...},
"image_filtered": {...}}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conchdb.catalog import TILE_FIELDS, TILES_COLLECTION
from conchdb.model.conch import ConchModel
from conchdb.model.config import ConchConfig
from conchdb.model.encoder import Encoder
from conchdb.model.tokenizer import ConchTokenizer
from conchdb.search import Searcher
from conchdb.search.vocabulary import all_terms
from conchdb.store import CollectionSpec, Point, stable_id
from conchdb.store.edge import EdgeStore

DIM = 512
COLLECTION = TILES_COLLECTION
SITES = ("lung", "breast", "colon", "skin", "kidney")
SCHEMA = {**{k: TILE_FIELDS[k] for k in ("slide_id", "x", "y", "size", "tissue", "cohort")}, "site": "keyword"}
"""The tile fields the benchmark's points carry, and a manifest column `site`."""
TILES_PER_SLIDE = 2000
PATTERNS, PATTERNS_PER_SLIDE = 500, 60
BATCH = 2048
WHERE = ["site=lung"]


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def random_full_size_encoder(tokenizer: Path, device: str) -> Encoder:
    """CONCH's released architecture with random weights (matrices ~N(0, 0.02), norms at 1)."""
    torch.manual_seed(0)
    model = ConchModel(ConchConfig())
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.02)
    return Encoder.from_model(model, ConchTokenizer(tokenizer), device=device)


def clustered_vectors(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit vectors near pattern centres, grouped into slides; returns (vectors, slide index)."""
    centres = rng.standard_normal((PATTERNS, DIM)).astype(np.float32)
    slides = np.arange(n) // TILES_PER_SLIDE
    n_slides = int(slides[-1]) + 1
    palette = np.stack([rng.choice(PATTERNS, PATTERNS_PER_SLIDE, replace=False) for _ in range(n_slides)])
    which = palette[slides, rng.integers(0, PATTERNS_PER_SLIDE, n)]
    vectors = centres[which] + rng.standard_normal((n, DIM)).astype(np.float32) * 0.6
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors, slides


def build_store(folder: Path, n: int, encoder: Encoder) -> EdgeStore:
    """The embedded store with n synthetic tiles, indexed."""
    rng = np.random.default_rng(0)
    vectors, slides = clustered_vectors(rng, n)
    store = EdgeStore(folder)
    metadata = {**encoder.describe(), "tiling": {"target_mpp": 0.5, "tile_px": 512}, "payload_schema": SCHEMA}
    store.ensure_collection(CollectionSpec(COLLECTION, DIM, metadata, dict(SCHEMA)))  # type: ignore[arg-type]
    start = time.perf_counter()
    for lo in range(0, n, BATCH):
        points = []
        for i in range(lo, min(n, lo + BATCH)):
            s = int(slides[i])
            payload = {"slide_id": f"slide-{s:05d}", "site": SITES[s % len(SITES)], "x": int(i % 45) * 1024,
                       "y": int(i // 45 % 45) * 1024, "size": 1024, "tissue": 0.5, "cohort": "bench"}
            points.append(Point(stable_id("bench-tile", i), vectors[i], payload))
        store.upsert(COLLECTION, points)
    log(f"upserted {n} points in {time.perf_counter() - start:.1f} s")
    start = time.perf_counter()
    store.finish_bulk_load(COLLECTION)
    log(f"built the HNSW index in {time.perf_counter() - start:.1f} s")
    return store


def synthetic_tiles(n: int) -> list[Image.Image]:
    """n different 512-px RGB tiles (smooth colour fields with noise), as a user's query images."""
    rng = np.random.default_rng(1)
    grid = np.linspace(0, 1, 512, dtype=np.float32)
    out = []
    for _ in range(n):
        base = rng.uniform(60, 220, 3) + 60 * np.sin(grid[:, None, None] * rng.uniform(2, 20) + rng.uniform(0, 6))
        noise = rng.normal(0, 25, (512, 512, 3))
        out.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)))
    return out


def timed(queries: list, encode: Callable, search: Callable) -> dict[str, float]:
    """p50/p99 of encode+search over the queries, and the share of the total spent encoding."""
    encode(queries[0])  # warm-up, untimed
    totals, encodes = [], []
    for query in queries:
        t0 = time.perf_counter()
        vector = encode(query)
        t1 = time.perf_counter()
        search(vector)
        t2 = time.perf_counter()
        totals.append(t2 - t0)
        encodes.append(t1 - t0)
    total = np.array(totals) * 1e3
    log(f"  search alone: p50 {np.percentile(1e3 * (np.array(totals) - np.array(encodes)), 50):.1f} ms")
    return {
        "p50_ms": round(float(np.percentile(total, 50)), 2),
        "p99_ms": round(float(np.percentile(total, 99)), 2),
        "encode_share": round(float(sum(encodes) / sum(totals)), 4),
    }


def default_tokenizer() -> Path | None:
    if os.environ.get("CONCHDB_TOKENIZER"):
        return Path(os.environ["CONCHDB_TOKENIZER"])
    assets = os.environ.get("CONCHDB_TEST_ASSETS")
    return Path(assets) / "conch" / "tokenizer" / "conch_byte_level_bpe_uncased.json" if assets else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200_000, help="tiles in the store (default 200,000)")
    parser.add_argument("--queries", type=int, default=100, help="queries of each kind (default 100)")
    parser.add_argument("--tokenizer", type=Path, default=default_tokenizer(), help="CONCH tokenizer JSON")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.tokenizer is None or not args.tokenizer.is_file():
        parser.error("give --tokenizer, or set CONCHDB_TOKENIZER or CONCHDB_TEST_ASSETS")

    encoder = random_full_size_encoder(args.tokenizer, args.device)
    log(f"full-size CONCH, random weights, on {encoder.device}; threads: {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory(prefix="conchdb-bench-") as tmp:
        store = build_store(Path(tmp) / "store", args.n, encoder)
        searcher = Searcher(encoder, store, COLLECTION, cache_dir=Path(tmp) / "cache")
        start = time.perf_counter()
        searcher.vocabulary()
        first = time.perf_counter() - start
        start = time.perf_counter()
        searcher.vocabulary()
        log(f"vocabulary: embedded once in {first:.1f} s; asked again: {1e3 * (time.perf_counter() - start):.3f} ms")
        flt = searcher.parse_where(WHERE)
        share = store.count(COLLECTION, flt) / args.n
        log(f"filter {' '.join(WHERE)} keeps {share:.1%} of the tiles")
        terms = [t for t, _ in all_terms()]
        texts = [terms[i % len(terms)] for i in range(args.queries)]
        images = synthetic_tiles(args.queries)
        results = {"n_tiles": store.count(COLLECTION)}
        runs = [
            ("text", texts, searcher.text_vector, None),
            ("text_filtered", texts, searcher.text_vector, flt),
            ("image", images, searcher.image_vector, None),
            ("image_filtered", images, searcher.image_vector, flt),
        ]
        for name, queries, encode, where in runs:
            log(f"{name}: {len(queries)} queries")
            results[name] = timed(queries, encode, lambda v, f=where: searcher.search(v, args.top_k, f))
            log(f"{name}: {results[name]}")
        store.close()
    if args.json:
        print(json.dumps(results))
        return
    print(f"{results['n_tiles']:,} tiles; full-size CONCH with random weights on {args.device}; "
          f"{args.queries} queries each; filter {' '.join(WHERE)} ({share:.0%})")
    print(f"{'query':<16}{'p50 ms':>10}{'p99 ms':>10}{'encoding':>10}")
    for name in ("text", "text_filtered", "image", "image_filtered"):
        r = results[name]
        print(f"{name:<16}{r['p50_ms']:>10.1f}{r['p99_ms']:>10.1f}{r['encode_share']:>10.1%}")


if __name__ == "__main__":
    main()
