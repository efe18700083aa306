"""`Searcher`: the one search API that the CLI, the HTTP server and notebooks share.

It holds an encoder and a store, or the means to get them: used as a context manager
(`with Searcher(load_encoder=..., open_store=...) as searcher:`) it opens the store when a
query first needs it and closes it on exit, and loads the model only when a query embeds
something, and then only the tower that query needs (the text tower for a text, the
vision tower for an image; a search by stored point loads none). It turns queries into
vectors and vectors into ranked results:

- text -> tiles (optionally a prompt ensemble), image -> tiles (an image file, a slide
  region `path+x,y,w,h`, or a stored point id), with typed filters, grouping by slide,
  a minimum score, top-k and paging;
- image -> text, over a texts collection or, when none was filled, the built-in vocabulary;
- zero-shot classification of an image and MI-Zero for a slide's stored tiles.

Every query that embeds something first checks that the collection was built by the same
model: vectors from two models share a shape, not a meaning, so a mismatch would rank
nonsense silently.
"""

from __future__ import annotations

import difflib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from conchdb.archive import NoiseFloor, SlideCatalog, of_slide
from conchdb.archive.mosaic import choose_mosaic
from conchdb.archive.noise import measure_text_floor, sample_tiles
from conchdb.catalog import MOSAIC_FIELD, TILE_SCOPE_FIELDS, TILES_COLLECTION, texts_collection
from conchdb.errors import ConchdbError, QueryError
from conchdb.search import filters, prompts, regions, slide_search, steer, vocabulary, zeroshot
from conchdb.store import Condition, Filter, Hit, Store

if TYPE_CHECKING:
    from conchdb.model.encoder import Encoder

EncoderLoader = Callable[[frozenset[str]], "Encoder"]
"""Loads an encoder holding (at least) the named towers, "vision" and/or "text"."""
BOTH_TOWERS = frozenset({"vision", "text"})

MAX_TOP_K = 1000
MAX_DEPTH = 10_000
"""Deepest result reachable by paging (offset + top-k): deep pages of a nearest-neighbour
search are slow and rarely meaningful."""
DEFAULT_TARGET_MPP = 0.5
"""Resolution for slide-region queries when no collection says what its tiles were cut at."""
SCHEMA_SAMPLE = 256
"""Points read to infer payload types when the collection records no `payload_schema`."""
GROUP_ALIASES = {"slide": "slide_id"}


@dataclass
class SearchHit:
    """One ranked result: a tile, or with grouping a slide (its best tile, and `tiles`)."""

    rank: int
    score: float
    id: str
    payload: dict[str, Any]
    tiles: list[SearchHit] | None = None
    weak: bool | None = None
    """Below the collection's noise floor (None: the collection records none)."""

    @property
    def slide_id(self) -> Any:
        return self.payload.get("slide_id")

    @property
    def x(self) -> Any:
        return self.payload.get("x")

    @property
    def y(self) -> Any:
        return self.payload.get("y")

    @property
    def size(self) -> Any:
        return self.payload.get("size")

    def to_dict(self) -> dict[str, Any]:
        """The `--json` form: rank, score, id, slide_id, x, y, size, payload, weak (and tiles when grouped)."""
        out: dict[str, Any] = {
            "rank": self.rank,
            "score": self.score,
            "id": self.id,
            "slide_id": self.slide_id,
            "x": self.x,
            "y": self.y,
            "size": self.size,
            "payload": self.payload,
            "weak": self.weak,
        }
        if self.tiles is not None:
            out["tiles"] = [t.to_dict() for t in self.tiles]
        return out

    def flat(self) -> list[SearchHit]:
        """This hit's tiles: itself, or every tile of its group."""
        return [self] if self.tiles is None else list(self.tiles)


@dataclass
class TextMatch:
    """A text ranked for an image: from a texts collection, or from the built-in vocabulary."""

    rank: int
    score: float
    text: str
    source: str
    id: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "score": self.score,
            "text": self.text,
            "source": self.source,
            "id": self.id,
            "metadata": self.metadata,
        }


@dataclass
class Searcher:
    """Queries over one tiles collection of one store, embedded with one encoder.

    Either hand it what it uses, `Searcher(encoder, store, "conch_tiles")`, or how to get
    it, and use it as a context manager:

        with Searcher(collection="conch_tiles", load_encoder=load, open_store=open_it) as s:
            hits = s.search(s.query_vector(text="tumor"), 10)

    `open_store()` is called when a query first needs the store, which is closed on exit;
    a store handed in is left to its owner. `load_encoder(towers)` is called when a query
    first embeds something, with the towers it needs; `encoder` may stay None for searches
    by stored point, `store` for what needs none (classifying an image). `texts` is the
    texts collection (default `texts_collection(collection)`); `cache_dir` keeps the vocabulary's
    vectors between processes.
    """

    encoder: Encoder | None = None
    store: Store | None = None
    collection: str = TILES_COLLECTION
    texts: str | None = None
    cache_dir: Path | None = None
    load_encoder: EncoderLoader | None = field(default=None, repr=False)
    open_store: Callable[[], Store] | None = field(default=None, repr=False)
    _opened: Store | None = field(default=None, init=False, repr=False)
    _vocabulary: vocabulary.Vocabulary | None = field(default=None, init=False, repr=False)
    _types: filters.FieldTypes | None = field(default=None, init=False, repr=False)
    _text_floor: NoiseFloor | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.texts is None:
            self.texts = texts_collection(self.collection)

    def __enter__(self) -> Searcher:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the store if this searcher opened it (a store handed in stays open)."""
        if self._opened is not None:
            opened, self._opened = self._opened, None
            if self.store is opened:
                self.store = None
            opened.close()

    # -- plumbing ------------------------------------------------------------------------

    def _has_store(self) -> bool:
        return self.store is not None or self.open_store is not None

    def _store(self) -> Store:
        if self.store is None and self.open_store is not None:
            self.store = self._opened = self.open_store()
        if self.store is None:
            raise ConchdbError(
                "this query needs a store",
                fix="give an embedded store folder or a Qdrant server URL",
                parameter="store",
            )
        return self.store

    def _encoder(self, *towers: str) -> Encoder:
        """An encoder holding `towers` (any encoder when none are named), loaded on first need."""
        held: frozenset[str] = getattr(self.encoder, "towers", BOTH_TOWERS) if self.encoder is not None else frozenset()
        need = frozenset(towers)
        if self.encoder is not None and need <= held:
            return self.encoder
        if self.load_encoder is None:
            if self.encoder is None:
                raise ConchdbError(
                    "this query needs the CONCH model",
                    fix="give the checkpoint or set CONCHDB_CHECKPOINT",
                    parameter="checkpoint",
                )
            raise ConchdbError(f"this query needs the {' and '.join(sorted(need - held))} tower of the model")
        self.encoder = self.load_encoder(need | held or BOTH_TOWERS)
        return self.encoder

    def require_store(self) -> Store:
        """The store, opened now if it was not (for callers that read it directly: mosaics,
        evaluation)."""
        return self._store()

    def require(self, *towers: str) -> Encoder:
        """Load the model with `towers` now (one load when a query will need both)."""
        return self._encoder(*(towers or tuple(BOTH_TOWERS)))

    def metadata(self, collection: str | None = None) -> dict[str, Any]:
        """The collection's record metadata; an error naming the store when it does not exist."""
        store, name = self._store(), collection or self.collection
        meta = store.collection_metadata(name)
        if meta is None:
            raise ConchdbError(
                f"collection '{name}' does not exist in {store.location}",
                fix="ingest slides first (conchdb ingest), or choose another collection",
                parameter="collection",
            )
        return meta

    def check_model(self, collection: str | None = None, tower: str | None = None) -> None:
        """Refuse to compare this encoder's vectors with a collection built by another model.

        `tower` is the one the query will use, so that checking loads only that one."""
        name = collection or self.collection
        built_with = self.metadata(name).get("model_fingerprint")
        encoder = self._encoder(*((tower,) if tower else ()))
        used = encoder.fingerprint
        if built_with is not None and not encoder.answers_to(built_with):
            raise QueryError(
                f"collection '{name}' was built with model fingerprint {built_with}, "
                f"but the query would be embedded with model fingerprint {used}",
                fix="give the checkpoint that built the collection",
                parameter="checkpoint",
            )

    # -- query vectors -------------------------------------------------------------------

    def text_vector(self, query: str, ensemble: bool = False) -> np.ndarray:
        """A text query's unit vector; with `ensemble`, the mean over CONCH-style templates."""
        text = require_text(query)
        texts = prompts.fill(prompts.TEMPLATES, text) if ensemble else [text]
        return prompts.ensemble_vector(self._encoder("text"), texts)

    def target_mpp(self) -> float:
        """The tile resolution of the collection (for slide-region queries), or the ingest default."""
        if not self._has_store() or self._store().collection_metadata(self.collection) is None:
            return DEFAULT_TARGET_MPP
        tiling = self.metadata().get("tiling") or {}
        value = tiling.get("target_mpp") if isinstance(tiling, dict) else None
        return float(value) if isinstance(value, (int, float)) and value > 0 else DEFAULT_TARGET_MPP

    def load_image(self, image: str | Path | Image.Image, *, slide_mpp: float | None = None) -> Image.Image:
        """An image query as pixels: a PIL image, an image file, or a slide region `path+x,y,w,h`.

        A region of a stored slide is read at the pixel size recorded for it, which may have
        come from a manifest or an override rather than the file; `slide_mpp` (µm per level-0
        pixel) gives it for a slide the store does not hold, and beats a recorded one."""
        from conchdb.model.encoder import open_image

        if isinstance(image, str):
            region = regions.parse_region(image)
            if region is not None:
                source = "slide_mpp"
                if slide_mpp is None:
                    slide_mpp, source = self.recorded_mpp(region.path), "store"
                return regions.read_query_region(region, self.target_mpp(), slide_mpp, source)
        if slide_mpp is not None:
            raise QueryError(
                "a slide pixel size applies only to a slide region query (PATH+x,y,w,h)",
                fix="leave the slide pixel size out, or query a region of the slide",
                parameter="slide_mpp",
            )
        return open_image(image)

    def stored_region(self, spec: str) -> Image.Image:
        """`SLIDE_ID:x,y,w,h`: a level-0 rectangle of a stored slide, read from the file the
        store recorded for it, at the pixel size recorded for it, resized to the collection's
        tile resolution (what ingest would have embedded there)."""
        region = regions.parse_stored_region(spec)
        source = SlideCatalog(self._store(), self.collection).source_of(region.slide_id)
        if source is None or not source.get("path"):
            error = self._unknown_slide(region.slide_id, False)
            raise QueryError(error.message, fix=error.fix, parameter="region")
        mpp = source.get("mpp")
        try:
            return regions.read_query_region(
                regions.Region(Path(source["path"]), region.x, region.y, region.w, region.h), self.target_mpp(),
                float(mpp) if isinstance(mpp, (int, float)) else None, "store",
            )
        except QueryError as exc:
            raise QueryError(exc.message, fix=exc.fix, parameter="region") from None

    def recorded_mpp(self, path: str | Path) -> float | None:
        """The pixel size the store recorded for the slide file at `path` (its slide record,
        else its tiles), or None when the store does not hold it."""
        if not self._has_store() or self._store().collection_metadata(self.collection) is None:
            return None
        return SlideCatalog(self._store(), self.collection).recorded_mpp(path)

    def image_vector(self, image: str | Path | Image.Image, *, slide_mpp: float | None = None) -> np.ndarray:
        """An image query's unit vector (the image is read and checked before the model loads)."""
        pixels = self.load_image(image, slide_mpp=slide_mpp)
        return self._encoder("vision").encode_images([pixels])[0]

    def point(self, point_id: str, collection: str | None = None) -> Hit:
        """A stored point with its vector; an error when the collection has no such point."""
        name = collection or self.collection
        self.metadata(name)
        found = self._store().retrieve(name, [point_id], with_vectors=True)
        if not found or found[0].vector is None:
            raise QueryError(
                f"no point with id {point_id!r} in collection '{name}'",
                fix="point ids are the UUIDs that search results give as \"id\"",
                parameter="point",
            )
        return found[0]

    def point_vector(self, point_id: str) -> np.ndarray:
        vector = self.point(point_id).vector
        assert vector is not None
        return vector

    def query_vector(
        self,
        text: str | None = None,
        image: str | Path | Image.Image | None = None,
        point: str | None = None,
        ensemble: bool = False,
    ) -> np.ndarray:
        """The vector of exactly one of a text, an image or a stored point, for searching this
        collection (an embedded query is first checked against the collection's model)."""
        if sum(q is not None for q in (text, image, point)) != 1:
            raise QueryError("give exactly one query: a text, an image or a stored point")
        if point is not None:
            return self.point_vector(point)
        self.check_model(tower="text" if text is not None else "vision")
        return self.text_vector(text, ensemble) if text is not None else self.image_vector(image)  # type: ignore[arg-type]

    # -- search --------------------------------------------------------------------------

    def field_types(self) -> filters.FieldTypes:
        """Payload field types: the collection's `payload_schema` when recorded, else inferred
        from a sample of points."""
        if self._types is None:
            schema = self.metadata().get("payload_schema")
            if isinstance(schema, dict) and schema:
                self._types = filters.FieldTypes(dict(schema), declared=True)
            else:
                sample = itertools.islice(self._store().scroll(self.collection), SCHEMA_SAMPLE)
                self._types = filters.FieldTypes(filters.infer_types(h.payload for h in sample), declared=False)
        return self._types

    def parse_where(self, expressions: Sequence[str]) -> Filter:
        """`--where` expressions as a typed filter, checked against this collection's fields."""
        if not expressions:
            return Filter()
        return filters.parse_where(expressions, self.field_types())

    def search(
        self,
        vector: np.ndarray,
        k: int = 10,
        flt: Filter | None = None,
        min_score: float | None = None,
        offset: int = 0,
        group_by: str | None = None,
        group_size: int = 3,
        *,
        exclude: Sequence[str] = (),
        modality: str = "image",
    ) -> list[SearchHit]:
        """The tiles nearest to `vector`, best first; with `group_by`, the best slides (or other
        field values), each with up to `group_size` of its best tiles. Tiles in `exclude` (the
        ones a refined query was marked with) are left out. Each hit is marked `weak` when it
        scores below the collection's noise floor for the query's `modality` ("text" for a
        query that began as words, "image" otherwise; see `noise_floor`)."""
        check_limits(k, offset, min_score)
        store = self._store()
        self.metadata()
        skip = set(exclude)
        if group_by is None:
            if skip:  # ranked from the top, so that a page holds the same tiles with and without them
                found = store.query(self.collection, vector, k=offset + k + len(skip), flt=flt, min_score=min_score)
                hits = [h for h in found if h.id not in skip][offset : offset + k]
            else:
                hits = store.query(self.collection, vector, k=k, flt=flt, min_score=min_score, offset=offset)
            hits_out = [SearchHit(offset + i + 1, h.score, h.id, h.payload) for i, h in enumerate(hits)]
            return self._mark_weak(hits_out, modality)
        if not 1 <= group_size <= 100:
            raise QueryError(
                f"group size {group_size} is outside 1..100", fix="give a group size between 1 and 100",
                parameter="group_size",
            )
        key = GROUP_ALIASES.get(group_by, group_by)
        groups = store.query_groups(
            self.collection, vector, group_by=key, groups=offset + k + len(skip), group_size=group_size + len(skip),
            flt=flt, min_score=min_score,
        )
        kept = [kept for g in groups if (kept := [h for h in g.hits if h.id not in skip][:group_size])]
        kept.sort(key=lambda hits: -hits[0].score)
        out = []
        for i, group in enumerate(kept[offset : offset + k]):
            tiles = [SearchHit(j + 1, h.score, h.id, h.payload) for j, h in enumerate(group)]
            best = tiles[0]
            out.append(SearchHit(offset + i + 1, best.score, best.id, best.payload, tiles))
        return self._mark_weak(out, modality)

    def noise_floor(self, modality: str = "image") -> NoiseFloor | None:
        """The similarity below which a hit is no better than chance; None where the collection
        records no floor (one ingested before floors were measured).

        For image queries (an image, a region, a stored tile), the floor recorded at the end of
        each ingest: how close tiles of different slides come. For text queries, that bar would
        mark every hit weak, since a text and an image of the same thing score far lower than two
        images do; their floor is measured here, once per searcher, on the same kind of sample:
        how close the built-in vocabulary's histology terms come to the collection's tiles."""
        recorded = NoiseFloor.from_metadata(self.metadata())
        if modality != "text" or recorded is None:
            return recorded
        if self._text_floor is None:
            tiles = sample_tiles(self._store(), self.collection)
            vectors = np.stack([t.vector for t in tiles]) if tiles else np.zeros((0, 0), dtype=np.float32)
            self._text_floor = measure_text_floor(self.vocabulary().vectors, vectors, slides=recorded.slides)
        return self._text_floor

    def _mark_weak(self, hits: list[SearchHit], modality: str = "image") -> list[SearchHit]:
        floor = self.noise_floor(modality)
        for hit in hits:
            for one in (hit, *(hit.tiles or ())):
                one.weak = None if floor is None else bool(one.score < floor.value)
        return hits

    # -- steering --------------------------------------------------------------------------

    def steer(
        self,
        vector: np.ndarray,
        *,
        more: Sequence[steer.Concept] = (),
        less: Sequence[steer.Concept] = (),
        like: Sequence[str] = (),
        unlike: Sequence[str] = (),
    ) -> np.ndarray:
        """The query moved by concepts (their text vectors added or subtracted with their
        weights) and then by examples (Rocchio's update toward the liked stored tiles and away
        from the unliked): see `conchdb.search.steer`. Unchanged when nothing is given."""
        steer.check_concepts(more, less)
        steer.check_examples(like, unlike)
        out = np.asarray(vector, dtype=np.float32)
        if more or less:
            self.check_model(tower="text")
            texts = [c.text for c in (*more, *less)]
            vectors = self._encoder("text").encode_texts(texts)
            weights = [c.weight for c in (*more, *less)]
            pairs = list(zip(vectors, weights, strict=True))
            out = steer.add_concepts(out, pairs[: len(more)], pairs[len(more) :])
        if like or unlike:
            liked = self._example_vectors(like, "like")
            unliked = self._example_vectors(unlike, "unlike")
            out = steer.rocchio(out, liked, unliked)
        return out

    def _example_vectors(self, ids: Sequence[str], parameter: str) -> np.ndarray:
        """The stored vectors of marked tiles; an id naming no stored tile is an error."""
        if not ids:
            return np.zeros((0, 0), dtype=np.float32)
        found = {h.id: h for h in self._store().retrieve(self.collection, list(ids), with_vectors=True)}
        rows = []
        for point_id in ids:
            hit = found.get(_canonical(point_id))
            if hit is None or hit.vector is None:
                raise QueryError(
                    f"no tile with id {point_id!r} in collection '{self.collection}'",
                    fix="mark tiles by the \"id\" that search results give", parameter=parameter,
                )
            rows.append(hit.vector)
        return np.stack(rows)

    # -- image -> text -------------------------------------------------------------------

    def vocabulary(self) -> vocabulary.Vocabulary:
        """The built-in vocabulary's vectors for this encoder, embedded at most once."""
        if self._vocabulary is None:
            # Any tower gives the fingerprint; the text tower is loaded only if the cache misses.
            fingerprint = self._encoder().fingerprint
            self._vocabulary = vocabulary.load_vocabulary(_LazyText(self), fingerprint, self.cache_dir)
        return self._vocabulary

    def has_texts(self) -> bool:
        """Whether a texts collection exists here and holds any text."""
        if not self._has_store():
            return False
        store = self._store()
        if store.collection_metadata(self.texts) is None:
            return False
        return store.count(self.texts) > 0

    def describe(self, vector: np.ndarray, k: int = 10) -> list[TextMatch]:
        """The texts closest to an image vector: the texts collection's, or the vocabulary's."""
        check_limits(k, 0, None)
        if self.has_texts():
            assert self.texts is not None
            self.check_model(self.texts)
            hits = self._store().query(self.texts, vector, k=k)
            return [
                TextMatch(i + 1, h.score, str(h.payload.get("text", "")), self.texts, h.id,
                          {key: v for key, v in h.payload.items() if key != "text"})
                for i, h in enumerate(hits)
            ]
        vocab = self.vocabulary()
        scores = vocab.vectors @ np.asarray(vector, dtype=np.float32)
        order = np.argsort(-scores, kind="stable")[:k]
        return [
            TextMatch(rank + 1, float(scores[i]), vocab.terms[i], "vocabulary", None, {"kind": vocab.kinds[i]})
            for rank, i in enumerate(order)
        ]

    # -- zero-shot -----------------------------------------------------------------------

    def class_vectors(self, classes: Sequence[prompts.ClassPrompts]) -> np.ndarray:
        return prompts.class_vectors(self._encoder("text"), classes)

    def classify(self, image_vector: np.ndarray, classes: Sequence[prompts.ClassPrompts]) -> zeroshot.ClassScores:
        """Zero-shot probabilities of one image over `classes`."""
        labels = [c.label for c in classes]
        class_vectors = self.class_vectors(classes)
        return zeroshot.classify(image_vector, class_vectors, self._encoder().logit_scale, labels)

    def slide_tiles(self, slide_id: str, flt: Filter | None = None) -> list[Hit]:
        """Every stored tile of one slide, with vectors. An unknown slide id is an error that
        suggests close ids; tiles of several cohorts or tilings must be narrowed by a filter."""
        store = self._store()
        self.metadata()
        tiles = list(store.scroll(self.collection, of_slide(slide_id, *(flt.must if flt else ())), with_vectors=True))
        if not tiles:
            raise self._unknown_slide(slide_id, bool(flt))
        for name in TILE_SCOPE_FIELDS:
            values = sorted({str(t.payload[name]) for t in tiles if name in t.payload})
            if len(values) > 1:
                raise QueryError(
                    f"slide '{slide_id}' is stored with several values of '{name}': {', '.join(values)}",
                    fix=f"narrow it with a filter such as {name}={values[0]}",
                    parameter="where",
                )
        return tiles

    def _unknown_slide(self, slide_id: str, filtered: bool) -> QueryError:
        store = self._store()
        known = SlideCatalog(store, self.collection).known_ids()
        close = difflib.get_close_matches(slide_id, known, n=3)
        where = " matching the filter" if filtered else ""
        fix = f"did you mean {', '.join(close)}?" if close else "slide ids are the \"slide_id\" of search results"
        return QueryError(
            f"no tiles of slide '{slide_id}'{where} in collection '{self.collection}'", fix=fix, parameter="slide_id"
        )

    def classify_slide(
        self,
        slide_id: str,
        classes: Sequence[prompts.ClassPrompts],
        ks: Sequence[int] = zeroshot.DEFAULT_KS,
        flt: Filter | None = None,
    ) -> tuple[int, list[zeroshot.PooledScores]]:
        """MI-Zero over the slide's stored tile vectors (nothing is re-embedded): the number of
        tiles, and the pooled class scores for each k."""
        tiles = self.slide_tiles(slide_id, flt)  # an unknown slide fails before the model loads
        self.check_model(tower="text")
        vectors = np.stack([t.vector for t in tiles if t.vector is not None])
        labels = [c.label for c in classes]
        scale = self._encoder("text").logit_scale
        return len(tiles), zeroshot.mi_zero(vectors, self.class_vectors(classes), scale, labels, ks)

    # -- slide -> slides ------------------------------------------------------------------

    def slide_query(self, slide_id: str) -> slide_search.SlideQuery:
        """A stored slide as a query: its stored mosaic, or, for a slide stored before mosaics
        existed, one chosen now from its stored vectors (`mosaic_stored` is then False)."""
        store = self._store()
        self.metadata()
        marked = of_slide(slide_id, Condition(MOSAIC_FIELD, "eq", True))
        tiles = list(store.scroll(self.collection, marked, with_vectors=True))
        stored = bool(tiles)
        if not stored:
            every = self.slide_tiles(slide_id)  # unknown slide: an error with close ids
            chosen = set(choose_mosaic([t.id for t in every], np.stack([t.vector for t in every])))
            tiles = [t for t in every if t.id in chosen]
        for name in TILE_SCOPE_FIELDS:
            values = sorted({str(t.payload[name]) for t in tiles if name in t.payload})
            if len(values) > 1:
                raise QueryError(
                    f"slide '{slide_id}' is stored with several values of '{name}': {', '.join(values)}",
                    fix="search with the slide's file instead, or keep one copy of the slide per collection",
                    parameter="slide_id",
                )
        query_tiles = [
            slide_search.QueryTile(t.vector, t.payload.get("x"), t.payload.get("y"), t.payload.get("size"), t.id)
            for t in sorted(tiles, key=lambda t: t.id)
        ]
        payload = slide_search.slide_payload(tiles[0].payload)
        return slide_search.SlideQuery(query_tiles, slide_id, slide_id, payload, stored)

    def slide_file_query(
        self, path: str | Path, slide_mpp: float | None = None, readers: int = 0
    ) -> slide_search.SlideQuery:
        """A slide file that is not stored, tiled with the collection's tiling and embedded now."""
        from conchdb.search.slide_file import embed_slide_file, tiling_from_metadata

        self.check_model(tower="vision")
        params = tiling_from_metadata(self.metadata())
        embedded = embed_slide_file(path, self._encoder("vision"), params, slide_mpp=slide_mpp, readers=readers)
        keys = [f"{t.y:012d}:{t.x:012d}" for t in embedded.tiles]
        chosen = set(choose_mosaic(keys, embedded.vectors))
        size = embedded.grid.tile_size_level0
        query_tiles = [
            slide_search.QueryTile(vector, t.x, t.y, size)
            for key, t, vector in zip(keys, embedded.tiles, embedded.vectors, strict=True)
            if key in chosen
        ]
        payload = {"path": str(path), "mpp": embedded.mpp, "mpp_source": embedded.mpp_source, "size": size,
                   "target_mpp": params.target_mpp, "tile_px": params.tile_px}
        return slide_search.SlideQuery(query_tiles, str(path), None, payload, False)

    def search_slides(
        self,
        query: slide_search.SlideQuery,
        k: int = 10,
        flt: Filter | None = None,
        exclude_same: Sequence[str] = (),
        candidates: int | None = None,
    ) -> list[slide_search.SlideMatch]:
        """Stored slides ranked by how well they match the query slide's mosaic (see
        `conchdb.search.slide_search`; `candidates`, None for the default, trades speed for
        recall); the query
        slide itself is never among them."""
        check_limits(k, 0, None)
        self.metadata()
        return slide_search.rank_slides(self._store(), self.collection, query, k=k, flt=flt,
                                        exclude_same=exclude_same, candidates=candidates)

    def slide_similarity(
        self, slide_id: str, vector: np.ndarray, flt: Filter | None = None
    ) -> tuple[list[Hit], np.ndarray]:
        """Every stored tile of a slide and its cosine similarity to `vector` (for heatmaps)."""
        tiles = self.slide_tiles(slide_id, flt)
        vectors = np.stack([t.vector for t in tiles if t.vector is not None]).astype(np.float32)
        return tiles, vectors @ np.asarray(vector, dtype=np.float32)


def _canonical(point_id: str) -> str:
    """A point id as the store prints it (lowercase, hyphenated), or the text given."""
    import uuid

    try:
        return str(uuid.UUID(str(point_id)))
    except ValueError:
        return str(point_id)


def require_text(query: str | None) -> str:
    """The query stripped; an empty or blank query is an error (it would embed to noise)."""
    text = query.strip() if isinstance(query, str) else ""
    if not text:
        raise QueryError("the text query is empty", fix="give a description, e.g. 'tumor necrosis'", parameter="query")
    return text


def check_limits(k: int, offset: int, min_score: float | None) -> None:
    """Refuse a top-k outside 1..1000, a negative or too deep page, and a score outside [-1, 1]."""
    if not 1 <= k <= MAX_TOP_K:
        raise QueryError(
            f"top-k {k} is outside 1..{MAX_TOP_K}", fix=f"give a top-k between 1 and {MAX_TOP_K}", parameter="top_k"
        )
    if offset < 0 or offset + k > MAX_DEPTH:
        raise QueryError(
            f"page offset {offset} with top-k {k} is beyond the first {MAX_DEPTH} results",
            fix="narrow the search with a filter or a minimum score instead of paging deeper",
            parameter="page",
        )
    if min_score is not None and not -1.0 <= min_score <= 1.0:
        raise QueryError(
            f"minimum score {min_score} is not a cosine similarity",
            fix="give a value in [-1, 1]",
            parameter="min_score",
        )


@dataclass
class _LazyText:
    """What the vocabulary embeds with: the searcher's text tower, loaded only when called."""

    searcher: Searcher

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.searcher._encoder("text").encode_texts(texts)
