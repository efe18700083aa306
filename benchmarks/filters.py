"""Filtered search on correlated data: every filter shape's recall@10 and latency, beside exact numpy.

    python benchmarks/filters.py [--slides 500] [--tiles 400] [--queries 100] [--keep DIR] [--json]

Makes an archive whose fields go together as in a real one: each slide has a site, a
diagnosis that depends on the site, a stain, a patient (two slides a patient) and the
patient's age; each tile is one of 24 tissue kinds, drawn with odds that depend on the
diagnosis. A tile's vector mixes its diagnosis's direction, its kind's, its slide's and
noise, so every slide-level field and the kind are correlated with the vectors. Its
`tissue` share depends on the kind (fat and background tiles hold little) and the vector
carries it too, while `x` and `y` are independent of the vector. Tiles are written as
ingest writes them (the slide's fields shared by each batch, the layout of a cohort with
a manifest), a few mosaic tiles a slide are marked, and a small share of tumour tiles get
an `annotation`; then the index is built.

Queries are new tiles of the archive's kinds and diagnoses. Each filter shape (tile field,
slide field, manifest column, range, `!=`, any-of, none-of, and their combinations, keeping
0.01 % to 100 % of the tiles) is asked of the store and of exact numpy search over the
same vectors with the same mask; the table gives the fraction kept, recall@10 against
numpy, and both latencies. `--keep DIR` keeps the built store (and its data) in DIR, and
a later run with the same options reuses it.

Progress goes to stderr; stdout gets a table, or with --json one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from conchdb.catalog import tiles_layout
from conchdb.store import CollectionSpec, Condition, Filter, Point, Store, stable_id
from conchdb.store.edge import EdgeStore

DIM = 512
K = 10
COLLECTION = "bench_filters"
SITES = ("breast", "lung", "colon", "prostate", "skin", "kidney", "liver", "thyroid")
SITE_ODDS = (0.25, 0.2, 0.15, 0.12, 0.1, 0.08, 0.06, 0.04)
DIAGNOSES_PER_SITE = 3
STAINS = ("HE", "IHC")
KINDS = 24
FAT_KIND = 0  # little tissue
COLUMNS = {"site": "string", "diagnosis": "string", "stain": "string", "patient": "string", "age": "int"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=-1, keepdims=True)).astype(np.float32)


@dataclass
class Archive:
    """Vectors and the columns their payloads are made of; slide-level columns are per slide."""

    vectors: np.ndarray
    slide: np.ndarray  # per tile
    kind: np.ndarray
    tissue: np.ndarray
    x: np.ndarray
    y: np.ndarray
    mosaic: np.ndarray
    annotated: np.ndarray
    site: np.ndarray  # per slide
    diagnosis: np.ndarray
    stain: np.ndarray
    patient: np.ndarray
    age: np.ndarray

    def columns(self) -> dict[str, np.ndarray]:
        """Every field as one value per tile (slide-level ones repeated), as numpy masks need."""
        s = self.slide
        return {
            "slide_id": np.array([f"slide-{i:05d}" for i in range(len(self.site))])[s],
            "site": np.array(SITES)[self.site][s],
            "diagnosis": self.diagnosis.astype(str)[s],
            "stain": np.array(STAINS)[self.stain][s],
            "patient": self.patient.astype(str)[s],
            "age": self.age[s],
            "tissue": self.tissue,
            "x": self.x,
            "y": self.y,
            "mosaic": self.mosaic,
            "annotation": np.where(self.annotated, "tumor", ""),
        }

    def batches(self, size: int) -> Iterator[tuple[list[Point], dict]]:
        """Points per slide, `size` at a time, the slide's fields shared by the batch."""
        starts = np.flatnonzero(np.r_[True, self.slide[1:] != self.slide[:-1]])
        ends = np.r_[starts[1:], len(self.slide)]
        for slide, (lo, hi) in enumerate(zip(starts, ends, strict=True)):
            shared = {
                "slide_id": f"slide-{slide:05d}",
                "path": f"/archive/slide-{slide:05d}.svs",
                "cohort": "bench",
                "size": 1024,
                "mpp": 0.25,
                "mpp_source": "openslide",
                "target_mpp": 0.5,
                "tile_px": 512,
                "tiling": "0.5um-512px-s512",
                "ingest_run": "run-1",
                "site": SITES[self.site[slide]],
                "diagnosis": str(self.diagnosis[slide]),
                "stain": STAINS[self.stain[slide]],
                "patient": str(self.patient[slide]),
                "age": int(self.age[slide]),
            }
            for start in range(lo, hi, size):
                points = []
                for i in range(start, min(hi, start + size)):
                    payload = {"x": int(self.x[i]), "y": int(self.y[i]), "tissue": float(self.tissue[i])}
                    if self.mosaic[i]:
                        payload["mosaic"] = True
                    if self.annotated[i]:
                        payload["annotation"] = "tumor"
                    points.append(Point(stable_id("bench", i), self.vectors[i], payload))
                yield points, shared


def make_archive(slides: int, tiles: int, queries: int, seed: int = 0) -> tuple[Archive, np.ndarray]:
    """The archive (module docstring) and `queries` new tiles drawn the same way."""
    rng = np.random.default_rng(seed)
    n_diag = len(SITES) * DIAGNOSES_PER_SITE
    site = rng.choice(len(SITES), size=slides, p=SITE_ODDS)
    diagnosis = site * DIAGNOSES_PER_SITE + rng.integers(0, DIAGNOSES_PER_SITE, size=slides)
    stain = (rng.random(slides) < 0.1).astype(int)
    patient = np.arange(slides) // 2
    age = rng.integers(25, 95, size=slides // 2 + 1)[patient]
    # Kind odds per diagnosis: a few kinds dominate each diagnosis; fat appears everywhere.
    odds = rng.dirichlet(np.full(KINDS, 0.3), size=n_diag) + 0.01
    odds[:, FAT_KIND] += 0.15
    odds /= odds.sum(axis=1, keepdims=True)
    kind_dirs = unit(rng.standard_normal((KINDS, DIM)))
    diag_dirs = unit(rng.standard_normal((n_diag, DIM)))
    tissue_dir = unit(rng.standard_normal(DIM))

    def draw(slide_of: np.ndarray, kinds: np.ndarray, slide_dirs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        base_tissue = np.where(kinds == FAT_KIND, 0.3, 0.7 + 0.08 * (kinds % 3))
        tissue = np.clip(base_tissue + rng.normal(0, 0.06, size=len(kinds)), 0.05, 1.0).round(3)
        noise = rng.standard_normal((len(kinds), DIM), dtype=np.float32)
        vectors = np.empty((len(kinds), DIM), dtype=np.float32)
        for lo in range(0, len(kinds), 50_000):
            sl = slice(lo, lo + 50_000)
            d = diagnosis[slide_of[sl]]
            mix = (
                0.9 * diag_dirs[d] + 1.0 * kind_dirs[kinds[sl]] + 0.5 * slide_dirs[sl]
                + 1.2 * (tissue[sl, None] - 0.7) * tissue_dir + 1.1 * noise[sl] / np.sqrt(DIM)
            )
            vectors[sl] = unit(mix)
        return vectors, tissue

    slide_dirs = unit(rng.standard_normal((slides, DIM)))
    slide = np.repeat(np.arange(slides), tiles)
    kind = np.concatenate([rng.choice(KINDS, size=tiles, p=odds[diagnosis[s]]) for s in range(slides)])
    vectors, tissue = draw(slide, kind, slide_dirs[slide])
    within = np.arange(len(slide)) % tiles
    x, y = (within % 20) * 1024, (within // 20) * 1024
    mosaic = within % max(1, tiles // 16) == 0  # 16 mosaic tiles a slide
    tumor_kind = kind == 1 + (diagnosis[slide] % 5)
    annotated = tumor_kind & (rng.random(len(slide)) < 0.05)
    archive = Archive(vectors, slide, kind, tissue, x, y, mosaic, annotated, site, diagnosis, stain, patient, age)
    q_slide = rng.integers(0, slides, size=queries)
    q_kind = np.array([rng.choice(KINDS, p=odds[diagnosis[s]]) for s in q_slide])
    q_vectors, _ = draw(q_slide, q_kind, unit(rng.standard_normal((queries, DIM))))
    return archive, q_vectors


@dataclass(frozen=True)
class Shape:
    """A filter shape: its name, the store filter, and the same condition as a numpy mask."""

    name: str
    flt: Filter
    mask: Callable[[dict[str, np.ndarray]], np.ndarray]


def shapes(archive: Archive) -> list[Shape]:
    """One filter per shape a user can write, over fractions from 0.01 % to 100 %."""
    rare_site = SITES[-1]
    common_diag = [str(d) for d in range(0, 2)]
    one_slide = "slide-00007"
    patient = str(archive.patient[11])

    def c(field: str, op: str, value: object) -> Condition:
        return Condition(field, op, value)  # type: ignore[arg-type]

    return [
        Shape("none (all tiles)", Filter(), lambda c_: np.ones(len(c_["x"]), bool)),
        Shape("tissue>=0 (tile range, all)", Filter((c("tissue", "gte", 0.0),)), lambda c_: c_["tissue"] >= 0),
        Shape("site=breast (slide, manifest)", Filter((c("site", "eq", "breast"),)), lambda c_: c_["site"] == "breast"),
        Shape(f"site={rare_site} (rare site)", Filter((c("site", "eq", rare_site),)),
              lambda c_: c_["site"] == rare_site),
        Shape("site!=breast", Filter((c("site", "ne", "breast"),)), lambda c_: c_["site"] != "breast"),
        Shape("diagnosis=0,1 (any-of)", Filter((c("diagnosis", "in", common_diag),)),
              lambda c_: np.isin(c_["diagnosis"], common_diag)),
        Shape("diagnosis!=0,1 (none-of)", Filter((c("diagnosis", "ne", "0"), c("diagnosis", "ne", "1"))),
              lambda c_: ~np.isin(c_["diagnosis"], common_diag)),
        Shape("stain=IHC", Filter((c("stain", "eq", "IHC"),)), lambda c_: c_["stain"] == "IHC"),
        Shape("age>=80 (manifest range)", Filter((c("age", "gte", 80),)), lambda c_: c_["age"] >= 80),
        Shape("tissue>=0.95 (tile, correlated)", Filter((c("tissue", "gte", 0.95),)),
              lambda c_: c_["tissue"] >= 0.95),
        Shape("tissue<0.4 (tile, correlated)", Filter((c("tissue", "lt", 0.4),)), lambda c_: c_["tissue"] < 0.4),
        Shape("x<4096 (tile, independent)", Filter((c("x", "lt", 4096),)), lambda c_: c_["x"] < 4096),
        Shape("site=kidney & tissue>=0.9", Filter((c("site", "eq", "kidney"), c("tissue", "gte", 0.9))),
              lambda c_: (c_["site"] == "kidney") & (c_["tissue"] >= 0.9)),
        Shape("stain=IHC & tissue<0.4", Filter((c("stain", "eq", "IHC"), c("tissue", "lt", 0.4))),
              lambda c_: (c_["stain"] == "IHC") & (c_["tissue"] < 0.4)),
        Shape("site!=breast & x>=8192 & tissue>=0.8",
              Filter((c("site", "ne", "breast"), c("x", "gte", 8192), c("tissue", "gte", 0.8))),
              lambda c_: (c_["site"] != "breast") & (c_["x"] >= 8192) & (c_["tissue"] >= 0.8)),
        Shape("slide_id=one", Filter((c("slide_id", "eq", one_slide),)), lambda c_: c_["slide_id"] == one_slide),
        Shape("slide_id=one & tissue>=0.95", Filter((c("slide_id", "eq", one_slide), c("tissue", "gte", 0.95))),
              lambda c_: (c_["slide_id"] == one_slide) & (c_["tissue"] >= 0.95)),
        Shape("patient=one & x<4096", Filter((c("patient", "eq", patient), c("x", "lt", 4096))),
              lambda c_: (c_["patient"] == patient) & (c_["x"] < 4096)),
        Shape("mosaic=true", Filter((c("mosaic", "eq", True),)), lambda c_: c_["mosaic"]),
        Shape("annotation=tumor", Filter((c("annotation", "eq", "tumor"),)), lambda c_: c_["annotation"] == "tumor"),
        Shape("annotation=tumor & age<50", Filter((c("annotation", "eq", "tumor"), c("age", "lt", 50))),
              lambda c_: (c_["annotation"] == "tumor") & (c_["age"] < 50)),
    ]


def truth(scores: np.ndarray, mask: np.ndarray, ids: np.ndarray) -> list[set[str]]:
    """For each query (a column of `scores`), the ids of its exact top K among the masked
    points, and of every point that ties the K-th (within 1e-5): a store that returns one
    of those instead has not missed a hit."""
    pool = np.flatnonzero(mask)
    out = []
    for column in scores[pool].T:
        if len(pool) <= K:
            out.append(set(ids[pool].tolist()))
            continue
        bar = np.partition(column, len(pool) - K)[len(pool) - K]
        out.append(set(ids[pool[column >= bar - 1e-5]].tolist()))
    return out


def recall(found: list[list[str]], wanted: list[set[str]], mask: np.ndarray) -> float:
    """Mean recall@K: the share of the K (or fewer, if fewer match) true hits that were found."""
    k = min(K, int(mask.sum()))
    if k == 0:
        return float(np.mean([not got for got in found]))
    return float(np.mean([min(k, len(set(got) & want)) / k for got, want in zip(found, wanted, strict=True)]))


def percentiles(ms: list[float]) -> tuple[float, float]:
    return float(np.percentile(ms, 50)), float(np.percentile(ms, 99))


def measure(store: Store, archive: Archive, queries: np.ndarray, scores: np.ndarray, ids: np.ndarray,
            shape: Shape, columns: dict) -> dict:
    """One shape: the store's latency and recall against the exact answer, and exact numpy's latency."""
    mask = shape.mask(columns)
    wanted = truth(scores, mask, ids)
    for q in queries[:3]:
        store.query(COLLECTION, q, k=K, flt=shape.flt or None)
    store_ms, found = [], []
    for q in queries:
        t = time.perf_counter()
        hits = store.query(COLLECTION, q, k=K, flt=shape.flt or None)
        store_ms.append((time.perf_counter() - t) * 1000)
        found.append([h.id for h in hits])
    exact_ms = []
    for q in queries[:30]:
        t = time.perf_counter()
        masked = np.where(mask, archive.vectors @ q, -np.inf)
        np.argpartition(-masked, K - 1)[:K]
        exact_ms.append((time.perf_counter() - t) * 1000)
    p50, p99 = percentiles(store_ms)
    e50, e99 = percentiles(exact_ms)
    return {
        "shape": shape.name, "kept": float(mask.mean()), "recall_at_10": recall(found, wanted, mask),
        "p50_ms": p50, "p99_ms": p99, "exact_p50_ms": e50, "exact_p99_ms": e99,
    }


def build(store: Store, archive: Archive, batch: int, indexed: tuple[str, ...] | None = None) -> dict:
    """Write the archive as ingest does and build the index; `indexed` overrides which fields
    get a payload index (None: the tiles layout's, every field). Seconds of each step."""
    layout = tiles_layout(COLUMNS)
    fields = asdict(layout) | ({} if indexed is None else {"indexed": indexed})
    store.ensure_collection(CollectionSpec(COLLECTION, DIM, {"model_fingerprint": "bench"}, **fields))
    started = time.perf_counter()
    for points, shared in archive.batches(batch):
        store.upsert(COLLECTION, points, shared)
    write_s = time.perf_counter() - started
    log(f"written {len(archive.slide):,} points in {write_s:.1f} s; building the index")
    started = time.perf_counter()
    store.finish_bulk_load(COLLECTION)
    return {"write_s": write_s, "build_s": time.perf_counter() - started}


def index_cost(slides: int, tiles: int, batch: int, folder: Path) -> dict:
    """Write and build time with every field indexed beside the index set conchdb had before
    (slide, cohort, mosaic mark, annotation and manifest columns), on the same archive."""
    archive, _ = make_archive(slides, tiles, 1, seed=1)
    before = ("slide_id", "cohort", "mosaic", "annotation", *COLUMNS)
    out = {"points": len(archive.slide)}
    for label, indexed in (("before", before), ("every_field", None)):
        with EdgeStore(folder / f"cost-{label}") as store:
            log(f"index cost: {label}")
            out[label] = build(store, archive, batch, indexed)
    return out


def open_store(args: argparse.Namespace, folder: Path) -> tuple[Store, bool]:
    """The store to measure and whether it already holds the archive (--keep, or a server's collection)."""
    if args.qdrant_url:
        from conchdb.store.server import ServerStore

        store: Store = ServerStore(args.qdrant_url, api_key=args.qdrant_api_key)
    else:
        store = EdgeStore(folder / f"store-{args.slides}x{args.tiles}")
    return store, COLLECTION in store.collections()


def run(args: argparse.Namespace) -> dict:
    log(f"making {args.slides} slides x {args.tiles} tiles and {args.queries} queries")
    archive, queries = make_archive(args.slides, args.tiles, args.queries)
    with tempfile.TemporaryDirectory(prefix="conchdb-filters-") as tmp:
        folder = Path(args.keep) if args.keep else Path(tmp)
        store, built = open_store(args, folder)
        timings = {} if built else build(store, archive, args.batch)
        if not built and args.qdrant_url:
            log("waiting for the server's index")
            while store.client.get_collection(COLLECTION).status != "green":  # type: ignore[attr-defined]
                time.sleep(1)
        columns = archive.columns()
        ids = np.array([stable_id("bench", i) for i in range(len(archive.slide))])
        scores = archive.vectors @ queries.T
        rows = []
        for shape in shapes(archive):
            if args.only and args.only not in shape.name:
                continue
            rows.append(measure(store, archive, queries, scores, ids, shape, columns))
            r = rows[-1]
            log(f"{r['shape']}: kept {r['kept']:.4%} recall {r['recall_at_10']:.3f} "
                f"p50 {r['p50_ms']:.2f} p99 {r['p99_ms']:.2f} (exact numpy p50 {r['exact_p50_ms']:.2f})")
        store.close()
        cost = index_cost(args.cost_slides, args.tiles, args.batch, Path(tmp)) if args.cost_slides else None
    backend = f"Qdrant server {args.qdrant_url}" if args.qdrant_url else "embedded store"
    return {"points": len(archive.slide), "queries": len(queries), "backend": backend, **timings, "shapes": rows,
            "index_cost": cost}


def table(out: dict) -> str:
    head = ("filter", "kept", "recall@10", "p50 ms", "p99 ms", "numpy p50", "numpy p99")
    rows = [head] + [
        (r["shape"], f"{r['kept']:.2%}", f"{r['recall_at_10']:.3f}", f"{r['p50_ms']:.2f}", f"{r['p99_ms']:.2f}",
         f"{r['exact_p50_ms']:.2f}", f"{r['exact_p99_ms']:.2f}")
        for r in out["shapes"]
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = [f"filtered search: {out['points']:,} points, {out['queries']} queries, k={K}, {out['backend']}"]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    cost = out.get("index_cost")
    if cost:
        b, e = cost["before"], cost["every_field"]
        lines += [
            f"index cost on {cost['points']:,} points (write / index build, s): every field indexed "
            f"{e['write_s']:.1f} / {e['build_s']:.1f}, the earlier index set {b['write_s']:.1f} / {b['build_s']:.1f}"
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--slides", type=int, default=500)
    parser.add_argument("--tiles", type=int, default=400)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--keep", default=None, help="keep the built store in this folder, and reuse it")
    parser.add_argument("--only", default=None, help="only the shapes whose name contains this")
    parser.add_argument("--cost-slides", type=int, default=100,
                        help="slides of the archive that the index cost is measured on (0: skip it)")
    parser.add_argument("--qdrant-url", default=None, help="measure a Qdrant server instead of the embedded store")
    parser.add_argument("--qdrant-api-key", default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    out = run(args)
    print(json.dumps(out) if args.json else table(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
