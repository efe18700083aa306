"""Every filter shape returns exact search's top 10, on data whose fields go with the vectors.

Filters on fields correlated with the vectors are where a graph search loses hits: the
points that pass lie in one region, and a walk that starts elsewhere finds few of them.
Here `tissue` (a tile field) is read off the vectors, `site` (a slide field) follows each
slide's direction, and `x` is independent of both. Each backend is asked every shape, from
a handful of points to all of them; the embedded store twice: with its defaults (a filter
that keeps fewer points than the full-scan threshold is searched exactly) and with a tiny
threshold, so that every filtered search walks the graph (with ACORN) instead.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from conchdb.store import CollectionSpec, Condition, Filter, Point, Store, StoreTuning, stable_id
from tests.store.conftest import QUIET_LOCAL_MODE, drop, open_backend

DIM = 32
SLIDES, PER_SLIDE = 30, 100
SITES = ("lung", "breast", "colon", "kidney")
FIELDS = {"slide_id": "keyword", "site": "keyword", "age": "integer", "x": "integer", "tissue": "float"}


def make_points(seed: int = 3) -> tuple[np.ndarray, list[dict]]:
    """Slides of tiles around their own direction; `tissue` is the tiles' projection on one
    direction (squashed to 0..1), so a tissue range picks one side of the space."""
    rng = np.random.default_rng(seed)
    slide_dirs = rng.normal(size=(SLIDES, DIM))
    tissue_dir = rng.normal(size=DIM)
    tissue_dir /= np.linalg.norm(tissue_dir)
    slide = np.repeat(np.arange(SLIDES), PER_SLIDE)
    vectors = slide_dirs[slide] * 0.6 + rng.normal(size=(len(slide), DIM))
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float32)
    tissue = np.round(1 / (1 + np.exp(-6 * (vectors @ tissue_dir))), 4)
    site_of = np.argmax(slide_dirs @ rng.normal(size=(DIM, len(SITES))), axis=1)  # site follows the slide
    payloads = [
        {
            "slide_id": f"s{slide[i]:02d}",
            "site": SITES[site_of[slide[i]]],
            "age": int(30 + slide[i] * 2),
            "x": int(rng.integers(0, 100)) * 512,
            "tissue": float(tissue[i]),
        }
        for i in range(len(slide))
    ]
    return vectors, payloads


VECTORS, PAYLOADS = make_points()


def where(test: Callable[[dict], bool]) -> np.ndarray:
    return np.array([test(p) for p in PAYLOADS])


SHAPES: dict[str, tuple[Filter, np.ndarray]] = {
    "tissue>=0.9 (tile, correlated)": (
        Filter((Condition("tissue", "gte", 0.9),)), where(lambda p: p["tissue"] >= 0.9)),
    "tissue<0.3 (tile, correlated)": (
        Filter((Condition("tissue", "lt", 0.3),)), where(lambda p: p["tissue"] < 0.3)),
    "tissue>=0 (all)": (Filter((Condition("tissue", "gte", 0.0),)), where(lambda p: True)),
    "x<5120 (tile, independent)": (Filter((Condition("x", "lt", 5120),)), where(lambda p: p["x"] < 5120)),
    "site=kidney": (Filter((Condition("site", "eq", "kidney"),)), where(lambda p: p["site"] == "kidney")),
    "site!=lung": (Filter((Condition("site", "ne", "lung"),)), where(lambda p: p["site"] != "lung")),
    "site any of": (
        Filter((Condition("site", "in", ["lung", "colon"]),)), where(lambda p: p["site"] in ("lung", "colon"))),
    "site none of": (
        Filter((Condition("site", "ne", "lung"), Condition("site", "ne", "colon"))),
        where(lambda p: p["site"] not in ("lung", "colon"))),
    "age>=70 (manifest range)": (Filter((Condition("age", "gte", 70),)), where(lambda p: p["age"] >= 70)),
    "site=breast & tissue>=0.8": (
        Filter((Condition("site", "eq", "breast"), Condition("tissue", "gte", 0.8))),
        where(lambda p: p["site"] == "breast" and p["tissue"] >= 0.8)),
    "slide & x range & tissue (a few points)": (
        Filter((Condition("slide_id", "eq", "s07"), Condition("x", "lt", 10240), Condition("tissue", "gte", 0.6))),
        where(lambda p: p["slide_id"] == "s07" and p["x"] < 10240 and p["tissue"] >= 0.6)),
}
CONFIGS = ["edge", "edge-graph", "memory", "live"]


@pytest.fixture(scope="module", params=CONFIGS)
def filled(request, tmp_path_factory) -> Iterator[tuple[Store, str]]:
    kind = request.param
    folder = tmp_path_factory.mktemp(f"recall-{kind}")
    if kind == "edge-graph":
        from conchdb.store.edge import EdgeStore

        # 1 KB: every filter that keeps more than 8 points walks the graph; 64 KB: an
        # index is built for these 3,000 small vectors at all.
        store: Store = EdgeStore(folder / "store", tuning=StoreTuning(full_scan_kb=1), indexing_threshold_kb=64)
    elif kind == "edge":
        from conchdb.store.edge import EdgeStore

        store = EdgeStore(folder / "store", indexing_threshold_kb=64)
    else:
        store = open_backend(kind, folder)
    name = f"test_{uuid.uuid4().hex[:10]}"
    store.ensure_collection(CollectionSpec(name, DIM, {"model_fingerprint": "test"}, FIELDS, graph_fields=("site",)))
    points = [Point(stable_id("recall", i), v, p) for i, (v, p) in enumerate(zip(VECTORS, PAYLOADS, strict=True))]
    for start in range(0, len(points), 500):
        store.upsert(name, points[start : start + 500])
    store.finish_bulk_load(name)
    yield store, name
    drop(store, [name])
    store.close()


def queries() -> np.ndarray:
    """Queries from everywhere: tiles of several slides, moved a little."""
    rng = np.random.default_rng(11)
    rows = VECTORS[rng.choice(len(VECTORS), size=12, replace=False)] + rng.normal(scale=0.3, size=(12, DIM))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_shapes_span_a_handful_of_points_to_all_of_them():
    kept = sorted(int(mask.sum()) for _, mask in SHAPES.values())
    assert kept[0] <= 20 and kept[-1] == len(PAYLOADS)
    # tissue is read off the vectors; x is not
    tissue = np.array([p["tissue"] for p in PAYLOADS])
    x = np.array([p["x"] for p in PAYLOADS])
    direction = VECTORS[tissue >= 0.9].mean(axis=0)
    assert np.corrcoef(VECTORS @ direction, tissue)[0, 1] > 0.5
    assert abs(np.corrcoef(VECTORS @ direction, x)[0, 1]) < 0.1


@QUIET_LOCAL_MODE
@pytest.mark.parametrize("shape", list(SHAPES))
def test_every_filter_shape_returns_the_exact_top_10(filled, shape):
    store, name = filled
    flt, mask = SHAPES[shape]
    ids = np.array([stable_id("recall", i) for i in range(len(PAYLOADS))])
    for query in queries():
        scores = np.where(mask, VECTORS @ query, -np.inf)
        want = min(10, int(mask.sum()))
        bar = np.sort(scores)[::-1][want - 1]
        tied_or_better = set(ids[scores >= bar - 1e-4].tolist())  # ties aside
        hits = store.query(name, query, k=10, flt=flt)
        assert len(hits) == want, shape
        assert {h.id for h in hits} <= tied_or_better, shape
