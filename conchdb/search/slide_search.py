"""Slide -> slides: rank stored slides by how closely their tiles match a query slide's mosaic.

A candidate slide's score is the median, over the query's mosaic tiles, of each tile's best
cosine to any tile of the candidate: Yottixel's median of minimum distances, in CONCH space.
The best match of every query tile counts, so a slide must resemble most of the query's
tissue kinds to rank high, and one lucky tile cannot carry it.

The store is asked in batches, never once per stored slide:

1. Candidates: one search of the slide records (each holds its slide's mean tile vector)
   with the mean of the query's mosaic, under the filter's slide-level conditions, gives
   the `candidates` slides most like the query as a whole, best first.
2. Pairs: a query tile's best tile in one slide is one search limited to that slide, with
   one hit (a few tens of us in the embedded engine: a slide's tiles are few enough to be
   scanned exactly). The first k + REFINE_EXTRA candidates get all their pairs, and the
   k-th best of their medians is the bar to beat. The further candidates get theirs in
   stages (STAGES), CHUNK slides a batch: first just over half the query tiles (for the
   first chunk in the same batch as the first candidates' pairs, since every slide needs
   that many whatever the bar), then a few more at a time, the tiles least like the
   slide's mean vector first; one is dropped as soon as more than half of its pairs are
   below the bar, since its median is then below it too; the bar rises between chunks.
   So the order within the candidates is the exhaustive one, in a handful of batches a
   query.

A slide outside the candidates is not scored: its tissue as a whole is further from the
query's than theirs. Why a mean vector, and not each query tile's nearest tiles? Those
lists are filled by the few slides that share one kind of tissue with the query, while the
median is decided by the tissue most of the query is made of. On the synthetic archive of
benchmarks/slide_search.py (500 slides of 400 tiles), the 40 slides best ranked from lists
of each query tile's 300 nearest tiles held 23 % of the exhaustive top 5; the 40 slides
with the nearest mean vectors held 99.6 % of it over the benchmark's 50 queries (98.8 %
with 32, all of it with 48). The cost of a query is set by the candidates, not by the
archive, but what they cover is not: at 2,500 slides of that archive (five times as many
slides like each query) 40 candidates hold 85 % of the top 5, and 128 are needed for 99 %.
A store without slide records (one conchdb did not write) has every slide with matching
tiles as a candidate, in id order: exact, and slower.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from conchdb.archive import SlideCatalog, of_slide
from conchdb.catalog import MOSAIC_FIELD, TILE_ONLY_FIELDS, TILE_SCOPE_FIELDS
from conchdb.errors import QueryError
from conchdb.store import Condition, Filter, Store

CANDIDATES = 40
"""Slides scored exactly per query (at least k + REFINE_EXTRA): a query costs about 25
one-hit searches a candidate (32 for each of the best, 17 or more for each dropped one)."""
REFINE_EXTRA = 5
"""Candidates beyond k that get all their pairs at once, to set the bar the others must beat."""
CHUNK = 64
"""Further candidates are scored this many at a time, so that the bar rises between chunks
where there are many (a store without slide records has every slide as a candidate)."""
STAGES = (0, 2, 4, 7, 11)
"""A further candidate's pairs are asked in stages: the first just over half the query
tiles, then this many more; it is dropped as soon as over half of its pairs are below the bar."""
TILE_OWN_FIELDS = ("x", "y", "tissue", MOSAIC_FIELD)
"""A tile's own payload fields; the rest of its payload describes its slide."""


@dataclass(frozen=True)
class QueryTile:
    """One tile of the query slide's mosaic: its vector and where it lies (id when stored)."""

    vector: np.ndarray
    x: int | None = None
    y: int | None = None
    size: int | None = None
    id: str | None = None


@dataclass
class SlideQuery:
    """A query slide: its mosaic, and its slide-level payload (for `exclude_same`).

    `slide_id` is set for a stored slide, which is then left out of the results; `source`
    says where the query came from (a stored slide id, or a file's path).
    """

    tiles: list[QueryTile]
    source: str
    slide_id: str | None = None
    payload: dict[str, Any] = field(default_factory=dict)
    mosaic_stored: bool = True

    @property
    def vectors(self) -> np.ndarray:
        return np.stack([np.asarray(t.vector, dtype=np.float32) for t in self.tiles])


@dataclass
class TilePair:
    """A query mosaic tile and its best-matching tile in a result slide."""

    query: QueryTile
    id: str
    score: float
    x: Any = None
    y: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "query_id": self.query.id,
            "query_x": self.query.x,
            "query_y": self.query.y,
            "id": self.id,
            "x": self.x,
            "y": self.y,
            "score": self.score,
        }


@dataclass
class SlideMatch:
    """A ranked slide: its score, the best match of each query mosaic tile (best first), and
    its slide-level payload (its manifest columns, path, pixel size ...)."""

    rank: int
    slide_id: str
    score: float
    matched_tiles: list[TilePair]
    payload: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        """The `--json` form: rank, slide_id, score, matched_tiles, payload."""
        return {
            "rank": self.rank,
            "slide_id": self.slide_id,
            "score": self.score,
            "matched_tiles": [p.to_dict() for p in self.matched_tiles],
            "payload": self.payload,
        }


def slide_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """A tile's payload without the fields of the tile itself: what describes its slide."""
    return {k: v for k, v in payload.items() if k not in TILE_OWN_FIELDS}


def candidate_filter(query: SlideQuery, flt: Filter | None, exclude_same: Sequence[str]) -> Filter:
    """The user's filter, minus the query slide itself and the slides sharing its value of
    each `exclude_same` field.

    Exclusion uses `ne`, which also leaves out slides that lack the field: a slide whose
    patient is unknown cannot be shown to be another patient's.
    """
    must = list(flt.must) if flt else []
    if query.slide_id is not None:
        must.append(Condition("slide_id", "ne", query.slide_id))
    for name in exclude_same:
        value = query.payload.get(name)
        if value is None or isinstance(value, (list, dict)):
            raise QueryError(
                f"the query slide {query.source} has no value of '{name}' to exclude",
                fix=f"exclude by a field the query slide's tiles carry, or leave '{name}' out",
                parameter="exclude_same",
            )
        must.append(Condition(name, "ne", value))
    return Filter(tuple(must))


def rank_slides(
    store: Store,
    collection: str,
    query: SlideQuery,
    *,
    k: int = 10,
    flt: Filter | None = None,
    exclude_same: Sequence[str] = (),
    candidates: int | None = None,
) -> list[SlideMatch]:
    """The `k` stored slides that best match the query's mosaic, best first (see the module
    docstring), scoring `candidates` slides (None: CANDIDATES)."""
    if not query.tiles:
        raise QueryError(
            f"the query slide {query.source} has no mosaic tiles", fix="ingest the slide again", parameter="slide_id"
        )
    if k < 1:
        raise QueryError(f"top-k {k} must be at least 1", fix="ask for 1 or more slides", parameter="k")
    candidates = CANDIDATES if candidates is None else candidates
    if candidates < 1:
        raise QueryError(f"{candidates} candidates cannot hold a result", fix="score 1 or more slides",
                         parameter="candidates")
    base = candidate_filter(query, flt, exclude_same)
    vectors = query.vectors
    pool, checked = candidate_slides(store, collection, vectors, base, max(candidates, k + REFINE_EXTRA))
    # Conditions the candidates' records already met need no checking on every tile again:
    # each one the engine checks per tile makes a one-hit search several times dearer.
    keep = [c for c in base.must if not checked or c.field in TILE_ONLY_FIELDS or c.field in TILE_SCOPE_FIELDS]
    pairs = _Pairs(store, collection, vectors, Filter(tuple(keep)))
    m = len(vectors)
    half = m // 2 + 1  # this many pairs below the bar put the median below it
    stages = sorted({min(half + extra, m) for extra in STAGES} | {m})
    first, further = pool[: k + REFINE_EXTRA], pool[k + REFINE_EXTRA :]
    order = tile_orders(SlideCatalog(store, collection), vectors, further if checked else [])
    pairs.fill([(slide, range(m)) for slide in first]
               + [(slide, order.get(slide, range(m))[: stages[0]]) for slide in further[:CHUNK]])
    medians = {slide: pairs.median(slide) for slide in first}
    for start in range(0, len(further), CHUNK):
        bar = sorted(medians.values(), reverse=True)[k - 1] if len(medians) >= k else -np.inf
        alive, asked = further[start : start + CHUNK], stages[0] if start == 0 else 0
        for upto in stages:
            if upto > asked:
                pairs.fill([(slide, order.get(slide, range(m))[asked:upto]) for slide in alive])
                asked = upto
            if upto < m:
                alive = [slide for slide in alive
                         if (pairs.scores[slide][order.get(slide, range(m))[:upto]] < bar).sum() < half]
        medians.update((slide, pairs.median(slide)) for slide in alive)
    top = sorted(medians.items(), key=lambda item: (-item[1], item[0]))[:k]
    return _matches(store, collection, query, pairs, top)


def candidate_slides(
    store: Store, collection: str, vectors: np.ndarray, base: Filter, n: int
) -> tuple[list[str], bool]:
    """The ids of the `n` slides whose records' mean tile vectors are nearest the mean of
    `vectors`, best first, under the conditions of `base` that slide records can answer
    (those on a tile's own fields are left to the pairs), and True: where records exist, a
    slide without a done one is not searched. Without a slides collection, every slide with
    tiles matching `base`, in id order, and False (nothing was checked)."""
    catalog = SlideCatalog(store, collection)
    if catalog.has_records():
        centre = vectors.mean(axis=0)
        return catalog.nearest_done(centre / (np.linalg.norm(centre) or 1.0), n, base), True
    slides = {str(h.payload["slide_id"]) for h in store.scroll(collection, base) if "slide_id" in h.payload}
    return sorted(slides), False


def tile_orders(catalog: SlideCatalog, vectors: np.ndarray, slides: Sequence[str]) -> dict[str, np.ndarray]:
    """For each of `slides` with a done record, the query tiles in the order their pairs
    are asked: least like the slide's mean tile vector first. Those are the pairs most
    likely below the bar, so a slide that will be dropped is dropped after fewer searches
    (on the benchmark's archive, 14 % fewer searches a query than in the query's order)."""
    return {slide: np.argsort(vectors @ mean, kind="stable") for slide, mean in catalog.mean_vectors(slides).items()}


class _Pairs:
    """Each candidate slide's best tile for each query tile, asked of the store in batches:
    `scores[slide][i]` is the best cosine of query tile i in that slide (NaN until asked,
    -1 where no tile of the slide passes the filter), `ids[slide][i]` that tile's id."""

    def __init__(self, store: Store, collection: str, vectors: np.ndarray, base: Filter) -> None:
        self.store, self.collection, self.vectors, self.base = store, collection, vectors, base
        self.scores: dict[str, np.ndarray] = {}
        self.ids: dict[str, list[str | None]] = {}

    def fill(self, wanted: Sequence[tuple[str, Iterable[int]]]) -> None:
        """Ask the pairs of each (slide, query tiles) in `wanted`, in one batch of one-hit searches."""
        asked = [(slide, i) for slide, tiles in wanted for i in tiles]
        if not asked:
            return
        within = {slide: of_slide(slide, *self.base.must) for slide, _ in wanted}
        found = self.store.query_batch(
            self.collection, self.vectors, k=1, flts=[within[slide] for slide, _ in asked],
            payload_fields=(), rows=[i for _, i in asked],
        )
        m = len(self.vectors)
        for slide in within:
            if slide not in self.scores:
                self.scores[slide], self.ids[slide] = np.full(m, np.nan), [None] * m
        for (slide, i), hits in zip(asked, found, strict=True):
            self.scores[slide][i], self.ids[slide][i] = (hits[0].score, hits[0].id) if hits else (-1.0, None)

    def median(self, slide: str) -> float:
        return float(np.median(self.scores[slide]))


def _matches(
    store: Store, collection: str, query: SlideQuery, pairs: _Pairs, top: list[tuple[str, float]]
) -> list[SlideMatch]:
    """The result rows, with each pair's position and each slide's payload (read from its
    best-matching tile), fetched in one call for the top slides only."""
    wanted = [tile_id for slide, _ in top for tile_id in pairs.ids[slide] if tile_id]
    payloads = {h.id: h.payload for h in store.retrieve(collection, wanted)}
    out = []
    for rank, (slide, score) in enumerate(top, start=1):
        matched = []
        for i, tile_id in enumerate(pairs.ids[slide]):
            if tile_id:
                payload = payloads.get(tile_id, {})
                matched.append(TilePair(query.tiles[i], tile_id, float(pairs.scores[slide][i]), payload.get("x"),
                                        payload.get("y")))
        matched.sort(key=lambda p: (-p.score, p.id))
        payload = slide_payload(payloads.get(matched[0].id, {})) if matched else {}
        out.append(SlideMatch(rank, slide, score, matched, payload))
    return out
