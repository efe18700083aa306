"""Is the server ready, what does its store hold, which fields can be filtered."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool

from conchdb.api import schemas
from conchdb.api.routes.search import ERRORS
from conchdb.api.service import Service

open_router = APIRouter(prefix="/v1", tags=["system"])
router = APIRouter(prefix="/v1", tags=["system"])


def _service(request: Request) -> Service:
    return request.app.state.service


@open_router.get("/health", response_model=schemas.Health)
async def health(request: Request) -> dict[str, Any]:
    """Whether the store holds the collection and the model is loaded (no key needed)."""
    return await run_in_threadpool(_service(request).health)


@router.get("/stats", responses=ERRORS)
def stats(request: Request) -> dict[str, Any]:
    """Collections, point counts, slides by status, model fingerprint, tiling (as `conchdb stats --json`)."""
    from conchdb.archive.stats import archive_stats

    return archive_stats(_service(request).store)


@router.get("/schema", response_model=schemas.Schema, responses=ERRORS)
def schema(request: Request) -> dict[str, Any]:
    """The payload fields that filters can test, with their types (the page builds its filter fields from it)."""
    service = _service(request)
    service.require_collection()
    types = service.searcher.field_types()
    fields = [{"name": k, "type": v} for k, v in sorted(types.types.items())]
    return {"collection": service.collection, "fields": fields, "declared": types.declared}


@router.get("/fields", response_model=schemas.Fields, responses=ERRORS)
def fields(request: Request) -> dict[str, Any]:
    """Each filterable field with its stored values and counts (keyword, bool, integer) or its
    range (numbers): what a filter form offers. Values match exactly, case included."""
    from conchdb.api.fields import field_summaries

    service = _service(request)
    service.require_collection()
    types = dict(service.searcher.field_types().types)
    return {"collection": service.collection, "fields": field_summaries(service.store, service.collection, types)}
