"""A stand-in for a Qdrant server: the read side of Qdrant's REST API, over `QdrantClient(":memory:")`.

No Qdrant server binary can be had on these machines, and qdrant-client's local mode is
in-process: `:memory:` lives in one process, and a folder (`path=`) is locked by the first
process that opens it. So for tests where several processes share one server store
(`serve --workers N`), this serves, over HTTP in a thread of the test process, the
endpoints a server store reads through (listing and describing collections, count, query,
retrieve, scroll), answering as Qdrant does (`{"result", "status", "time"}`), with the
request bodies parsed by qdrant-client's own models and the answers made by its local mode.
Writes are not served (the test fills the local client directly); an endpoint it lacks
answers 501 naming itself, so a test that reaches one says what to add.
"""

from __future__ import annotations

import threading
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import UnexpectedResponse


def _ok(result: Any) -> JSONResponse:
    if hasattr(result, "model_dump"):
        result = result.model_dump(mode="json")
    elif isinstance(result, list):
        result = [r.model_dump(mode="json") if hasattr(r, "model_dump") else r for r in result]
    return JSONResponse({"result": result, "status": "ok", "time": 0.0})


def standin_app(local: QdrantClient) -> FastAPI:
    """The REST app over `local` (local mode takes one caller at a time: a lock serializes them)."""
    app = FastAPI()
    lock = threading.Lock()

    def missing(name: str) -> JSONResponse:
        return JSONResponse({"status": {"error": f"Not found: Collection `{name}` doesn't exist!"}, "time": 0.0},
                            status_code=404)

    @app.get("/collections")
    def collections() -> JSONResponse:
        with lock:
            return _ok(local.get_collections())

    @app.get("/collections/{name}/exists")
    def exists(name: str) -> JSONResponse:
        with lock:
            return _ok({"exists": local.collection_exists(name)})

    @app.get("/collections/{name}")
    def collection(name: str) -> JSONResponse:
        with lock:
            if not local.collection_exists(name):
                return missing(name)
            return _ok(local.get_collection(name))

    @app.post("/collections/{name}/points/count")
    async def count(name: str, request: Request) -> JSONResponse:
        body = models.CountRequest.model_validate(await request.json())
        with lock:
            return _ok(local.count(name, count_filter=body.filter, exact=body.exact is not False))

    @app.post("/collections/{name}/points/query")
    async def query(name: str, request: Request) -> JSONResponse:
        body = models.QueryRequest.model_validate(await request.json())
        with lock:
            return _ok(local.query_points(
                name, query=body.query, using=body.using, prefetch=body.prefetch, query_filter=body.filter,
                search_params=body.params, score_threshold=body.score_threshold, limit=body.limit or 10,
                offset=body.offset, with_payload=body.with_payload if body.with_payload is not None else True,
                with_vectors=body.with_vector or False,
            ))

    @app.post("/collections/{name}/points/scroll")
    async def scroll(name: str, request: Request) -> JSONResponse:
        body = models.ScrollRequest.model_validate(await request.json())
        with lock:
            points, offset = local.scroll(
                name, scroll_filter=body.filter, limit=body.limit or 10, offset=body.offset,
                with_payload=body.with_payload if body.with_payload is not None else True,
                with_vectors=body.with_vector or False, order_by=body.order_by,
            )
        return _ok({"points": [p.model_dump(mode="json") for p in points], "next_page_offset": offset})

    @app.post("/collections/{name}/points")
    async def retrieve(name: str, request: Request) -> JSONResponse:
        body = models.PointRequest.model_validate(await request.json())
        with lock:
            return _ok(local.retrieve(name, ids=body.ids, with_payload=body.with_payload is not False,
                                      with_vectors=body.with_vector or False))

    @app.api_route("/{path:path}", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    def other(path: str, request: Request) -> JSONResponse:
        return JSONResponse({"status": {"error": f"the stand-in does not serve {request.method} /{path}"}},
                            status_code=501)

    @app.exception_handler(UnexpectedResponse)
    async def unexpected(request: Request, exc: UnexpectedResponse) -> JSONResponse:
        return JSONResponse({"status": {"error": str(exc)}}, status_code=exc.status_code or 500)

    return app
