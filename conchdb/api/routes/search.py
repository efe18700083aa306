"""Searches: text -> tiles, image -> tiles, image -> texts, zero-shot classification.

Image endpoints take either JSON (a stored point or slide region) or a multipart upload
(the `image` file, with the other fields as form fields; `filters` as JSON text), so that
one endpoint serves a LIMS sending ids and a browser sending a dropped file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from PIL import Image
from pydantic import BaseModel, ValidationError

from conchdb.api import schemas
from conchdb.api.errors import ApiError, validation_error
from conchdb.api.service import Service, hit_dict
from conchdb.api.uploads import IMAGE_FIX, decode_image
from conchdb.search import prompts
from conchdb.search.zeroshot import DEFAULT_KS

router = APIRouter(prefix="/v1", tags=["search"])
T = TypeVar("T")

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": schemas.ErrorBody, "description": text}
    for status, text in {
        400: "the body cannot be parsed", 401: "no or wrong API key", 404: "an id names nothing stored",
        409: "the store refuses",
        413: "the upload is too large", 415: "the upload is not an image", 422: "the request is not valid",
        503: "the model or the collection is not available",
    }.items()
}


def _service(request: Request) -> Service:
    return request.app.state.service


def _form_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The multipart form of an image endpoint: the upload and the model's scalar fields."""
    properties: dict[str, Any] = {"image": {"type": "string", "format": "binary", "description": "The image."}}
    for name, info in model.model_fields.items():
        if name in ("point_id", "slide_id", "x", "y", "w", "h"):
            continue
        properties[name] = {"type": "string", "description": (info.description or name) + " (form text)"}
    return {"type": "object", "properties": properties, "required": ["image"]}


def _body(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}, "multipart/form-data": {"schema": _form_schema(model)}},
        }
    }


async def _image_request(request: Request, model: type[BaseModel]) -> tuple[Any, Image.Image | None]:
    """The validated options of an image endpoint and the uploaded pixels (None for JSON)."""
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    limits = request.app.state.settings
    if kind == "application/json":
        try:
            data = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise ApiError(422, "the body is not valid JSON", "send a JSON object", field="body") from None
        return _validate(model, data), None
    if kind != "multipart/form-data":
        raise ApiError(415, f"content type '{kind or 'none'}' is not accepted",
                       "send application/json (a stored point or region) or multipart/form-data (an upload)",
                       field="content-type")
    form = await request.form(max_files=1, max_fields=64, max_part_size=limits.max_upload_bytes)
    upload = form.get("image")
    if upload is None or isinstance(upload, str):
        raise ApiError(422, "the multipart form has no file field 'image'", IMAGE_FIX, field="image")
    data = await upload.read()
    fields: dict[str, Any] = {}
    for name in model.model_fields:
        values = [v for v in form.getlist(name) if isinstance(v, str)]
        if not values or name in ("point_id", "slide_id", "x", "y", "w", "h"):
            continue
        if name in ("filters", "prompts", "topk", "more", "less"):
            try:
                fields[name] = json.loads(values[0])
            except ValueError:
                raise ApiError(422, f"{name}: the form field is not valid JSON", "send it as JSON text",
                               field=name) from None
        elif name == "labels":
            fields[name] = values
        else:
            fields[name] = values[0]
    options = _validate(model, fields)
    pixels = await run_in_threadpool(decode_image, data, limits.max_pixels)
    return options, pixels


def _validate(model: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise ApiError(422, "the body must be a JSON object", "send a JSON object", field="body")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc.errors(), model) from None


async def _run(service: Service, request: Request, run: Callable[[], T], *, model: bool) -> T:
    """A request that uses the model on the service's threads (`Service.model_route`); one that
    does not (a search by stored point, unsteered by concepts) on Starlette's pool, like tiles."""
    return await (service.model_route(request, run) if model else run_in_threadpool(run))


def _concepts(body: Any) -> bool:
    return bool(getattr(body, "more", None) or getattr(body, "less", None))


def _response(service: Service, hits: list, top_k: int, page: int, modality: str = "image") -> dict[str, Any]:
    return {"hits": [hit_dict(h) for h in hits], "top_k": top_k, "page": page, "collection": service.collection,
            "noise_floor": service.noise_floor(modality)}


@router.post("/search/text", response_model=schemas.SearchResponse, responses=ERRORS)
async def search_text(body: schemas.TextSearch, request: Request) -> dict[str, Any]:
    """Tiles that look like a text: `{"query": "tumor necrosis", "top_k": 10, "filters": {...}}`;
    `more` / `less` (`[{"text", "weight"}]`) steer it by concept."""
    service = _service(request)

    def run() -> dict[str, Any]:
        opts = service.options(body.top_k, body.page, body.filters, body.min_score, body.group_by, body.group_size)
        vector = service.steered(service.text_vector(body.query, body.ensemble), more=body.more, less=body.less)
        return _response(service, service.search(vector, opts, modality="text"), body.top_k, body.page, "text")

    return await service.model_route(request, run)


@router.post("/search/refine", response_model=schemas.SearchResponse, responses=ERRORS)
async def search_refine(body: schemas.RefineSearch, request: Request) -> dict[str, Any]:
    """A search again, steered: the query (`query` text, or `point_id`, or `slide_id` with
    `x, y, w, h`), moved toward the hits in `like` and away from those in `unlike` (Rocchio's
    update in CONCH space) and by `more` / `less` concepts; the marked hits are left out."""
    service = _service(request)

    def run() -> dict[str, Any]:
        opts = service.options(body.top_k, body.page, body.filters, body.min_score, body.group_by, body.group_size)
        query = body.model_dump()
        if body.query is not None:
            if any(query.get(k) is not None for k in ("point_id", "slide_id")):
                raise ApiError(422, "give one query: a text, a point_id or a slide region", "send one of them",
                               field="query")
            vector = service.text_vector(body.query, body.ensemble)
        else:
            vector = service.image_vector(query, None)
        vector = service.steered(vector, more=body.more, less=body.less, like=body.like, unlike=body.unlike)
        modality = "text" if body.query is not None else "image"
        hits = service.search(vector, opts, exclude=[*body.like, *body.unlike], modality=modality)
        return _response(service, hits, body.top_k, body.page, modality)

    model = body.query is not None or body.slide_id is not None or _concepts(body)
    return await _run(service, request, run, model=model)


@router.post("/search/slide", response_model=schemas.SlideSearchResponse, responses=ERRORS)
def search_slide(body: schemas.SlideSearch, request: Request) -> dict[str, Any]:
    """Stored slides like a stored slide: `{"slide_id": "case01.svs", "exclude_same": ["patient_id"]}`."""
    service = _service(request)
    size, matches = service.search_slides(body.slide_id, body.top_k, body.filters, body.exclude_same, body.candidates)
    return {"slide_id": body.slide_id, "mosaic_tiles": size, "results": [m.to_dict() for m in matches]}


@router.post("/search/image", response_model=schemas.SearchResponse, responses=ERRORS,
             openapi_extra=_body(schemas.ImageSearch))
async def search_image(request: Request) -> dict[str, Any]:
    """Tiles that look like an image: an upload, `{"point_id"}`, or `{"slide_id", "x", "y", "w", "h"}`."""
    service = _service(request)
    body, pixels = await _image_request(request, schemas.ImageSearch)

    def run() -> dict[str, Any]:
        opts = service.options(body.top_k, body.page, body.filters, body.min_score, body.group_by, body.group_size)
        vector = service.steered(service.image_vector(body.model_dump(), pixels), more=body.more, less=body.less)
        return _response(service, service.search(vector, opts), body.top_k, body.page)

    model = pixels is not None or body.slide_id is not None or _concepts(body)
    return await _run(service, request, run, model=model)


@router.post("/describe", response_model=schemas.DescribeResponse, responses=ERRORS,
             openapi_extra=_body(schemas.Describe))
async def describe(request: Request) -> dict[str, Any]:
    """Texts that describe an image: the added texts collection, else the built-in vocabulary."""
    service = _service(request)
    body, pixels = await _image_request(request, schemas.Describe)

    def run() -> dict[str, Any]:
        vector = service.image_vector(body.model_dump(), pixels)
        return {"texts": [m.to_dict() for m in service.describe(vector, body.top_k)]}

    return await service.model_route(request, run)


def _classes(body: schemas.Classify, service: Service) -> list[prompts.ClassPrompts]:
    limits = service.settings
    if (body.labels is None) == (body.prompts is None):
        raise ApiError(422, "give the classes as 'labels' or as 'prompts' (one of them)",
                       'e.g. {"labels": ["tumor", "stroma"]}', field="labels")
    if body.labels is not None:
        if len(body.labels) > limits.max_labels or any(len(t) > limits.max_query_chars for t in body.labels):
            raise ApiError(422, f"at most {limits.max_labels} labels of {limits.max_query_chars} characters",
                           "give fewer or shorter labels", field="labels")
        return prompts.classes_from_labels(body.labels, body.ensemble)
    assert body.prompts is not None
    total = sum(len(v) for v in body.prompts.values())
    if len(body.prompts) < 2 or len(body.prompts) > limits.max_labels or total > limits.max_prompts:
        raise ApiError(422, f"prompts need 2 to {limits.max_labels} classes and at most {limits.max_prompts} "
                       "sentences", 'e.g. {"prompts": {"tumor": ["a photo of tumor"], "stroma": [...]}}',
                       field="prompts")
    classes = []
    for label, sentences in body.prompts.items():
        texts = tuple(s.strip() for s in sentences if s.strip())
        if not label.strip() or not texts or any(len(s) > limits.max_query_chars for s in texts):
            raise ApiError(422, f"class '{label}' needs a name and at least one sentence",
                           "give each class one or more sentences", field="prompts")
        classes.append(prompts.ClassPrompts(label.strip(), texts))
    return classes


@router.post("/classify", responses=ERRORS, openapi_extra=_body(schemas.Classify),
             response_model=schemas.ClassifyResponse | schemas.SlideClassifyResponse)
async def classify(request: Request) -> dict[str, Any]:
    """Zero-shot classes of an image (upload or point id), or MI-Zero over a stored slide's tiles
    (`{"slide_id", "labels"}` without x, y, w, h)."""
    service = _service(request)
    body, pixels = await _image_request(request, schemas.Classify)

    def run() -> dict[str, Any]:
        classes = _classes(body, service)
        query = body.model_dump()
        region = any(query.get(k) is not None for k in ("x", "y", "w", "h"))
        if body.slide_id is not None and not region and pixels is None:
            service.require_collection()
            from conchdb.api.filters import parse_filters

            flt = parse_filters(body.filters, service.searcher.field_types(), service.settings.max_filters)
            ks = body.topk or list(DEFAULT_KS)
            if any(k < 1 or k > 100_000 for k in ks):
                raise ApiError(422, "topk values must be between 1 and 100000", "e.g. [1, 5, 10]", field="topk")
            n_tiles, results = service.classify_slide(body.slide_id, classes, ks, flt)
            return {"slide_id": body.slide_id, "tiles": n_tiles, "results": [r.to_dict() for r in results]}
        vector = service.image_vector(query, pixels)
        return service.classify(vector, classes).to_dict()

    return await service.model_route(request, run)
