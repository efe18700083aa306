"""What the routes call: one `Searcher`, its model and store opened once, shared by every request.

What runs where: requests that need the model (text and image queries, describe, classify,
heatmaps) run on the service's own threads (`model_route`), and each tower of the model runs
on a thread of its own (`batching.ModelRunner`), where text or image queries that arrive
together are encoded as one batch. Tiles, thumbnails, Deep Zoom, slide records and searches by stored
point run on Starlette's thread pool, which no model work holds, so they never wait for an
encode. The store, open slides and encoded images go through the guards of `shared`. Every
id a request gives is looked up in the store before any file is touched.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, TypeVar
from urllib.parse import quote

import numpy as np
from PIL import Image

from conchdb.api.batching import ClientGone, ModelRunner, Tower, run_while_connected
from conchdb.api.errors import ApiError
from conchdb.api.filters import parse_filters
from conchdb.api.settings import IMAGE_BATCH, ApiSettings
from conchdb.api.shared import BytesCache, SlideCache, shared_store
from conchdb.archive import Removal, SlideCatalog, file_state
from conchdb.errors import ConchdbError, SlideError
from conchdb.search import heatmap, prompts, regions, steer
from conchdb.search.searcher import Searcher, SearchHit
from conchdb.slides import output_size, read_region
from conchdb.store import Filter, Store

T = TypeVar("T")
JPEG_QUALITY = 90


def encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.convert("RGB").save(buffer, "JPEG", quality=JPEG_QUALITY)
    else:
        image.save(buffer, fmt)
    return buffer.getvalue()


def not_found(what: str, fix: str, field: str) -> ApiError:
    return ApiError(404, what, fix, field=field)


POINT_FIX = "search again and pick a tile from the results: a tile's id is the `id` of a search hit"


def check_point_id(point_id: str) -> str:
    """A point id as stored (a UUID); anything else cannot name a point."""
    try:
        return str(uuid.UUID(point_id))
    except (ValueError, AttributeError, TypeError):
        raise not_found(f"there is no tile with id '{point_id}'", POINT_FIX, "point_id") from None


@dataclass
class Options:
    """Search options after validation: what `Searcher.search` takes."""

    k: int
    offset: int
    flt: Filter
    min_score: float | None
    group_by: str | None
    group_size: int


class Service:
    """The server's one `Searcher` and the caches and locks around it."""

    def __init__(self, searcher: Searcher, settings: ApiSettings):
        if searcher.store is None:
            raise ConchdbError("the server needs a store", "open a store before serving")
        self.settings = settings
        self.raw_store = searcher.store
        # The server's own Searcher over the store as requests share it; the caller's is left as it was.
        self.searcher = replace(searcher, store=shared_store(searcher.store))
        self.collection = searcher.collection
        self.runner: ModelRunner | None = None
        encoder = searcher.encoder
        if encoder is not None:
            self.runner = ModelRunner({
                "text": Tower(encode=encoder.encode_texts, max_batch=settings.text_batch,
                              cache_size=settings.text_cache),
                "image": Tower(encode=lambda pixels: encoder.encode_pixels(_stack(pixels)),
                               max_batch=settings.image_batch or image_batch(encoder.device)),
            })
        self._model_requests = self._request_pool()
        self._text_floor_measured = False
        self.tiles = BytesCache(settings.tile_cache)
        self.pictures = BytesCache(256)
        self.slides = SlideCache(settings.open_slides)
        self.deepzoom = SlideCache(settings.open_slides)
        self._checked_model = False

    def _request_pool(self) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(self.settings.model_requests, thread_name_prefix="conchdb-request")

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()
        # A fresh pool (no threads until used): an app's lifespan may end and begin again.
        old, self._model_requests = self._model_requests, self._request_pool()
        old.shutdown(wait=False, cancel_futures=True)
        self.slides.close()
        self.deepzoom.close()

    async def model_route(self, request: Any, fn: Callable[[], T]) -> T:
        """`fn()` for a request that uses the model, on the service's own threads rather than
        Starlette's pool (which tiles and Deep Zoom need); a client that disconnects while it
        waits has its encodes dropped if they have not started (the answer is then a 499 that
        nobody reads)."""
        try:
            return await run_while_connected(request.receive, self._model_requests, fn)
        except ClientGone:
            raise ApiError(499, "the client went away before the answer was ready", "ask again") from None

    # -- readiness -----------------------------------------------------------------------

    @property
    def store(self) -> Store:
        return self.searcher.store  # type: ignore[return-value]

    def health(self) -> dict[str, Any]:
        meta = None
        try:
            meta = self.store.collection_metadata(self.collection)
            points = self.store.count(self.collection) if meta is not None else None
        except ConchdbError:
            points = None
        encoder = self.searcher.encoder
        ready = meta is not None and encoder is not None
        return {
            "status": "ok" if ready else "unavailable",
            "store": meta is not None,
            "model": encoder is not None,
            "collection": self.collection,
            "points": points,
            "model_fingerprint": encoder.fingerprint if encoder is not None else None,
            "process": os.getpid(),
        }

    def require_collection(self) -> dict[str, Any]:
        meta = self.store.collection_metadata(self.collection)
        if meta is None:
            raise ApiError(
                503, f"collection '{self.collection}' does not exist in {self.store.location}",
                "ingest slides into the store, or serve the collection that holds them",
            )
        return meta

    def require_model(self) -> ModelRunner:
        if self.searcher.encoder is None or self.runner is None:
            raise ApiError(503, "this server was started without the CONCH model", "start it with a checkpoint")
        if not self._checked_model:
            self.require_collection()
            self.searcher.check_model()
            self._checked_model = True
        return self.runner

    def text_vectors(self, texts: Sequence[str]) -> np.ndarray:
        """Unit vectors of texts, batched with other requests' on the text tower's thread, and cached."""
        return self.require_model().vectors("text", list(texts), keys=list(texts))

    # -- query vectors -------------------------------------------------------------------

    def text_vector(self, query: str, ensemble: bool = False) -> np.ndarray:
        self.require_model()
        text = query.strip()
        if not text:
            raise ApiError(422, "the text query is empty", "give a description, e.g. 'tumor necrosis'", field="query")
        if len(text) > self.settings.max_query_chars:
            raise ApiError(422, f"the query is longer than {self.settings.max_query_chars} characters",
                           "shorten it", field="query")
        if not ensemble:
            return self.text_vectors([text])[0]
        return prompts.normalize(self.text_vectors(prompts.fill(prompts.TEMPLATES, text)).mean(axis=0))

    def pixels_vector(self, pixels: Image.Image) -> np.ndarray:
        """An image's vector: preprocessed on this (the request's) thread, encoded on the model
        thread with the images of other requests that wait at the same time."""
        runner = self.require_model()
        assert self.searcher.encoder is not None
        return runner.vectors("image", [self.searcher.encoder.preprocess(pixels)])[0]

    def point_vector(self, point_id: str) -> np.ndarray:
        self.require_collection()
        pid = check_point_id(point_id)
        found = self.store.retrieve(self.collection, [pid], with_vectors=True)
        if not found or found[0].vector is None:
            raise not_found(f"there is no tile with id '{point_id}' in collection '{self.collection}'",
                            POINT_FIX, "point_id")
        return np.asarray(found[0].vector, dtype=np.float32)

    def region_pixels(self, slide_id: str, x: int, y: int, w: int, h: int) -> Image.Image:
        """A stored slide's level-0 rectangle at the collection's tile resolution."""
        record = self.slide_record(slide_id)
        target = self.searcher.target_mpp()

        def read(slide: Any) -> Image.Image:
            width, height = slide.dimensions
            if x + w > width or y + h > height:
                raise ApiError(422, f"region {x},{y},{w},{h} lies outside slide '{slide_id}' ({width}×{height})",
                               "give x, y, w, h in level-0 pixels inside the slide", field="x")
            out = output_size(slide, w, h, target)
            if max(out) > regions.MAX_REGION_PX:
                raise ApiError(422, f"region {w}×{h} level-0 px is {out[0]}×{out[1]} px at the tile resolution",
                               f"choose a region under {regions.MAX_REGION_PX} px a side at {target} µm/px",
                               field="w")
            return read_region(slide, x, y, w, h, out_size=out)

        return self._with_slide(record, read)

    def image_vector(self, query: dict[str, Any], pixels: Image.Image | None) -> np.ndarray:
        """The vector of exactly one of: an upload, a point id, a slide region."""
        region = [query.get(k) for k in ("x", "y", "w", "h")]
        given = [pixels is not None, query.get("point_id") is not None, query.get("slide_id") is not None]
        if sum(given) != 1:
            raise ApiError(422, "give exactly one image query", "upload an 'image' (multipart), or send "
                           '{"point_id"} or {"slide_id", "x", "y", "w", "h"}', field="image")
        if pixels is not None:
            return self.pixels_vector(pixels)
        if query.get("point_id") is not None:
            return self.point_vector(query["point_id"])
        if any(v is None for v in region):
            raise ApiError(422, "a slide region needs x, y, w and h (level-0 pixels)",
                           'send {"slide_id", "x", "y", "w", "h"}', field="x")
        self.require_model()
        return self.pixels_vector(self.region_pixels(query["slide_id"], *region))  # type: ignore[arg-type]

    # -- search --------------------------------------------------------------------------

    def options(self, top_k: int, page: int, filters: dict[str, Any] | None, min_score: float | None,
                group_by: str | None, group_size: int) -> Options:
        offset = (page - 1) * top_k
        if offset + top_k > self.settings.max_depth:
            raise ApiError(422, f"page {page} with top_k {top_k} is beyond the first {self.settings.max_depth} "
                           "results", "narrow the search with filters or min_score instead of paging deeper",
                           field="page")
        if top_k > self.settings.max_top_k:
            raise ApiError(422, f"top_k {top_k} is above {self.settings.max_top_k}",
                           f"give top_k between 1 and {self.settings.max_top_k}", field="top_k")
        self.require_collection()
        flt = parse_filters(filters, self.searcher.field_types(), self.settings.max_filters)
        if group_by is not None:
            key = {"slide": "slide_id"}.get(group_by, group_by)
            types = self.searcher.field_types()
            if types.declared and types.get(key) is None:
                raise ApiError(422, f"no field '{group_by}' to group by", "group by 'slide' or a payload field",
                               field="group_by")
        return Options(top_k, offset, flt, min_score, group_by, group_size)

    def search(self, vector: np.ndarray, opts: Options, *, exclude: Sequence[str] = (),
               modality: str = "image") -> list[SearchHit]:
        """`modality`: "text" for a query that began as words (its own noise floor, see
        `Searcher.noise_floor`), "image" otherwise."""
        self.noise_floor(modality)  # measured (text: with the model) on the text tower's thread, once
        return self.searcher.search(vector, opts.k, opts.flt, opts.min_score, opts.offset, opts.group_by,
                                    opts.group_size, exclude=exclude, modality=modality)

    def noise_floor(self, modality: str = "image") -> float | None:
        if modality == "text" and not self._text_floor_measured:
            floor = self.require_model().call(lambda: self.searcher.noise_floor(modality), "text")
            self._text_floor_measured = True  # the searcher keeps it; later calls need no model
        else:
            floor = self.searcher.noise_floor(modality)
        return None if floor is None else floor.value

    def steered(self, vector: np.ndarray, *, more: Sequence[Any] = (), less: Sequence[Any] = (),
                like: Sequence[str] = (), unlike: Sequence[str] = ()) -> np.ndarray:
        """The query moved by concepts (texts embedded through the batcher and its cache) and by
        examples (stored tiles by id; an unknown id is a 404 naming `like` or `unlike`)."""
        more_c = [steer.concept(c.text, c.weight, parameter="more") for c in more]
        less_c = [steer.concept(c.text, c.weight, parameter="less") for c in less]
        steer.check_concepts(more_c, less_c)
        steer.check_examples(like, unlike)
        out = np.asarray(vector, dtype=np.float32)
        if more_c or less_c:
            vectors = self.text_vectors([c.text for c in (*more_c, *less_c)])
            pairs = [(v, c.weight) for v, c in zip(vectors, (*more_c, *less_c), strict=True)]
            out = steer.add_concepts(out, pairs[: len(more_c)], pairs[len(more_c) :])
        if like or unlike:
            liked = [self._example(i, "like") for i in like]
            unliked = [self._example(i, "unlike") for i in unlike]
            dim = len(out)
            out = steer.rocchio(out, np.asarray(liked, dtype=np.float32).reshape(len(liked), dim),
                                np.asarray(unliked, dtype=np.float32).reshape(len(unliked), dim))
        return out

    def _example(self, point_id: str, field: str) -> np.ndarray:
        try:
            return self.point_vector(point_id)
        except ApiError as exc:
            raise ApiError(exc.status, exc.message, exc.fix, field=field) from None

    def search_slides(self, slide_id: str, k: int, filters: dict[str, Any] | None,
                      exclude_same: Sequence[str], candidates: int | None = None) -> tuple[int, list[Any]]:
        """Stored slides like a stored one: the query's mosaic size and the ranked slides
        (`candidates`: how many are scored exactly; None for the default)."""
        self.require_collection()
        self.slide_record(slide_id)
        flt = parse_filters(filters, self.searcher.field_types(), self.settings.max_filters)
        query = self.searcher.slide_query(slide_id)
        return len(query.tiles), self.searcher.search_slides(query, k, flt, exclude_same, candidates)

    def describe(self, vector: np.ndarray, k: int) -> list[Any]:
        return self.require_model().call(lambda: self.searcher.describe(vector, k), "text")

    def classify(self, vector: np.ndarray, classes: Sequence[prompts.ClassPrompts]) -> Any:
        return self.require_model().call(lambda: self.searcher.classify(vector, classes), "text")

    def classify_slide(self, slide_id: str, classes: Sequence[prompts.ClassPrompts], ks: Sequence[int],
                       flt: Filter) -> tuple[int, list[Any]]:
        self.slide_record(slide_id)
        return self.require_model().call(lambda: self.searcher.classify_slide(slide_id, classes, ks, flt), "text")

    # -- slides --------------------------------------------------------------------------

    @property
    def catalog(self) -> SlideCatalog:
        return SlideCatalog(self.store, self.collection)

    def slide_records(self, slide_id: str) -> list[dict[str, Any]]:
        """Every record of one slide id (one per cohort and tiling), done first; 404 when there is none."""
        records = self.catalog.records_of(slide_id)
        if not records:
            raise not_found(f"no slide '{slide_id}' in collection '{self.collection}'",
                            "slide ids are the `slide_id` of search hits, or of GET /v1/slides", "slide_id")
        return records

    def slide_record(self, slide_id: str) -> dict[str, Any]:
        return self.slide_records(slide_id)[0]

    def delete_slide(self, slide_id: str) -> list[Removal]:
        """Remove every stored copy of a slide; the caches forget its pictures."""
        removed = [self.catalog.remove(record) for record in self.slide_records(slide_id)]
        self.tiles.clear()
        self.pictures.clear()
        return removed

    def list_slides(self, page: int, page_size: int, filters: dict[str, Any] | None) -> tuple[list[dict], int]:
        from conchdb.search.filters import FieldTypes

        meta = self.store.collection_metadata(self.catalog.records_collection)
        if meta is None:
            return [], 0
        schema = meta.get("payload_schema") or {}
        flt = parse_filters(filters, FieldTypes(dict(schema), declared=bool(schema)), self.settings.max_filters)
        records = self.catalog.records(flt)
        start = (page - 1) * page_size
        return [public_record(r) for r in records[start : start + page_size]], len(records)

    def _with_slide(self, record: dict[str, Any], fn: Callable[[Any], T]) -> T:
        """`fn(slide)` on the record's source slide, opened with its stored pixel size; a file
        that is gone is a 404 that says where it was last seen."""
        if file_state(record) == "missing":
            raise not_found(f"the slide file of '{record.get('slide_id')}' is missing: last seen at "
                            f"{record.get('path')}",
                            "put the file back, or ingest the folder it is in now (a moved slide keeps its "
                            "tiles); `conchdb remove --missing` removes slides whose files are gone", "slide_id")
        key = (str(record.get("path")), record.get("mpp"))
        try:
            return self.slides.use(key, lambda: regions.open_source(record), fn)
        except SlideError as exc:
            fix = exc.fix if file_state(record) == "remote" else (
                "the slide file must stay where it was ingested from; ingest it again from its new place")
            raise not_found(exc.message, fix, "slide_id") from None

    def tile_jpeg(self, point_id: str) -> bytes:
        self.require_collection()
        pid = check_point_id(point_id)

        def make() -> bytes:
            found = self.store.retrieve(self.collection, [pid])
            if not found:
                raise not_found(f"there is no tile with id '{point_id}' in collection '{self.collection}'",
                                POINT_FIX, "point_id")
            payload = found[0].payload
            return encode(self._with_slide(payload, lambda s: regions.read_hit_tile(s, payload)), "JPEG")

        return self.tiles.get_or_make(pid, make)

    def thumbnail_jpeg(self, slide_id: str, size: int) -> bytes:
        record = self.slide_record(slide_id)
        return self.pictures.get_or_make(
            ("thumb", slide_id, size),
            lambda: encode(self._with_slide(record, lambda s: regions.thumbnail(s, size)[0]), "JPEG"),
        )

    def heatmap_png(self, slide_id: str, vector: np.ndarray, title: str, style: str, size: int,
                    flt: Filter) -> tuple[bytes, float, float]:
        """The slide's tiles tinted by similarity: a transparent overlay the viewer lays over the
        slide (`overlay`), or the CLI's picture with thumbnail, title and colour bar (`figure`);
        with the lowest and highest score, the ends of the palette (for a legend)."""
        record = self.slide_record(slide_id)
        tiles, scores = self.searcher.slide_similarity(slide_id, vector, flt)
        if style == "figure":
            thumb, downsample = self._with_slide(record, lambda s: regions.thumbnail(s, size))
            image, low, high = heatmap.render(thumb, downsample, tiles, scores, title)
            return encode(image, "PNG"), low, high
        width, height = self._with_slide(record, lambda s: s.dimensions)
        downsample = max(1.0, max(width, height) / size)
        shape = (max(1, round(height / downsample)), max(1, round(width / downsample)))
        layer = heatmap.score_layer(shape, tiles, np.asarray(scores, dtype=np.float64), downsample)
        low, high = float(np.min(scores)), float(np.max(scores))
        span = high - low if high > low else 1e-6
        covered = ~np.isnan(layer)
        rgba = np.zeros((*shape, 4), dtype=np.uint8)
        rgba[..., :3] = heatmap.colormap((np.nan_to_num(layer, nan=low) - low) / span)
        rgba[..., 3] = np.where(covered, 255, 0).astype(np.uint8)
        return encode(Image.fromarray(rgba, "RGBA"), "PNG"), low, high

    # -- deep zoom -----------------------------------------------------------------------

    def _deepzoom(self, slide_id: str, fn: Callable[[Any], T]) -> T:
        record = self.slide_record(slide_id)
        path = str(record.get("path"))

        def opener() -> Any:
            import openslide
            from openslide.deepzoom import DeepZoomGenerator

            slide: Any = None
            if file_state(record) != "remote":
                try:
                    slide = openslide.open_slide(path)
                except (OSError, openslide.OpenSlideError) as exc:
                    if not path.lower().endswith(".dcm"):  # a DICOM series OpenSlide refuses: wsidicom below
                        raise not_found(f"the file of slide '{slide_id}' cannot be opened ({type(exc).__name__})",
                                        "the slide file must stay where it was ingested from; ingest it again "
                                        "from its new place", "slide_id") from None
            if slide is None:  # DICOMweb, or DICOM through wsidicom: the same Slide that tiles and heatmaps read
                try:
                    slide = _ZoomSource(regions.open_source(record))
                except SlideError as exc:
                    raise not_found(exc.message, exc.fix or "", "slide_id") from None
            return _Zoom(slide, DeepZoomGenerator(slide, tile_size=254, overlap=1, limit_bounds=False))

        return self.deepzoom.use(path, opener, fn)

    def dzi(self, slide_id: str) -> str:
        return self._deepzoom(slide_id, lambda z: z.generator.get_dzi("jpeg"))

    def deepzoom_tile(self, slide_id: str, level: int, col: int, row: int) -> bytes:
        def read(zoom: _Zoom) -> bytes:
            try:
                tile = zoom.generator.get_tile(level, (col, row))
            except ValueError:
                raise not_found(f"no deep-zoom tile {level}/{col}_{row} in slide '{slide_id}'",
                                "request the tiles that the slide's .dzi describes", "level") from None
            return encode(tile, "JPEG")

        return self.pictures.get_or_make(("dz", slide_id, level, col, row), lambda: self._deepzoom(slide_id, read))


def image_batch(device: Any) -> int:
    """The default largest image batch on `device` (see `IMAGE_BATCH`)."""
    return 1 if str(getattr(device, "type", device)) == "cpu" else IMAGE_BATCH


def _stack(pixels: Sequence[Any]) -> Any:
    import torch

    return torch.stack(list(pixels))


class _ZoomSource:
    """A conchdb `Slide` as the part of an OpenSlide slide that `DeepZoomGenerator` uses."""

    def __init__(self, slide: Any):
        self._slide = slide
        self.dimensions = slide.dimensions
        self.level_count = slide.level_count
        self.level_dimensions = slide.level_dimensions
        self.level_downsamples = slide.level_downsamples
        self.properties: dict[str, str] = {}

    def get_best_level_for_downsample(self, downsample: float) -> int:
        return int(self._slide.best_level(downsample, 0.0))

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> Image.Image:
        return self._slide.read_region(location, level, size).convert("RGBA")  # the generator composites by alpha

    def close(self) -> None:
        self._slide.close()


@dataclass
class _Zoom:
    slide: Any
    generator: Any

    def close(self) -> None:
        self.slide.close()


HIDDEN_RECORD_FIELDS = ("path", "identity")
"""Record fields that say where files are on the server: no client needs them, since files
are only ever served by id."""


def public_record(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in HIDDEN_RECORD_FIELDS}


def hit_urls(hit: SearchHit) -> dict[str, str]:
    """The URLs of a hit's tile image and of the viewer on its slide (relative to the server)."""
    slide = quote(str(hit.slide_id), safe="")
    return {"tile_url": f"/v1/tiles/{hit.id}.jpg", "viewer_url": f"/?slide={slide}&point={hit.id}"}


def hit_dict(hit: SearchHit) -> dict[str, Any]:
    """A hit as JSON, with its image URLs and `slide_file`: `present`, `missing` (the file is
    gone: its tile image and viewer answer 404 with the path last seen) or `none`."""
    out = {**hit.to_dict(), **hit_urls(hit), "slide_file": file_state(hit.payload)}
    if hit.tiles is not None:
        out["tiles"] = [hit_dict(t) for t in hit.tiles]
    return out

