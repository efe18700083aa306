"""`conchdb texts add`: the texts that `describe` ranks against an image."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from conchdb.cli.app import Options, app, handles_errors, out_console, print_json, uses_options
from conchdb.cli.search import JsonOpt

texts_app = typer.Typer(help="Texts that images are described with (image -> text).", no_args_is_help=True)
app.add_typer(texts_app, name="texts")


@texts_app.command("add")
@handles_errors
@uses_options(store=True, collection=True, model=True)
def texts_add(
    options: Options,
    file: Annotated[Path, typer.Argument(help="A .txt file (one text per line) or a .csv with a `text` column.")],
    as_json: JsonOpt = False,
) -> None:
    """Embed captions, report sentences or terms into the texts collection that `describe` ranks."""
    from conchdb.catalog import texts_collection
    from conchdb.search.texts import add_texts, read_text_file

    texts = read_text_file(file)  # a bad file fails before the model loads
    opened = options.open_store()
    try:
        encoder = options.load_encoder(("text",))
        target = texts_collection(options.collection_name)
        written = add_texts(texts, encoder, opened, target)
        total = opened.count(target)
    finally:
        opened.close()
    if as_json:
        print_json({"file": str(file), "collection": target, "added": written, "total": total})
        return
    message = f"added {written} texts from {file} to '{target}' ({total} in all)"
    out_console.print(message, highlight=False, soft_wrap=True)

