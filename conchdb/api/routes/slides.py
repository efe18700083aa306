"""Pixels by id: tile JPEGs, slide records, thumbnails, heatmaps and Deep Zoom for the viewer.

No request names a file: a tile is found by its point id, a slide by its id in the store's
slide records, and the file is the one the record names. A slide id may hold slashes (it is
the slide's path relative to its cohort), so it is matched as a path; anything that is not
a stored id, `../../etc/passwd` included, is a 404 that read nothing.
"""

from __future__ import annotations

import json
from typing import Any, Literal
from urllib.parse import quote

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response

from conchdb.api import schemas
from conchdb.api.auth import require_admin
from conchdb.api.errors import ApiError
from conchdb.api.routes.search import ERRORS
from conchdb.api.service import Service, public_record

router = APIRouter(prefix="/v1", tags=["images and slides"])
CACHE = {"Cache-Control": "private, max-age=3600"}


def _service(request: Request) -> Service:
    return request.app.state.service


def _image(data: bytes, media: str) -> Response:
    return Response(data, media_type=media, headers=CACHE)


def _json_param(text: str | None, name: str) -> Any:
    if text is None or text == "":
        return None
    try:
        return json.loads(text)
    except ValueError:
        raise ApiError(422, f"{name} is not valid JSON", 'e.g. {"status": "done"}', field=name) from None


IMAGE = {"content": {"image/jpeg": {}}, "description": "JPEG image"}


@router.get("/tiles/{point_id}.jpg", response_class=Response, responses={200: IMAGE, **ERRORS})
def tile(point_id: str, request: Request) -> Response:
    """The tile's pixels, cut from its source slide at its stored resolution (cached)."""
    return _image(_service(request).tile_jpeg(point_id), "image/jpeg")


@router.get("/slides", response_model=schemas.SlidePage, responses=ERRORS)
def slides(
    request: Request,
    page: int = Query(1, ge=1, le=100_000),
    page_size: int = Query(50, ge=1, le=500),
    filters: str | None = Query(None, max_length=10_000, description='JSON filters, e.g. {"status": "done"}'),
) -> dict[str, Any]:
    """Slide records, by slide id, paged; `filters` over the records' fields."""
    records, total = _service(request).list_slides(page, page_size, _json_param(filters, "filters"))
    return {"slides": records, "total": total, "page": page, "page_size": page_size}


@router.get("/slides/{slide_id:path}/thumbnail.jpg", response_class=Response, responses={200: IMAGE, **ERRORS})
def thumbnail(slide_id: str, request: Request, size: int = Query(512, ge=32, le=4096)) -> Response:
    """The whole slide, its longer side `size` px."""
    return _image(_service(request).thumbnail_jpeg(slide_id, size), "image/jpeg")


@router.get("/slides/{slide_id:path}/heatmap.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}, "description": "PNG image"}, **ERRORS})
async def slide_heatmap(
    slide_id: str,
    request: Request,
    query: str = Query(min_length=1, max_length=schemas.MAX_QUERY_CHARS),
    ensemble: bool = False,
    style: Literal["overlay", "figure"] = "overlay",
    size: int = Query(1024, ge=64, le=4096),
    filters: str | None = Query(None, max_length=10_000),
) -> Response:
    """Similarity of each stored tile of the slide to a text: a transparent overlay the size of
    the slide's thumbnail (`overlay`, for the viewer), or a picture with a colour bar (`figure`)."""
    service = _service(request)

    def run() -> tuple[bytes, float, float]:
        service.slide_record(slide_id)
        from conchdb.api.filters import parse_filters

        flt = parse_filters(_json_param(filters, "filters"), service.searcher.field_types(),
                            service.settings.max_filters)
        vector = service.text_vector(query, ensemble)
        return service.heatmap_png(slide_id, vector, f"{slide_id}: {query}", style, size, flt)

    png, low, high = await service.model_route(request, run)
    # The scores at the palette's two ends (viridis, low to high), for the page's legend.
    return Response(png, media_type="image/png", headers={"X-Score-Low": f"{low:.6f}", "X-Score-High": f"{high:.6f}"})


GEOJSON = {"content": {"application/geo+json": {}}, "description": "A GeoJSON FeatureCollection QuPath imports"}


@router.get("/slides/{slide_id:path}/hits.geojson", response_class=Response, responses={200: GEOJSON, **ERRORS})
async def slide_hits_geojson(
    slide_id: str,
    request: Request,
    query: str = Query(min_length=1, max_length=schemas.MAX_QUERY_CHARS),
    top_k: int = Query(50, ge=1, le=1000),
    ensemble: bool = False,
    filters: str | None = Query(None, max_length=10_000),
) -> Response:
    """The slide's tiles nearest a text as a QuPath GeoJSON FeatureCollection: one annotation per
    hit, a polygon in level-0 pixels, classified as a hit (or a weak hit), its score measured.
    Drag the file onto the slide in QuPath."""
    from conchdb.search.geojson import hits_by_slide

    service = _service(request)

    def run() -> list[Any]:
        service.slide_record(slide_id)
        given = _json_param(filters, "filters") or {}
        if not isinstance(given, dict):
            raise ApiError(422, "filters must be a JSON object", 'e.g. {"site": "lung"}', field="filters")
        opts = service.options(top_k, 1, {**given, "slide_id": slide_id}, None, None, 3)
        return service.search(service.text_vector(query, ensemble), opts, modality="text")

    hits = await service.model_route(request, run)
    doc = hits_by_slide(hits).get(slide_id, {"type": "FeatureCollection", "features": []})
    return Response(json.dumps(doc), media_type="application/geo+json")


DZI = {"content": {"application/xml": {}}, "description": "Deep Zoom descriptor"}


@router.get("/slides/{slide_id:path}.dzi", response_class=Response, responses={200: DZI, **ERRORS})
def dzi(slide_id: str, request: Request) -> Response:
    """The slide's Deep Zoom descriptor; its tiles are at `{slide_id}_files/{level}/{col}_{row}.jpeg`."""
    return Response(_service(request).dzi(slide_id), media_type="application/xml")


@router.get("/slides/{slide_id:path}_files/{level}/{col}_{row}.jpeg", response_class=Response,
            responses={200: IMAGE, **ERRORS})
async def deepzoom_tile(slide_id: str, level: int, col: int, row: int, request: Request) -> Response:
    """One Deep Zoom tile (OpenSeadragon asks for them as the user pans and zooms)."""
    if min(level, col, row) < 0 or max(level, col, row) > 1_000_000:
        raise ApiError(404, f"no deep-zoom tile {level}/{col}_{row}", "request the tiles the .dzi describes",
                       field="level")
    data = await run_in_threadpool(_service(request).deepzoom_tile, slide_id, level, col, row)
    return _image(data, "image/jpeg")


@router.delete("/slides/{slide_id:path}", responses={**ERRORS, 403: {"model": schemas.ErrorBody,
                                                                      "description": "not the admin key"}},
               dependencies=[Depends(require_admin)])
def delete_slide(slide_id: str, request: Request) -> dict[str, Any]:
    """Remove a slide from the store: every stored copy's tiles, record, mosaic marks and
    kept features. Needs the admin key; the slide file itself is left alone."""
    removed = _service(request).delete_slide(slide_id)
    return {"slide_id": slide_id, "removed": [r.to_dict() for r in removed]}


@router.get("/slides/{slide_id:path}", response_model=schemas.SlideRecord, responses=ERRORS)
def slide(slide_id: str, request: Request) -> dict[str, Any]:
    """A slide's records (status, tiles, pixel size, manifest metadata) and its image URLs."""
    records = _service(request).slide_records(slide_id)
    quoted = quote(slide_id, safe="")
    return {
        "slide_id": slide_id,
        "records": [public_record(r) for r in records],
        "dzi_url": f"/v1/slides/{quoted}.dzi",
        "thumbnail_url": f"/v1/slides/{quoted}/thumbnail.jpg",
    }
