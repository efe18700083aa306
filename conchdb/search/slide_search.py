"""Slide -> slides: rank stored slides by how closely their tiles match a query slide's mosaic.

A candidate slide's score is the median, over the query's mosaic tiles, of each tile's best
cosine to any tile of the candidate: Yottixel's median of minimum distances, in CONCH space.
The best match of every query tile counts, so a slide must resemble most of the query's
tissue kinds to rank high, and one lucky tile cannot carry it.

The store is asked in batches, never once per stored slide:

1. one batch of searches, one per mosaic tile, each looking at its `depth` nearest tiles
   and keeping the best of each slide (slide id and position only). The slides in these
   lists are the candidates. A slide's hit in a tile's list is its best tile for the query
   tile: an exact pair. A candidate absent from a list has its best cosine below the list's last
   score, which bounds the pair from above.
2. Candidates are ranked on these values; the pairs still bounded among the best ranked
   are asked exactly in one more batch (each search limited to that slide, one hit), and
   the ranking is redone until the top `k` hold only exact pairs. Since a bound is never
   below the exact value, no candidate ranked lower can overtake them.

A slide none of whose tiles is among any mosaic tile's `depth` nearest is no candidate: it
resembles none of the query's tissue kinds closely enough to rank high. The lists are made
deeper when they name fewer than k slides, or when the best-ranked candidates lack many of
their pairs (an archive of many alike slides), where one deeper batch costs less than
asking for the pairs one by one. Within the
candidates the ranking is the exhaustive computation's, to the recall of the ANN engine.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from conchdb.catalog import MOSAIC_FIELD
from conchdb.errors import QueryError
from conchdb.store import Condition, Filter, Hit, Store

DEPTH = 300
"""Nearest tiles fetched per mosaic tile in the first batch. The engine's work is set by
its search beam (192 by default) more than by this; deeper lists mostly cost converting
hits into Python objects."""
MAX_DEPTH = 10_000
"""Deepest first batch (see DEEPEN_AT)."""
DEEPEN_AT = 0.25
"""The first batch is redone twice as deep while the best-ranked candidates lack more than
this share of their pairs."""
REFINE_EXTRA = 5
"""The first refinement round completes the pairs of the k + this many best-ranked
candidates that still hold bounds; each further round twice as many."""
PAIR_FIELDS = ("slide_id", "x", "y")
"""The payload the first batch brings back: enough to group hits and show the pairs."""
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


@dataclass
class _Table:
    """Per slide, the exact best pair found so far for each query tile index."""

    pairs: dict[str, dict[int, Hit]] = field(default_factory=dict)
    floors: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def add(self, tile: int, hits: Sequence[Hit]) -> None:
        for hit in hits:
            slide = hit.payload.get("slide_id")
            if slide is None:
                continue
            best = self.pairs.setdefault(str(slide), {})
            if tile not in best or hit.score > best[tile].score:
                best[tile] = hit

    def ranking(self) -> list[tuple[str, float]]:
        """Slides by the median over query tiles of their exact pairs or, where a pair is
        missing, its upper bound; best first, ties by slide id."""
        slides = sorted(self.pairs)
        values = np.tile(self.floors, (len(slides), 1))
        for row, slide in enumerate(slides):
            for i, hit in self.pairs[slide].items():
                values[row, i] = hit.score
        medians = np.median(values, axis=1) if slides else np.zeros(0)
        order = sorted(range(len(slides)), key=lambda r: (-medians[r], slides[r]))
        return [(slides[r], float(medians[r])) for r in order]


def rank_slides(
    store: Store,
    collection: str,
    query: SlideQuery,
    *,
    k: int = 10,
    flt: Filter | None = None,
    exclude_same: Sequence[str] = (),
    depth: int = DEPTH,
) -> list[SlideMatch]:
    """The `k` stored slides that best match the query's mosaic, best first (see the module docstring)."""
    return rank_slides_from(store, collection, query, k=k, flt=flt, exclude_same=exclude_same, depth=depth)[0]


def rank_slides_from(
    store: Store,
    collection: str,
    query: SlideQuery,
    *,
    k: int = 10,
    flt: Filter | None = None,
    exclude_same: Sequence[str] = (),
    depth: int = DEPTH,
) -> tuple[list[SlideMatch], int]:
    """`rank_slides`, starting from `depth`, and the depth the first batch ended at: many
    queries over one archive (an evaluation) start where the last one ended, instead of
    each learning again that the archive needs deeper lists."""
    if not query.tiles:
        raise QueryError(
            f"the query slide {query.source} has no mosaic tiles", fix="ingest the slide again", parameter="slide_id"
        )
    if k < 1:
        raise QueryError(f"top-k {k} must be at least 1", fix="ask for 1 or more slides", parameter="k")
    base = candidate_filter(query, flt, exclude_same)
    vectors = query.vectors
    m = len(vectors)
    total = store.count(collection, base)
    if total == 0:
        return [], depth
    depth = max(1, min(depth, total))
    while True:
        table = _Table(floors=np.full(m, -np.inf))
        lists = store.query_batch(
            collection, vectors, k=depth, flts=base, payload_fields=PAIR_FIELDS, group_by="slide_id"
        )
        for i, hits in enumerate(lists):
            table.add(i, hits)
            if hits and depth < total:  # else the list saw every candidate tile
                # The last slide's best tile scores at least the depth-th nearest tile, above
                # any slide missing from the list: a (slightly loose) bound for its pairs.
                table.floors[i] = hits[-1].score
        if depth >= min(total, MAX_DEPTH) or (len(table.pairs) >= k and not _too_shallow(table, k, m)):
            break
        depth = min(depth * 2, total, MAX_DEPTH)
    ranked = _refine(store, collection, vectors, base, table, k)
    return _matches(store, collection, query, table, ranked[:k]), depth


def _too_shallow(table: _Table, k: int, m: int) -> bool:
    """Whether the best-ranked candidates lack so many pairs that a deeper first batch is
    cheaper than asking for them one by one (an archive of many alike slides)."""
    top = table.ranking()[: k + REFINE_EXTRA]
    missing = sum(m - len(table.pairs[slide]) for slide, _ in top)
    return missing > DEEPEN_AT * m * len(top)


def _refine(
    store: Store, collection: str, vectors: np.ndarray, base: Filter, table: _Table, k: int
) -> list[tuple[str, float]]:
    """Ask the bounded pairs of the best candidates exactly, a batch a round, until the top `k`
    hold none."""
    m = len(vectors)
    batch = k + REFINE_EXTRA
    while True:
        ranked = table.ranking()
        if all(len(table.pairs[slide]) == m for slide, _ in ranked[:k]):
            return ranked
        # The best-ranked slides that still hold bounds; twice as many each round, so that a
        # query whose bounds are loose needs few rounds (each round makes them exact).
        pending = [slide for slide, _ in ranked if len(table.pairs[slide]) < m][:batch]
        missing = [(slide, i) for slide in pending for i in range(m) if i not in table.pairs[slide]]
        batch *= 2
        flts = [Filter((*base.must, Condition("slide_id", "eq", slide))) for slide, _ in missing]
        rows = vectors[[i for _, i in missing]]
        found = store.query_batch(collection, rows, k=1, flts=flts, payload_fields=PAIR_FIELDS)
        for (slide, i), hits in zip(missing, found, strict=True):
            if hits:
                table.add(i, hits)
            else:  # no tile of the slide passes the filter for this row: the slide cannot match it
                table.pairs[slide][i] = Hit("", -1.0, {"slide_id": slide})


def _matches(
    store: Store, collection: str, query: SlideQuery, table: _Table, top: list[tuple[str, float]]
) -> list[SlideMatch]:
    """The result rows; each slide's payload is read from its best-matching tile."""
    out = []
    best_ids = []
    for rank, (slide, score) in enumerate(top, start=1):
        pairs = [
            TilePair(query.tiles[i], hit.id, hit.score, hit.payload.get("x"), hit.payload.get("y"))
            for i, hit in table.pairs[slide].items()
            if hit.id
        ]
        pairs.sort(key=lambda p: (-p.score, p.id))
        out.append(SlideMatch(rank, slide, score, pairs, {}))
        if pairs:
            best_ids.append(pairs[0].id)
    payloads = {h.id: h.payload for h in store.retrieve(collection, best_ids)}
    for match in out:
        if match.matched_tiles:
            match.payload = slide_payload(payloads.get(match.matched_tiles[0].id, {}))
    return out
