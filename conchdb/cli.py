"""The `conchdb` command line: parse options, call the package, print results.

Commands stay thin. Errors a user can cause arrive as `ConchdbError`, are printed
as one message with its fix, and exit with the error's code (2 for bad input);
nothing the user did wrong ends in a traceback.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from conchdb.errors import ConchdbError

app = typer.Typer(
    name="conchdb",
    help="A searchable vector database of tissue, built on CONCH and Qdrant.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
model_app = typer.Typer(help="Manage the CONCH weights and tokenizer.", no_args_is_help=True)
app.add_typer(model_app, name="model")

err_console = Console(stderr=True)
out_console = Console()

F = TypeVar("F", bound=Callable[..., Any])


def handles_errors(fn: F) -> F:
    """Turn a `ConchdbError` into a printed message and its exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConchdbError as exc:
            err_console.print(f"[bold red]error:[/] {exc.message}", highlight=False, soft_wrap=True)
            if exc.hint:
                err_console.print(f"[bold]fix:[/] {exc.hint}", highlight=False, soft_wrap=True)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err_console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def load_settings() -> Any:
    """The `CONCHDB_*` settings, read once per command."""
    from conchdb.config import Settings

    return Settings()


def load_encoder(
    checkpoint: str | None,
    tokenizer: Path | None,
    device: str | None,
    precision: str | None,
    need_tokenizer: bool = True,
    batch_size: int = 32,
) -> Any:
    """An `Encoder` from command options, falling back to the `CONCHDB_*` settings."""
    from conchdb.model.encoder import Encoder

    settings = load_settings()
    return Encoder.load(
        checkpoint,
        tokenizer,
        device or settings.device,
        precision or settings.precision,
        env_checkpoint=settings.checkpoint,
        env_tokenizer=settings.tokenizer,
        models_dir=settings.models_dir,
        need_tokenizer=need_tokenizer,
        batch_size=batch_size,
    )


CheckpointOpt = Annotated[
    str | None, typer.Option("--checkpoint", help="CONCH weights: a path or hf_hub:MahmoodLab/conch.")
]
TokenizerOpt = Annotated[Path | None, typer.Option("--tokenizer", help="CONCH tokenizer JSON file.")]
DeviceOpt = Annotated[str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N.")]
PrecisionOpt = Annotated[str | None, typer.Option("--precision", help="auto, fp32, bf16 or fp16.")]


@app.command()
@handles_errors
def embed(
    image: Annotated[list[Path], typer.Option("--image", help="An image file; repeat for more.")] = [],  # noqa: B006
    text: Annotated[list[str], typer.Option("--text", help="A text; repeat for more.")] = [],  # noqa: B006
    raw: Annotated[bool, typer.Option("--raw", help="Pre-projection image features instead.")] = False,
    checkpoint: CheckpointOpt = None,
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    fmt: Annotated[str, typer.Option("--format", help="json or npy.")] = "json",
    out: Annotated[Path | None, typer.Option("--out", help="Write here instead of stdout.")] = None,
) -> None:
    """Embed images and texts with CONCH: images first, then texts, in the order given."""
    import json
    import sys

    import numpy as np

    from conchdb.errors import ConchdbError
    from conchdb.model.encoder import open_image

    if fmt not in ("json", "npy"):
        raise ConchdbError(f"unknown --format {fmt!r}", "use --format json or --format npy")
    if fmt == "npy" and out is None:
        raise ConchdbError("--format npy writes a binary file and needs --out FILE.npy", "add --out FILE.npy")
    if not image and not text:
        raise ConchdbError("nothing to embed", "give --image PATH and/or --text TEXT")
    images = [open_image(p) for p in image]  # every file checked before the model loads
    encoder = load_encoder(checkpoint, tokenizer, device, precision, need_tokenizer=bool(text))
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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
