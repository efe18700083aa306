"""`conchdb serve`: the HTTP API and web page over one store, one collection and one model.

The store and the model (both towers) are opened here, once, before the server listens, so
a store held by an ingest or weights that do not load fail at start with their message and
exit 2, instead of on the first request. Serving on an address other than loopback needs an
API key: otherwise anyone who can reach the port could read the store's slides.

`--workers N` runs N server processes on one port (uvicorn's), each with its own store
client and model, for a Qdrant server only: the embedded store is held by one process. They
are started from an import string (`worker_app`), so what this process parsed reaches them
as one environment variable (`PLAN_ENV`); the store is opened here first, to fail before
any worker starts, and a worker that cannot open its model stops them all and says why here.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from conchdb.cli.app import Options, app, err_console, handles_errors, load_settings, uses_options
from conchdb.errors import ConchdbError

if TYPE_CHECKING:
    from fastapi import FastAPI

    from conchdb.api import ApiSettings
    from conchdb.store import Store

PLAN_ENV = "CONCHDB_SERVE_PLAN"
"""What `serve --workers N` hands its worker processes: the options and settings as JSON (not a
setting to set by hand)."""


@app.command()
@handles_errors
@uses_options(store=True, collection=True, model=True)
def serve(
    options: Options,
    host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
    api_key: Annotated[
        str | None,
        typer.Option("--api-key", help="Key every request but /v1/health must send (or CONCHDB_API_KEY)."),
    ] = None,
    admin_key: Annotated[
        str | None,
        typer.Option("--admin-key", help="Key that DELETE /v1/slides/... needs (or CONCHDB_ADMIN_KEY); "
                                         "without one, nothing is deleted over HTTP."),
    ] = None,
    cors_origin: Annotated[
        list[str], typer.Option("--cors-origin", help="A browser origin allowed to call the API; repeat.")
    ] = [],  # noqa: B006
    max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="Largest upload, in MB.")] = 20.0,
    workers: Annotated[
        int, typer.Option("--workers", help="Server processes, each with its own model; more than 1 needs a "
                                            "Qdrant server (--qdrant-url or CONCHDB_QDRANT_URL).")
    ] = 1,
    image_batch: Annotated[
        int | None, typer.Option("--image-batch", help="Most image queries encoded as one batch (1: one at a time; "
                                                       "default: 8 on a GPU, 1 on a CPU, where batches do not pay).")
    ] = None,
) -> None:
    """Serve the HTTP API (/v1, docs at /docs) and the search page (/) over a store."""
    settings = build_settings(host, api_key or options.settings.api_key, tuple(cors_origin), max_upload_mb,
                              admin_key=admin_key or options.settings.admin_key, image_batch=image_batch)
    if workers < 1:
        raise ConchdbError(f"--workers is {workers}", "give 1 or more server processes", parameter="workers")
    if workers == 1:
        run(options, host, port, settings)
    else:
        run_workers(options, host, port, settings, workers)


def build_settings(
    host: str, api_key: str | None, cors: tuple[str, ...], max_upload_mb: float, *, admin_key: str | None = None,
    image_batch: int | None = None,
) -> ApiSettings:
    """The server's `ApiSettings`, refusing a non-loopback bind without a key, and an admin key
    that is empty or the same as the search key (a search client could then delete)."""
    from conchdb.api import ApiSettings, is_loopback

    if api_key is not None and not api_key.strip():
        raise ConchdbError("the API key is empty", "give a secret, e.g. from `openssl rand -hex 24`",
                           parameter="api_key")
    if admin_key is not None and (not admin_key.strip() or admin_key == api_key):
        raise ConchdbError("the admin key is empty or the same as the search key",
                           "give the admin key a secret of its own, e.g. from `openssl rand -hex 24`",
                           parameter="admin_key")
    if not is_loopback(host) and not api_key:
        raise ConchdbError(
            f"refusing to serve on {host} without an API key: anyone who can reach it could read the store",
            "set an API key (or CONCHDB_API_KEY), or serve on 127.0.0.1",
            parameter="api_key",
        )
    if not 0 < max_upload_mb <= 1000:
        raise ConchdbError(f"the upload limit {max_upload_mb} MB is outside (0, 1000]", "e.g. 20",
                           parameter="max_upload_mb")
    return ApiSettings(api_key=api_key or None, admin_key=admin_key or None, cors_origins=cors,
                       max_upload_bytes=int(max_upload_mb * 1e6), image_batch=image_batch)


def open_app(options: Options, settings: ApiSettings, *, close_store: bool = False) -> tuple[FastAPI, Store]:
    """The store the options name, the model, and the app over them (the store is closed again
    if the model or the app fails)."""
    from conchdb.api import create_app
    from conchdb.search import Searcher

    opened = options.open_store()
    try:
        encoder = options.load_encoder(("vision", "text"))
        searcher = Searcher(encoder, opened, options.collection_name, cache_dir=options.cache_dir)
        if opened.collection_metadata(options.collection_name) is not None:
            opened.warm(options.collection_name)  # its pages are read while the server starts
        return create_app(searcher, settings, close_store=close_store), opened
    except BaseException:
        opened.close()
        raise


def _announce(location: str, options: Options, host: str, port: int, settings: ApiSettings, workers: int = 1) -> None:
    key = " (API key required)" if settings.api_key else ""
    processes = f" in {workers} processes" if workers > 1 else ""
    err_console.print(f"serving {location}, collection '{options.collection_name}', on "
                      f"http://{host}:{port}{key}{processes}", highlight=False)


def run(options: Options, host: str, port: int, settings: ApiSettings) -> None:
    """Open the store and the model, then serve until interrupted."""
    import uvicorn

    application, opened = open_app(options, settings)
    _announce(opened.location, options, host, port, settings)
    try:
        uvicorn.run(application, host=host, port=port, log_level="info", lifespan="on")
    finally:
        opened.close()


def run_workers(options: Options, host: str, port: int, settings: ApiSettings, workers: int) -> None:
    """`workers` server processes over a Qdrant server; refused over the embedded store."""
    import uvicorn

    url = options.server_url
    if url is None:
        raise ConchdbError(
            f"--workers {workers} needs a Qdrant server, but the store is the embedded one at "
            f"{options.store or options.settings.store_path}: one process holds it (its lock), so a second "
            "server process could not open it",
            "serve it with --workers 1, or copy it to a Qdrant server (`conchdb copy --to-qdrant-url URL`) and "
            "serve that with --qdrant-url URL (or CONCHDB_QDRANT_URL)",
            parameter="workers",
        )
    options.open_store().close()  # an unreachable server fails here, before any worker starts
    with tempfile.TemporaryDirectory(prefix="conchdb-serve-") as tmp:
        failure = Path(tmp) / "failure.json"
        plan = {
            "options": {"qdrant_url": url, "collection": options.collection, "checkpoint": options.checkpoint,
                        "tokenizer": None if options.tokenizer is None else str(options.tokenizer),
                        "device": options.device, "precision": options.precision},
            "settings": dataclasses.asdict(settings),
            "failure": str(failure),
        }
        os.environ[PLAN_ENV] = json.dumps(plan)
        _announce(f"Qdrant server {url}", options, host, port, settings, workers)
        try:
            uvicorn.run("conchdb.cli.serve:worker_app", factory=True, host=host, port=port, workers=workers,
                        log_level="info", lifespan="on")
        finally:
            os.environ.pop(PLAN_ENV, None)
        if failure.exists():
            error = json.loads(failure.read_text())
            raise ConchdbError(f"a server process could not start: {error['message']}", error["fix"],
                               parameter=error["parameter"])


def worker_app() -> FastAPI:
    """The app of one process of `serve --workers N` (uvicorn calls it in each): it opens its
    own store client and model from the plan its parent left in `PLAN_ENV`. One that cannot
    writes why for the parent and exits with uvicorn's start-up failure, which stops the rest
    (any other exit would have uvicorn start it again, and again)."""
    plan = json.loads(os.environ[PLAN_ENV])
    options = Options(load_settings(), **plan["options"])
    given: dict[str, Any] = plan["settings"]
    from conchdb.api import ApiSettings

    settings = ApiSettings(**{**given, "cors_origins": tuple(given["cors_origins"])})
    try:
        return open_app(options, settings, close_store=True)[0]
    except ConchdbError as exc:
        from uvicorn.config import STARTUP_FAILURE

        Path(plan["failure"]).write_text(json.dumps({"message": exc.message, "fix": exc.fix,
                                                     "parameter": exc.parameter}))
        err_console.print(f"error: {exc.message}", highlight=False)
        sys.exit(STARTUP_FAILURE)
