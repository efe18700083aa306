"""`conchdb serve`: the HTTP API and web page over one store, one collection and one model.

The store and the model are opened here, once, before the server listens, so a store held
by an ingest or weights that do not load fail at start with their message and exit 2,
instead of on the first request. Serving on an address other than loopback needs an API
key: otherwise anyone who can reach the port could read the store's slides.

(No `from __future__ import annotations` here: typer reads the command's annotations, which
name options of `conchdb.cli` imported inside `register`.)
"""

from pathlib import Path
from typing import Annotated

import typer


def register(app: typer.Typer) -> None:
    """Add the `serve` command to the `conchdb` app."""
    from conchdb import cli

    @app.command()
    @cli.handles_errors
    def serve(
        host: Annotated[str, typer.Option("--host", help="Address to listen on.")] = "127.0.0.1",
        port: Annotated[int, typer.Option("--port", help="Port to listen on.")] = 8000,
        api_key: Annotated[
            str | None,
            typer.Option("--api-key", help="Key every request but /v1/health must send (or CONCHDB_API_KEY)."),
        ] = None,
        cors_origin: Annotated[
            list[str], typer.Option("--cors-origin", help="A browser origin allowed to call the API; repeat.")
        ] = [],  # noqa: B006
        max_upload_mb: Annotated[float, typer.Option("--max-upload-mb", help="Largest upload, in MB.")] = 20.0,
        store: cli.StoreOpt = None,
        qdrant_url: cli.QdrantUrlOpt = None,
        collection: cli.CollectionOpt = None,
        checkpoint: cli.CheckpointOpt = None,
        tokenizer: cli.TokenizerOpt = None,
        device: cli.DeviceOpt = None,
        precision: cli.PrecisionOpt = None,
    ) -> None:
        """Serve the HTTP API (/v1, docs at /docs) and the search page (/) over a store."""
        settings = build_settings(host, api_key or cli.load_settings().api_key, tuple(cors_origin), max_upload_mb)
        run(host, port, settings, store, qdrant_url, collection, checkpoint, tokenizer, device, precision)


def build_settings(host: str, api_key: str | None, cors: tuple[str, ...], max_upload_mb: float):  # noqa: ANN201
    """The server's `ApiSettings`, refusing a non-loopback bind without a key."""
    from conchdb.api import ApiSettings, is_loopback
    from conchdb.errors import ConchdbError

    if api_key is not None and not api_key.strip():
        raise ConchdbError("the API key is empty", "give --api-key a secret, e.g. from `openssl rand -hex 24`")
    if not is_loopback(host) and not api_key:
        raise ConchdbError(
            f"refusing to serve on {host} without an API key: anyone who can reach it could read the store",
            "set --api-key KEY (or CONCHDB_API_KEY), or serve on --host 127.0.0.1",
        )
    if not 0 < max_upload_mb <= 1000:
        raise ConchdbError(f"--max-upload-mb {max_upload_mb} is outside (0, 1000]", "e.g. --max-upload-mb 20")
    return ApiSettings(api_key=api_key or None, cors_origins=cors, max_upload_bytes=int(max_upload_mb * 1e6))


def run(
    host: str,
    port: int,
    settings,  # noqa: ANN001
    store: Path | None,
    qdrant_url: str | None,
    collection: str | None,
    checkpoint: str | None,
    tokenizer: Path | None,
    device: str | None,
    precision: str | None,
) -> None:
    """Open the store and the model, then serve until interrupted."""
    import uvicorn

    from conchdb import cli
    from conchdb.api import create_app
    from conchdb.search import Searcher

    opened, name = cli.open_store_from_options(store, qdrant_url, collection)
    try:
        encoder = cli.load_encoder(checkpoint, tokenizer, device, precision)
        searcher = Searcher(encoder, opened, name, cache_dir=cli.load_settings().home / "cache")
        app = create_app(searcher, settings)
    except BaseException:
        opened.close()
        raise
    cli.err_console.print(f"serving {opened.location}, collection '{name}', on http://{host}:{port}"
                          + (" (API key required)" if settings.api_key else ""), highlight=False)
    try:
        uvicorn.run(app, host=host, port=port, log_level="info", lifespan="on")
    finally:
        opened.close()
