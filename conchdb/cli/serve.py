"""`conchdb serve`: the HTTP API and web page over one store, one collection and one model.

The store and the model (both towers) are opened here, once, before the server listens, so
a store held by an ingest or weights that do not load fail at start with their message and
exit 2, instead of on the first request. Serving on an address other than loopback needs an
API key: otherwise anyone who can reach the port could read the store's slides.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from conchdb.cli.app import Options, app, err_console, handles_errors, uses_options
from conchdb.errors import ConchdbError

if TYPE_CHECKING:
    from conchdb.api import ApiSettings


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
) -> None:
    """Serve the HTTP API (/v1, docs at /docs) and the search page (/) over a store."""
    settings = build_settings(host, api_key or options.settings.api_key, tuple(cors_origin), max_upload_mb,
                              admin_key=admin_key or options.settings.admin_key)
    run(options, host, port, settings)


def build_settings(
    host: str, api_key: str | None, cors: tuple[str, ...], max_upload_mb: float, *, admin_key: str | None = None
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
                       max_upload_bytes=int(max_upload_mb * 1e6))


def run(options: Options, host: str, port: int, settings: ApiSettings) -> None:
    """Open the store and the model, then serve until interrupted."""
    import uvicorn

    from conchdb.api import create_app
    from conchdb.search import Searcher

    opened = options.open_store()
    try:
        encoder = options.load_encoder(("vision", "text"))
        searcher = Searcher(encoder, opened, options.collection_name, cache_dir=options.cache_dir)
        application = create_app(searcher, settings)
    except BaseException:
        opened.close()
        raise
    key = " (API key required)" if settings.api_key else ""
    err_console.print(f"serving {opened.location}, collection '{options.collection_name}', on "
                      f"http://{host}:{port}{key}", highlight=False)
    try:
        uvicorn.run(application, host=host, port=port, log_level="info", lifespan="on")
    finally:
        opened.close()
