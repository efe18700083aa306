"""`conchdb annotations add DIR`: a pathologist's QuPath annotations onto the stored tiles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from conchdb.cli.app import Options, app, err_console, handles_errors, out_console, print_json, uses_options
from conchdb.cli.search import JsonOpt

annotations_app = typer.Typer(help="Pathologists' annotations (QuPath GeoJSON) on stored tiles.",
                              no_args_is_help=True)
app.add_typer(annotations_app, name="annotations")


@annotations_app.command("add")
@handles_errors
@uses_options(store=True, collection=True)
def annotations_add(
    options: Options,
    folder: Annotated[Path, typer.Argument(help="QuPath GeoJSON exports, one per slide, named after it.")],
    slide_key: Annotated[
        str, typer.Option("--slide-key", help="The slide field that the file names give (slide_id, or a column).")
    ] = "slide_id",
    as_json: JsonOpt = False,
) -> None:
    """Give every stored tile at least half inside an annotated region the field `annotation`
    (the region's class), so that `--where annotation=tumor` searches only annotated tissue.
    Bad files are refused with their reason; the others still apply (exit 3 if any was refused)."""
    from conchdb.archive.annotations import add_annotations

    with options.open_store() as store:
        results = add_annotations(store, options.collection_name, folder, slide_key=slide_key)
    refused = [r for r in results if r.error]
    if as_json:
        print_json({"files": [r.to_dict() for r in results], "applied": len(results) - len(refused),
                    "refused": len(refused)})
    else:
        for r in results:
            if r.error:
                err_console.print(f"[red]refused[/] {r.file}: {r.error}", highlight=False, soft_wrap=True)
            else:
                classes = ", ".join(f"{name} {n}" for name, n in r.labelled.items()) or "no tile inside"
                out_console.print(f"{r.slide_id}: {classes} (of {r.tiles} tiles)", highlight=False, soft_wrap=True)
    if refused:
        raise typer.Exit(3)
