"""`conchdb import-features` and `conchdb export`: bring TRIDENT/CLAM features in, take them out for MIL.

Registered on the main app by `register(app)`; parsing and rendering only, the work is in
`conchdb.features`. The commands are defined inside `register`, with the shared options
imported there from the app's module, so either module can be imported first (hence no
`from __future__ import annotations`: typer reads the annotations as objects).
"""

from pathlib import Path
from typing import Annotated, Any

import typer


def register(app: typer.Typer) -> None:
    """Add the feature commands to the `conchdb` app."""
    from conchdb.cli import (
        CheckpointOpt,
        CollectionOpt,
        DeviceOpt,
        PrecisionOpt,
        QdrantUrlOpt,
        StoreOpt,
        WhereOpt,
        err_console,
        handles_errors,
        load_encoder,
        load_settings,
        open_store_from_options,
        out_console,
    )

    @app.command("import-features")
    @handles_errors
    def import_features_command(
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
        store: StoreOpt = None,
        qdrant_url: QdrantUrlOpt = None,
        collection: CollectionOpt = None,
        checkpoint: CheckpointOpt = None,
        device: DeviceOpt = None,
        precision: PrecisionOpt = None,
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

        from conchdb.errors import ConchdbError
        from conchdb.features.files import FORMATS
        from conchdb.features.importer import FeatureImport, ImportOptions, plan_import

        if fmt not in FORMATS:
            raise ConchdbError(f"--format {fmt!r} is not a known layout", hint="use --format trident or --format clam")
        options = ImportOptions(fmt, slides, patches, None, cohort, force)
        plan = plan_import(path, options, manifest)  # every input is checked before the model loads
        encoder = load_encoder(checkpoint, None, device, precision, need_tokenizer=False)
        opened, name = open_store_from_options(store, qdrant_url, collection)
        if keep_raw:
            # Beside the embedded store's collections, or in the data folder for a server.
            folder = getattr(opened, "path", None)
            options.raw_dir = (Path(folder) if folder is not None else load_settings().home) / "features"
        from conchdb.cli import _ingest_progress

        try:
            with _ingest_progress(enabled=not as_json) as progress:
                summary = FeatureImport(plan, encoder, opened, name, progress).run()
        finally:
            opened.close()
        doc = summary.to_dict()
        if as_json:
            typer.echo(json.dumps(doc))
        else:
            _print_import_summary(doc, out_console)
        raise typer.Exit(summary.exit_code)

    @app.command("export")
    @handles_errors
    def export_command(
        slide_ids: Annotated[list[str] | None, typer.Argument(help="Slide ids to export (or --all).")] = None,
        out: Annotated[Path | None, typer.Option("--out", help="Folder to write one .h5 per slide into.")] = None,
        all_slides: Annotated[bool, typer.Option("--all", help="Every finished slide of the collection.")] = False,
        raw: Annotated[
            bool, typer.Option("--raw", help="Pre-projection features (kept by import-features) instead.")
        ] = False,
        fmt: Annotated[str, typer.Option("--format", help="File layout: trident.")] = "trident",
        where: WhereOpt = [],  # noqa: B006
        store: StoreOpt = None,
        qdrant_url: QdrantUrlOpt = None,
        collection: CollectionOpt = None,
        as_json: Annotated[bool, typer.Option("--json", help="Print the result as one JSON object.")] = False,
    ) -> None:
        """Write stored tiles as TRIDENT feature files (features, coords and TRIDENT's attributes) for MIL code.

        Exit status: 0 when every slide was written, 3 when some could not be (named), 2 for bad options.
        """
        import json

        from conchdb.errors import ConchdbError
        from conchdb.features.export import export_features
        from conchdb.search import Searcher

        if out is None:
            raise ConchdbError("no output folder given", hint="add --out DIR")
        if bool(slide_ids) == all_slides:
            raise ConchdbError("give slide ids or --all (one of them)", hint="e.g. conchdb export --all --out DIR")
        opened, name = open_store_from_options(store, qdrant_url, collection)
        try:
            searcher = Searcher(None, opened, name)
            flt = searcher.parse_where(where) if where else None
            summary = export_features(opened, name, out, slide_ids or None, raw=raw, where=flt, fmt=fmt)
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


def _print_import_summary(doc: dict[str, Any], console: Any) -> None:
    lines = [
        ("store", f"{doc['store']}  (collection {doc['collection']})"),
        ("files", f"{doc['feature_files']} {doc['source']} file(s): {doc['ingested']} imported, "
                  f"{doc['skipped']} already done, {doc['no_tissue']} without patches, {len(doc['failed'])} refused"),
        ("tiles", f"{doc['tiles_written']} written in {doc['seconds']:.1f} s"),
    ]
    if doc["not_feature_files"]:
        lines.append(("other", f"{doc['not_feature_files']} file(s) passed over"))
    if doc["manifest"]:
        lines.append(("manifest", f"{doc['manifest']}: {len(doc['manifest_rows_unmatched'])} row(s) naming no "
                                  f"slide, {len(doc['slides_without_manifest_row'])} slide(s) without a row"))
    missing = doc["slides_without_slide_file"]
    if missing:
        lines.append(("no slide", f"{len(missing)} slide(s) without their slide file: stored with the level-0 "
                                  "patch size and magnification of the file, pixel size unknown, no tile images "
                                  "or heatmaps (import again with the slides folder): " + ", ".join(missing)))
    for name, value in lines:
        console.print(f"{name:<9} {value}", highlight=False, soft_wrap=True)
    for failure in doc["failed"]:
        console.print(f"[red]refused[/] {failure['error']}", highlight=False, soft_wrap=True)
