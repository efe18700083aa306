"""`conchdb import-features` and `conchdb export`: bring TRIDENT/CLAM features in, take them out for MIL."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from conchdb.cli.app import Options, app, err_console, handles_errors, out_console, uses_options
from conchdb.cli.ingest import _ingest_progress
from conchdb.cli.search import WhereOpt
from conchdb.cli.summaries import print_import_summary
from conchdb.errors import ConchdbError


@app.command("import-features")
@handles_errors
@uses_options(store=True, collection=True, model=True)
def import_features(
    options: Options,
    path: Annotated[Path, typer.Argument(help="Folder of feature files (TRIDENT job or CLAM feat_dir).")],
    fmt: Annotated[str, typer.Option("--format", help="trident or clam: the tool that wrote the files.")],
    slides: Annotated[
        Path | None, typer.Option("--slides", help="Folder of the slide files, joined by name (pixels, µm/px).")
    ] = None,
    patches: Annotated[
        Path | None, typer.Option("--patches", help="CLAM: the folder of create_patches_fp.py's patches/.")
    ] = None,
    manifest: Annotated[
        Path | None, typer.Option("--manifest", help="CSV with a 'slide' column (default: manifest.csv there).")
    ] = None,
    cohort: Annotated[str | None, typer.Option("--cohort", help="Cohort name (default: the folder name).")] = None,
    keep_raw: Annotated[
        bool, typer.Option("--keep-raw/--no-keep-raw", help="Keep the pre-projection features for export --raw.")
    ] = True,
    force: Annotated[bool, typer.Option("--force", help="Redo files already imported.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
) -> None:
    """Make CONCH v1 features from TRIDENT or CLAM searchable: project them with the checkpoint, no image read.

    Exit status: 0 when every file is in the store, 3 when some were refused (named in
    the summary) and the rest imported, 2 for bad options, folders, manifest or weights.
    """
    import json

    from conchdb.features.files import FORMATS
    from conchdb.features.importer import FeatureImport, ImportOptions, plan_import

    if fmt not in FORMATS:
        raise ConchdbError(f"--format {fmt!r} is not a known layout", "use --format trident or --format clam")
    settings = ImportOptions(fmt, slides, patches, None, cohort, force)
    plan = plan_import(path, settings, manifest)  # every input is checked before the model loads
    # The projection is the vision tower's; the fingerprint recorded is still the whole checkpoint's.
    encoder = options.load_encoder(("vision",), need_tokenizer=False)
    opened = options.open_store()
    if keep_raw:
        # Beside the embedded store's collections, or in the data folder for a server.
        folder = getattr(opened, "path", None)
        settings.raw_dir = (Path(folder) if folder is not None else options.settings.home) / "features"
    try:
        with _ingest_progress(enabled=not as_json) as progress:
            summary = FeatureImport(plan, encoder, opened, options.collection_name, progress).run()
    finally:
        opened.close()
    if as_json:
        typer.echo(json.dumps(summary.to_dict()))
    else:
        print_import_summary(summary.to_dict())
    raise typer.Exit(summary.exit_code)


@app.command("export")
@handles_errors
@uses_options(store=True, collection=True)
def export(
    options: Options,
    slide_ids: Annotated[list[str] | None, typer.Argument(help="Slide ids to export (or --all).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Folder to write one .h5 per slide into.")] = None,
    all_slides: Annotated[bool, typer.Option("--all", help="Every finished slide of the collection.")] = False,
    raw: Annotated[
        bool, typer.Option("--raw", help="Pre-projection features (kept by import-features) instead.")
    ] = False,
    fmt: Annotated[str, typer.Option("--format", help="File layout: trident.")] = "trident",
    where: WhereOpt = [],  # noqa: B006
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
) -> None:
    """Write stored tiles as TRIDENT feature files (features, coords and TRIDENT's attributes) for MIL code.

    Exit status: 0 when every slide was written, 3 when some could not be (named), 2 for bad options.
    """
    import json

    from conchdb.features.export import EXPORT_FORMATS, export_features
    from conchdb.search import Searcher

    if fmt not in EXPORT_FORMATS:
        raise ConchdbError(f"--format {fmt!r} is not an export layout", f"use --format {EXPORT_FORMATS[0]}")
    if out is None:
        raise ConchdbError("no output folder given", "give the folder to write into", parameter="out")
    if bool(slide_ids) == all_slides:
        raise ConchdbError("give slide ids or --all (one of them)", "e.g. conchdb export --all --out DIR")
    opened = options.open_store()
    try:
        flt = Searcher(None, opened, options.collection_name).parse_where(where) if where else None
        summary = export_features(opened, options.collection_name, out, slide_ids or None, raw=raw, where=flt,
                                  fmt=fmt)
    finally:
        opened.close()
    doc = summary.to_dict()
    if as_json:
        typer.echo(json.dumps(doc))
    else:
        written = doc["written"]
        out_console.print(
            f"wrote {len(written)} file(s) of {doc['features']} to {doc['folder']} "
            f"({sum(w['tiles'] for w in written)} tiles)",
            highlight=False, soft_wrap=True,
        )
        for failure in doc["failed"]:
            err_console.print(f"[red]not written[/] {failure['slide_id']}: {failure['error']}",
                              highlight=False, soft_wrap=True)
    raise typer.Exit(summary.exit_code)
