"""`conchdb slides` and `conchdb remove`: the stored slides, and taking them out of the store.

Thin like the other commands: the archive (`conchdb.archive.records`) finds and removes;
these parse and print. Removing asks for `--yes`: without it the command shows what it
would remove and changes nothing.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from conchdb.cli.app import Options, app, handles_errors, out_console, print_json, uses_options
from conchdb.errors import ConchdbError

WhereOpt = Annotated[list[str], typer.Option(
    "--where", help="A condition on the slide records' fields, e.g. diagnosis=benign; repeat for AND.")]
StatusOpt = Annotated[str | None, typer.Option(
    "--status", help="done, failed, in_progress, no_tissue, or missing (the slide file is gone).")]


def _selected(options: Options, store: Any, where: list[str], status: str | None,
              slide_ids: list[str]) -> list[dict[str, Any]]:
    from conchdb.archive import SlideCatalog
    from conchdb.archive.records import select
    from conchdb.search.filters import FieldTypes, parse_where

    catalog = SlideCatalog(store, options.collection_name)
    meta = store.collection_metadata(catalog.records_collection)
    if meta is None:
        raise ConchdbError(f"collection '{options.collection_name}' in {store.location} has no slide records",
                           fix="ingest or import slides first, or name the collection with --collection",
                           parameter="collection")
    schema = dict(meta.get("payload_schema") or {})
    flt = parse_where(where, FieldTypes(schema, declared=bool(schema))) if where else None
    return select(catalog, flt=flt, status=status, slide_ids=slide_ids)


@app.command()
@handles_errors
@uses_options(store=True, collection=True)
def slides(
    options: Options,
    where: WhereOpt = [],  # noqa: B006
    status: StatusOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """The stored slides: status, tiles, path and whether the file is still there, pixel size
    and its source, and the manifest's columns."""
    from conchdb.archive.records import listing

    store = options.open_store()
    try:
        rows = [listing(r) for r in _selected(options, store, where, status, [])]
    finally:
        store.close()
    if as_json:
        print_json({"collection": options.collection_name, "slides": rows})
        return
    from conchdb.cli.tables import print_slides

    print_slides(rows)


@app.command()
@handles_errors
@uses_options(store=True, collection=True)
def remove(
    options: Options,
    slide_ids: Annotated[list[str] | None, typer.Argument(
        help="Slide ids to remove (as `conchdb slides` lists them).", show_default=False)] = None,
    where: WhereOpt = [],  # noqa: B006
    missing: Annotated[bool, typer.Option("--missing", help="Remove the slides whose file is gone.")] = False,
    yes: Annotated[bool, typer.Option("--yes", help="Remove; without it, only show what would go.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Remove slides from the store: their tiles, records, mosaic marks and kept features (the
    slide files are not touched). Without --yes, shows what would be removed and changes nothing."""
    from conchdb.archive import SlideCatalog
    from conchdb.archive.records import listing

    ids = list(slide_ids or [])
    if not ids and not where and not missing:
        raise ConchdbError("nothing to remove was named",
                           fix="give slide ids, --where conditions or --missing", parameter="slide_ids")
    store = options.open_store()
    try:
        chosen = _selected(options, store, where, "missing" if missing else None, ids)
        catalog = SlideCatalog(store, options.collection_name)
        if yes:
            removed = [catalog.remove(r).to_dict() for r in chosen]
        else:
            removed = [{**listing(r), "tiles": catalog.count_tiles(r)} for r in chosen]
    finally:
        store.close()
    if as_json:
        print_json({"collection": options.collection_name, "removed": yes, "slides": removed})
        return
    verb = "removed" if yes else "would remove"
    total = sum(int(r.get("tiles") or 0) for r in removed)
    for r in removed:
        out_console.print(f"{verb} {r['slide_id']}  ({r['cohort']}, {r['tiling']}): {r['tiles']} tiles",
                          highlight=False, soft_wrap=True)
    out_console.print(f"{verb} {len(removed)} slide record(s) and {total} tiles"
                      + ("" if yes or not removed else "; run again with --yes to remove them"), highlight=False)
