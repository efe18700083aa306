"""`conchdb embed` and `conchdb model fetch`: vectors for files and texts, and the weights to make them."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from conchdb.cli.app import Options, app, err_console, handles_errors, load_settings, out_console, uses_options
from conchdb.errors import ConchdbError

model_app = typer.Typer(help="Manage the CONCH weights and tokenizer.", no_args_is_help=True)
app.add_typer(model_app, name="model")


@app.command()
@handles_errors
@uses_options(model=True)
def embed(
    options: Options,
    image: Annotated[list[Path], typer.Option("--image", help="An image file; repeat for more.")] = [],  # noqa: B006
    text: Annotated[list[str], typer.Option("--text", help="A text; repeat for more.")] = [],  # noqa: B006
    raw: Annotated[bool, typer.Option("--raw", help="Pre-projection image features instead.")] = False,
    fmt: Annotated[str, typer.Option("--format", help="json or npy.")] = "json",
    out: Annotated[Path | None, typer.Option("--out", help="Write here instead of stdout.")] = None,
) -> None:
    """Embed images and texts with CONCH: images first, then texts, in the order given."""
    import json
    import sys

    import numpy as np

    from conchdb.model.encoder import open_image

    if fmt not in ("json", "npy"):
        raise ConchdbError(f"unknown --format {fmt!r}", "use --format json or --format npy")
    if fmt == "npy" and out is None:
        raise ConchdbError("--format npy writes a binary file and needs --out FILE.npy", "add --out FILE.npy")
    if not image and not text:
        raise ConchdbError("nothing to embed", "give --image PATH and/or --text TEXT")
    images = [open_image(p) for p in image]  # every file checked before the model loads
    towers = [name for name, wanted in (("vision", images), ("text", text)) if wanted]
    encoder = options.load_encoder(towers, need_tokenizer=bool(text))
    vectors = [encoder.encode_images(images, raw=raw)] if images else []
    if text:
        vectors.append(encoder.encode_texts(text))
    matrix = np.concatenate(vectors).astype(np.float32)
    if fmt == "npy":
        np.save(out, matrix)
        err_console.print(f"wrote {matrix.shape[0]} x {matrix.shape[1]} to {out}")
        return
    inputs = [("image", str(p)) for p in image] + [("text", t) for t in text]
    doc = [
        {"kind": kind, "input": value, "embedding": [float(x) for x in vec]}
        for (kind, value), vec in zip(inputs, matrix, strict=True)
    ]
    payload = json.dumps(doc)
    if out is not None:
        out.write_text(payload + "\n")
    else:
        sys.stdout.write(payload + "\n")


@model_app.command("fetch")
@handles_errors
def model_fetch(
    weights: Annotated[bool, typer.Option(help="Download pytorch_model.bin (needs HF_TOKEN).")] = True,
    tokenizer_url: Annotated[
        str | None, typer.Option("--tokenizer-url", help="Where to fetch the tokenizer from.")
    ] = None,
) -> None:
    """Download the CONCH tokenizer (verified) and weights into $CONCHDB_HOME/models/conch/."""
    from conchdb.model.fetch import fetch_tokenizer, fetch_weights
    from conchdb.model.tokenizer import TOKENIZER_URL

    dest = load_settings().models_dir
    path = fetch_tokenizer(dest, tokenizer_url or TOKENIZER_URL)
    out_console.print(f"tokenizer: {path} (sha256 verified)")
    if weights:
        out_console.print(f"weights:   {fetch_weights(dest)}")
