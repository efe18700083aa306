"""`conchdb copy`: a store's collections into another folder or onto a Qdrant server, and back."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from conchdb.cli.app import Options, app, err_console, handles_errors, out_console, print_json, uses_options
from conchdb.errors import ConchdbError, StoreError

ToOpt = Annotated[Path | None, typer.Option("--to", help="Copy into the embedded store in this folder.")]
ToQdrantUrlOpt = Annotated[
    str | None,
    typer.Option("--to-qdrant-url", help="Copy onto this Qdrant server (its key: $CONCHDB_COPY_QDRANT_API_KEY)."),
]


@app.command("copy")
@handles_errors
@uses_options(store=True)
def copy_store_command(
    options: Options,
    to: ToOpt = None,
    to_qdrant_url: ToQdrantUrlOpt = None,
    collection: Annotated[
        str | None,
        typer.Option("--collection", help="Copy this tiles collection and its slide records and texts only."),
    ] = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Points per write.")] = 1000,
    sample: Annotated[int, typer.Option("--sample", help="Points per collection compared after the copy.")] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
) -> None:
    """Copy every collection of the store (tiles, slide records, texts, with their model and
    tiling records) into another embedded store or a Qdrant server.

    Resumable: a rerun writes only the points the target lacks or holds with another
    payload. The copy is checked at the end (point counts, and a sample of payloads and
    vectors). Exit status 0 when the copy is complete and checked, 2 otherwise.
    """
    from conchdb.store.base import store_identity
    from conchdb.store.copy import copy_store

    if (to is None) == (to_qdrant_url is None):
        raise ConchdbError(
            "give one place to copy to" if to is None else "a folder and a server were both given to copy to",
            "give the folder of an embedded store, or the URL of a Qdrant server, not both",
            parameter="to",
        )
    target_flag = "to" if to is not None else "to_qdrant_url"
    source = open_source(options)
    try:
        if source.identity == store_identity(path=to, url=to_qdrant_url):
            raise StoreError(f"refusing to copy {source.location} onto itself",
                             fix="give another folder or another Qdrant server to copy to", parameter=target_flag)
        try:
            target = open_target(options, to, to_qdrant_url)
            try:
                with copy_progress(enabled=not as_json) as on_progress:
                    summary = copy_store(source, target, collection=collection, batch_size=batch_size,
                                         sample=sample, on_progress=on_progress)
            finally:
                target.close()
        except StoreError as exc:
            raise about_target(exc, target_flag) from exc.__cause__
    finally:
        source.close()
    doc = summary.to_dict()
    if as_json:
        print_json(doc)
        return
    print_copy_summary(doc)


def open_source(options: Options) -> Any:
    """The store to copy from; an embedded store must exist (opening a missing folder would create it)."""
    url = options.qdrant_url or (None if options.store is not None else options.settings.qdrant_url)
    path = options.store or options.settings.store_path
    if not url and not path.is_dir():
        raise StoreError(f"there is no store at {path}", fix="give the folder of the store to copy from",
                         parameter="store")
    return options.open_store()


def open_target(options: Options, path: Path | None, url: str | None) -> Any:
    """The store to copy into: a folder (made if missing), or a server with the copy's API key
    (`CONCHDB_COPY_QDRANT_API_KEY`, else `CONCHDB_QDRANT_API_KEY`) and the cluster settings."""
    from conchdb.store import open_store
    from conchdb.store.copy import target_errors

    settings = options.settings
    with target_errors():
        return open_store(path, url, settings.copy_qdrant_api_key or settings.qdrant_api_key,
                          shard_number=settings.qdrant_shards, replication_factor=settings.qdrant_replicas)


TARGET_FIXES = {
    ("to_qdrant_url", "qdrant_api_key"): "set CONCHDB_COPY_QDRANT_API_KEY to the key of the server copied to",
    ("to_qdrant_url", "qdrant_url"): "start that server (docker compose up qdrant), or check its URL",
    ("to", "qdrant_url"): "wait for that process to finish (or stop it), or copy into another folder",
}
"""Fixes that the stores word for their own settings (the source's URL, key and folder),
reworded for the store copied to: (flag given, parameter of the store's error) -> fix."""


def about_target(exc: StoreError, flag: str) -> StoreError:
    """An error the copy marked as the target's (`target`), named by the flag the user gave,
    with a fix about the target where the store's own fix is about the source's settings."""
    if exc.parameter != "target":
        return exc
    cause = exc.__cause__.parameter if isinstance(exc.__cause__, StoreError) else None
    fix = TARGET_FIXES.get((flag, cause or ""), exc.fix)
    return StoreError(exc.message, fix, parameter=flag, exit_code=exc.exit_code)


@contextlib.contextmanager
def copy_progress(*, enabled: bool) -> Iterator[Any]:
    """A rich bar per collection, fed by the copy's progress callback (None when disabled)."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    bar = Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(), console=err_console, transient=False,
    )
    tasks: dict[str, tuple[Any, float]] = {}

    def on_progress(name: str, done: int, total: int) -> None:
        if name not in tasks:
            tasks[name] = (bar.add_task(name, total=total, rate=""), time.perf_counter())
        task, start = tasks[name]
        rate = done / max(time.perf_counter() - start, 1e-9)
        bar.update(task, completed=done, rate=f"{rate:,.0f} points/s" if done else "")

    with bar:
        yield on_progress


def print_copy_summary(doc: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"{doc['source']} -> {doc['target']}", title_justify="left")
    for column in ("collection", "points", "copied", "already there", "rewritten", "checked"):
        table.add_column(column, justify="left" if column == "collection" else "right")
    for name, c in doc["collections"].items():
        table.add_row(name, *(str(c[k]) for k in ("points", "copied", "already_there", "rewritten", "checked")))
    out_console.print(table)
    rate = doc["points"] / doc["seconds"] if doc["seconds"] else 0.0
    out_console.print(f"{doc['points']} points in {doc['seconds']:.1f} s ({rate:,.0f} points/s), "
                      f"{doc['written']} written; the copy is checked", highlight=False, soft_wrap=True)
