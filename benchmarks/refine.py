"""Refine by example: Rocchio's update against Qdrant's recommend query, by precision@20.

A planted-class archive (each tile = its class's direction + a tissue pattern shared by all
classes + its slide's own direction + noise; the patterns make a class's query find other
classes' tiles too). For each query (the wanted class's direction blurred and pulled toward
a shared pattern), a simulated pathologist looks at the unrefined top 20, marks the first
three tiles of the wanted class relevant and the first two of another class not relevant,
and the store is searched again, leaving the marked tiles out. Reported: the mean
precision@20 of the wanted class, unrefined (the baseline, same run) and per method.

Recommend runs in Qdrant itself (qdrant-client's local mode, exact search, the engine's
documented strategies), with the query vector as one more positive example, since a
recommend query has no query of its own.

    python benchmarks/refine.py [--queries 60] [--seed 0]
"""

from __future__ import annotations

import argparse
import time
import uuid

import numpy as np
from qdrant_client import QdrantClient
from qdrant_client import models as qm

from conchdb.search.steer import rocchio

DIM, CLASSES, PATTERNS, SLIDES_PER_CLASS, TILES = 512, 6, 8, 6, 60
K, LIKES, UNLIKES = 20, 3, 2


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def make_archive(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Tile vectors, their class, the class directions and the shared patterns."""
    directions = unit(rng.normal(size=(CLASSES, DIM)))
    patterns = unit(rng.normal(size=(PATTERNS, DIM)))
    vectors, labels = [], []
    for c in range(CLASSES):
        for _ in range(SLIDES_PER_CLASS):
            own = unit(rng.normal(size=DIM))
            kinds = patterns[rng.integers(PATTERNS, size=TILES)]
            noise = rng.normal(size=(TILES, DIM)) / np.sqrt(DIM)
            vectors.append(unit(0.2 * directions[c] + 0.5 * own + 0.9 * kinds + 0.6 * noise))
            labels += [c] * TILES
    return np.concatenate(vectors).astype(np.float32), np.asarray(labels), directions, patterns


def precision(ids: list[int], labels: np.ndarray, wanted: int) -> float:
    return float(np.mean([labels[i] == wanted for i in ids[:K]])) if ids else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    vectors, labels, directions, patterns = make_archive(rng)
    client = QdrantClient(":memory:")
    client.create_collection("t", vectors_config=qm.VectorParams(size=DIM, distance=qm.Distance.COSINE))
    ids = [str(uuid.UUID(int=i + 1)) for i in range(len(vectors))]
    index = {pid: i for i, pid in enumerate(ids)}
    client.upsert("t", [qm.PointStruct(id=pid, vector=v.tolist()) for pid, v in zip(ids, vectors, strict=True)])

    def search(query: np.ndarray, exclude: set[int]) -> list[int]:
        order = np.argsort(-(vectors @ query), kind="stable")
        return [int(i) for i in order if int(i) not in exclude][:K]

    def recommend(query: np.ndarray, liked: list[int], unliked: list[int], strategy: qm.RecommendStrategy) -> list[int]:
        marked = liked + unliked
        found = client.query_points(
            "t", limit=K, query=qm.RecommendQuery(recommend=qm.RecommendInput(
                positive=[query.tolist(), *[ids[i] for i in liked]], negative=[ids[i] for i in unliked],
                strategy=strategy)),
            query_filter=qm.Filter(must_not=[qm.HasIdCondition(has_id=[ids[i] for i in marked])]),
        ).points
        return [index[str(p.id)] for p in found]

    methods = {
        "rocchio a=1 b=0.75 g=0.25": lambda q, li, un: search(
            rocchio(q, vectors[li], vectors[un], beta=0.75, gamma=0.25), set(li + un)),
        "rocchio a=1 b=0.75 g=0.15": lambda q, li, un: search(
            rocchio(q, vectors[li], vectors[un], beta=0.75, gamma=0.15), set(li + un)),
        "rocchio a=1 b=1.0 g=0.5": lambda q, li, un: search(
            rocchio(q, vectors[li], vectors[un], beta=1.0, gamma=0.5), set(li + un)),
        "rocchio a=1 b=1.5 g=1 (conchdb)": lambda q, li, un: search(rocchio(q, vectors[li], vectors[un]), set(li + un)),
        "rocchio a=1 b=3 g=2 (= avg_vector)": lambda q, li, un: search(
            rocchio(q, vectors[li], vectors[un], beta=3.0, gamma=2.0), set(li + un)),
        "recommend average_vector": lambda q, li, un: recommend(q, li, un, qm.RecommendStrategy.AVERAGE_VECTOR),
        "recommend best_score": lambda q, li, un: recommend(q, li, un, qm.RecommendStrategy.BEST_SCORE),
        "recommend sum_scores": lambda q, li, un: recommend(q, li, un, qm.RecommendStrategy.SUM_SCORES),
    }
    scores: dict[str, list[float]] = {"unrefined": [], **{m: [] for m in methods}}
    seconds: dict[str, float] = dict.fromkeys(methods, 0.0)
    used, firsts = 0, []
    for n in range(args.queries):
        wanted = n % CLASSES
        blur = unit(rng.normal(size=DIM))
        query = unit(0.1 * directions[wanted] + 0.8 * patterns[rng.integers(PATTERNS)] + 0.5 * blur).astype(np.float32)
        first = search(query, set())
        firsts.append(precision(first, labels, wanted))
        liked = [i for i in first if labels[i] == wanted][:LIKES]
        unliked = [i for i in first if labels[i] != wanted][:UNLIKES]
        if len(liked) < LIKES or len(unliked) < UNLIKES:
            continue  # the simulated reader needs three good and two bad on the first page
        used += 1
        scores["unrefined"].append(precision(search(query, set(liked + unliked)), labels, wanted))
        for name, method in methods.items():
            t = time.perf_counter()
            scores[name].append(precision(method(query, liked, unliked), labels, wanted))
            seconds[name] += time.perf_counter() - t
    print(f"{len(vectors)} tiles, {CLASSES} classes, {used} of {args.queries} queries had 3 good + 2 bad in the top 20")
    print(f"first page precision@20 over all queries: {np.mean(firsts):.3f}")
    print(f"{'method':36s} precision@20 (mean ± sd)")
    for name, values in scores.items():
        extra = f"   {1000 * seconds[name] / max(used, 1):.1f} ms/query" if name in seconds else "   (baseline)"
        print(f"{name:36s} {np.mean(values):.3f} ± {np.std(values):.3f}{extra}")


if __name__ == "__main__":
    main()
