"""`create_app(searcher, settings)`: the FastAPI application that `conchdb serve` runs.

The app takes an open `Searcher` (its store and model opened once, by the caller) and the
server's `ApiSettings`; nothing here reads the environment, so tests build apps with any
store, model and limits. Routers are per concern; every error leaves as
`{"error", "field", "fix"}` (see `errors`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI
from fastapi.middleware.cors import CORSMiddleware

from conchdb.api import errors, page
from conchdb.api.auth import require_key
from conchdb.api.routes import search, slides, system
from conchdb.api.service import Service
from conchdb.api.settings import ApiSettings
from conchdb.api.uploads import BodyLimit
from conchdb.search.searcher import Searcher

DESCRIPTION = """Content-based retrieval over a conchdb store: text -> tiles, image -> tiles,
image -> texts, zero-shot classification, and the pixels of stored tiles and slides.
With an API key set, send it as `Authorization: Bearer KEY` or `X-API-Key: KEY`."""


def create_app(searcher: Searcher, settings: ApiSettings | None = None, *, close_store: bool = False) -> FastAPI:
    """The application over `searcher`; `close_store` closes the searcher's store at shutdown."""
    settings = settings or ApiSettings()
    service = Service(searcher, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        service.close()
        if close_store:
            service.raw_store.close()

    app = FastAPI(title="conchdb", version="1", description=DESCRIPTION, lifespan=lifespan)
    app.state.settings = settings
    app.state.service = service
    errors.install(app)
    keyed = [Depends(require_key)]
    app.include_router(system.open_router)
    app.include_router(system.router, dependencies=keyed)
    app.include_router(search.router, dependencies=keyed)
    app.include_router(slides.router, dependencies=keyed)
    app.include_router(page.router)
    page.mount_static(app)
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "X-API-Key", "Content-Type"],
            expose_headers=["X-Score-Low", "X-Score-High"],
        )
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes)
    return app
