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
TargetMppOpt = Annotated[float, typer.Option("--target-mpp", help="Tile resolution, µm per pixel.")]
TilePxOpt = Annotated[int, typer.Option("--tile-px", help="Tile side in pixels.")]
StridePxOpt = Annotated[
    int | None, typer.Option("--stride-px", help="Step between tiles in pixels (default: the tile side).")
]
MinTissueOpt = Annotated[float, typer.Option("--min-tissue", help="Smallest tissue fraction kept.")]


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


@app.command()
@handles_errors
def tiles(
    slide: Annotated[Path, typer.Argument(help="A slide or image file.")],
    target_mpp: TargetMppOpt = 0.5,
    tile_px: TilePxOpt = 512,
    stride_px: StridePxOpt = None,
    min_tissue: MinTissueOpt = 0.25,
    slide_mpp: Annotated[
        float | None, typer.Option("--slide-mpp", help="The slide's level-0 µm/px, overriding its metadata.")
    ] = None,
    qc: Annotated[Path | None, typer.Option("--qc", help="Write a PNG: thumbnail, tissue mask, tiles.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the grid as one JSON object.")] = False,
) -> None:
    """Show how a slide is tiled: pixel size and its source, read level, and the tiles on tissue."""
    import json

    from conchdb.ingest.cohort import discover
    from conchdb.slides.grid import TilingParams, plan_tiles
    from conchdb.slides.qc import write_qc
    from conchdb.slides.slide import open_slide

    params = TilingParams(target_mpp, tile_px, stride_px, min_tissue)
    slide_id = discover(slide).slides[0].id
    with open_slide(slide, slide_mpp, override_source="--slide-mpp") as opened:
        mask, grid = plan_tiles(opened, params)
        if qc is not None:
            try:
                write_qc(qc, mask, grid)
            except OSError as exc:
                raise ConchdbError(f"cannot write the QC picture {qc}: {exc}", "check the folder") from None
        info = {
            "slide": str(slide),
            "slide_id": slide_id,
            "mpp": opened.mpp,
            "mpp_source": opened.mpp_source,
            "target_mpp": grid.target_mpp,
            "tile_px": grid.tile_px,
            "tile_size_level0": grid.tile_size_level0,
            "read_level": grid.read_level,
            "tiles": [{"x": t.x, "y": t.y, "tissue": t.tissue} for t in grid.tiles],
        }
        sizes = zip(opened.level_dimensions, opened.level_downsamples, strict=True)
        levels = [f"{w}×{h} (×{d:.4g})" for (w, h), d in sizes]
        kind = f"{opened.vendor} (OpenSlide)" if opened.vendor else "plain image (Pillow)"
        width, height = opened.dimensions
    for warning in grid.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    if qc is not None:
        err_console.print(f"qc: wrote {qc}", highlight=False)
    if as_json:
        typer.echo(json.dumps(info))
        return
    mpp = "unknown" if info["mpp"] is None else f"{info['mpp']:.4g} µm/px"
    read_px = f"{grid.read_size} px read" + ("" if grid.read_size == grid.tile_px else f", resized to {grid.tile_px}")
    lines = [
        ("slide", f"{slide}  (id {slide_id}, {kind})"),
        ("dimensions", f"{width} × {height} px"),
        ("levels", f"{len(levels)}: " + ", ".join(levels)),
        ("pixel size", f"{mpp}  (source: {info['mpp_source']})"),
        ("tile", f"{grid.tile_px} px at {grid.target_mpp:g} µm/px = {grid.tile_size_level0} level-0 px, "
                 f"stride {grid.stride_level0}"),
        ("read level", f"{grid.read_level} ({read_px})"),
        ("tiles", f"{len(grid.tiles)} with tissue ≥ {min_tissue:g}"),
    ]
    for name, value in lines:
        out_console.print(f"{name:<11} {value}", highlight=False, soft_wrap=True)


StoreOpt = Annotated[
    Path | None, typer.Option("--store", help="Embedded store folder (default: $CONCHDB_HOME/store).")
]
QdrantUrlOpt = Annotated[
    str | None, typer.Option("--qdrant-url", help="Use a Qdrant server or cluster at this URL instead.")
]
CollectionOpt = Annotated[str | None, typer.Option("--collection", help="Tiles collection (default: conch_tiles).")]


def open_store_from_options(store: Path | None, qdrant_url: str | None, collection: str | None) -> tuple[Any, str]:
    """The store and tiles collection named by the options, else by the `CONCHDB_*` settings."""
    from conchdb.errors import ConchdbError
    from conchdb.store import open_store

    settings = load_settings()
    if store is not None and qdrant_url is not None:
        raise ConchdbError("--store and --qdrant-url both given", "choose the embedded store or a server, not both")
    url = qdrant_url or (None if store is not None else settings.qdrant_url)
    opened = open_store(store or settings.store_path, url, settings.qdrant_api_key)
    return opened, collection or settings.collection


@app.command()
@handles_errors
def ingest(
    path: Annotated[Path, typer.Argument(help="A slide file, or a folder searched recursively.")],
    manifest: Annotated[
        Path | None, typer.Option("--manifest", help="CSV with a 'slide' column (default: PATH/manifest.csv).")
    ] = None,
    store: StoreOpt = None,
    qdrant_url: QdrantUrlOpt = None,
    collection: CollectionOpt = None,
    checkpoint: CheckpointOpt = None,
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Tiles per model batch.")] = 32,
    readers: Annotated[int, typer.Option("--readers", help="Tile reader processes.")] = 2,
    target_mpp: TargetMppOpt = 0.5,
    tile_px: TilePxOpt = 512,
    stride_px: StridePxOpt = None,
    min_tissue: MinTissueOpt = 0.25,
    slide_mpp: Annotated[
        float | None, typer.Option("--slide-mpp", help="Level-0 µm/px for slides whose manifest row gives none.")
    ] = None,
    cohort: Annotated[str | None, typer.Option("--cohort", help="Cohort name (default: the folder name).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Redo slides already ingested.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the summary as one JSON object.")] = False,
) -> None:
    """Tile, embed and store every slide under PATH; reruns skip slides already done.

    Exit status: 0 when every slide is in the store, 3 when some failed (named in the
    summary) and the rest were ingested, 2 for bad options, manifest or weights.
    """
    import json

    from conchdb.errors import ConchdbError
    from conchdb.ingest.cohort import discover
    from conchdb.ingest.manifest import read_manifest
    from conchdb.ingest.pipeline import Ingest, IngestOptions
    from conchdb.slides.grid import TilingParams

    if batch_size < 1 or readers < 0:
        raise ConchdbError("--batch-size must be ≥ 1 and --readers ≥ 0", "e.g. --batch-size 32 --readers 2")
    params = TilingParams(target_mpp, tile_px, stride_px, min_tissue)
    found = discover(path)
    table = read_manifest(manifest, found)  # every input is checked before the model loads
    encoder = load_encoder(checkpoint, tokenizer, device, precision, need_tokenizer=False, batch_size=batch_size)
    opened, name = open_store_from_options(store, qdrant_url, collection)
    options = IngestOptions(params, batch_size, readers, force, cohort, slide_mpp)
    try:
        with _ingest_progress(enabled=not as_json) as progress:
            summary = Ingest(found, table, encoder, opened, name, options, progress).run()
    finally:
        opened.close()
    if as_json:
        typer.echo(json.dumps(summary.to_dict()))
    else:
        _print_ingest_summary(summary.to_dict())
    raise typer.Exit(summary.exit_code)


def _ingest_progress(enabled: bool) -> Any:
    """A rich progress display fed by the pipeline's callbacks (a context manager)."""
    import contextlib

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from conchdb.ingest.pipeline import Progress as Callbacks

    @contextlib.contextmanager
    def display() -> Any:
        if not enabled:
            yield Callbacks()
            return
        bar = Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), console=err_console, transient=False,
        )
        slides = bar.add_task("slides", total=None, rate="")
        tiles = bar.add_task("tiles", total=0, rate="")
        import time

        start = time.perf_counter()
        done = [0]

        def on_start(n: int) -> None:
            bar.update(slides, total=n)

        def on_slide(slide_id: str, n: int) -> None:
            task = bar.tasks[tiles]
            bar.update(tiles, total=(task.total or 0) + n, description=f"tiles  [dim]{slide_id}[/]")

        def on_batch(n: int) -> None:
            done[0] += n
            rate = done[0] / max(time.perf_counter() - start, 1e-9)
            bar.update(tiles, advance=n, rate=f"{rate:.1f} tiles/s")

        def on_outcome(outcome: Any) -> None:
            bar.update(slides, advance=1)
            if outcome.status == "failed":
                bar.console.print(f"[red]failed[/] {outcome.error}", highlight=False, soft_wrap=True)

        with bar:
            yield Callbacks(on_start, on_slide, on_batch, on_outcome)

    return display()


def _print_ingest_summary(doc: dict[str, Any]) -> None:
    lines = [
        ("store", f"{doc['store']}  (collection {doc['collection']})"),
        ("slides", f"{doc['slides']}: {doc['ingested']} ingested, {doc['skipped']} already done, "
                   f"{doc['no_tissue']} without tissue, {len(doc['failed'])} failed"),
        ("not slides", f"{doc['not_slides']} file(s) skipped"),
        ("tiles", f"{doc['tiles_written']} written in {doc['seconds']:.1f} s ({doc['tiles_per_s']:.2f} tiles/s)"),
    ]
    if doc["manifest"]:
        lines.append(("manifest", f"{doc['manifest']}: {len(doc['manifest_rows_unmatched'])} row(s) naming no "
                                  f"slide, {len(doc['slides_without_manifest_row'])} slide(s) without a row"))
    for name, value in lines:
        out_console.print(f"{name:<11} {value}", highlight=False, soft_wrap=True)
    for row in doc["manifest_rows_unmatched"]:
        out_console.print(f"[yellow]manifest row names no slide:[/] {row}", highlight=False, soft_wrap=True)
    for failure in doc["failed"]:
        out_console.print(f"[red]failed[/] {failure['error']}", highlight=False, soft_wrap=True)


@app.command()
@handles_errors
def stats(
    store: StoreOpt = None,
    qdrant_url: QdrantUrlOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Collections, point counts, slides by status, model fingerprint, tiling, location and size."""
    import json

    from conchdb.store.stats import store_stats

    opened, _ = open_store_from_options(store, qdrant_url, None)
    try:
        doc = store_stats(opened)
    finally:
        opened.close()
    if as_json:
        typer.echo(json.dumps(doc))
        return
    size = doc["size_on_disk_bytes"]
    out_console.print(f"store       {doc['location']}" + ("" if size is None else f"  ({size / 1e6:.1f} MB on disk)"),
                      highlight=False)
    if not doc["collections"]:
        out_console.print("no collections yet: run `conchdb ingest FOLDER`")
    for col in doc["collections"]:
        meta = col["metadata"]
        out_console.print(f"\n[bold]{col['name']}[/]  {col['points']} points", highlight=False)
        if meta.get("model_fingerprint"):
            out_console.print(f"  model      {meta.get('model')} (fingerprint {meta['model_fingerprint']})",
                              highlight=False)
        if meta.get("tiling"):
            t = meta["tiling"]
            out_console.print(f"  tiling     {t.get('tile_px')} px at {t.get('target_mpp')} µm/px, "
                              f"min tissue {t.get('min_tissue')}", highlight=False)
        if col.get("slides_by_status"):
            counts = ", ".join(f"{n} {status}" for status, n in sorted(col["slides_by_status"].items()))
            out_console.print(f"  slides     {counts}", highlight=False)


# -- search: text/image -> tiles, image -> text, zero-shot, heatmaps, texts -----------------

texts_app = typer.Typer(help="Texts that images are described with (image -> text).", no_args_is_help=True)
app.add_typer(texts_app, name="texts")

ImageQueryOpt = Annotated[
    str | None, typer.Option("--image", help="An image file, or a slide region PATH+x,y,w,h (level-0 pixels).")
]
WhereOpt = Annotated[
    list[str], typer.Option("--where", help="Filter: field=v, field!=v, field=a,b,c, field>=x, field<x ...; repeat.")
]
EnsembleOpt = Annotated[
    bool, typer.Option("--ensemble", help="Average the text over CONCH-style prompt templates.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def _open_searcher(store: Path | None, qdrant_url: str | None, collection: str | None) -> Any:
    """A `Searcher` (no encoder yet) on the store and collection the options name."""
    from conchdb.search import Searcher

    opened, name = open_store_from_options(store, qdrant_url, collection)
    return Searcher(None, opened, name, cache_dir=load_settings().home / "cache")


def _print_json(doc: Any) -> None:
    import json

    typer.echo(json.dumps(doc, default=str))


@app.command()
@handles_errors
def search(
    query: Annotated[str | None, typer.Argument(help="Text to search for.")] = None,
    image: ImageQueryOpt = None,
    point: Annotated[str | None, typer.Option("--point", help="Id of a stored tile: find tiles like it.")] = None,
    where: WhereOpt = [],  # noqa: B006
    top_k: Annotated[int, typer.Option("--top-k", help="Results per page, 1 to 1000.")] = 10,
    page: Annotated[int, typer.Option("--page", help="Page of results; 2 is results top-k+1 to 2×top-k.")] = 1,
    group_by: Annotated[
        str | None, typer.Option("--group-by", help="'slide' (or a payload field): one result per slide.")
    ] = None,
    group_size: Annotated[int, typer.Option("--group-size", help="Tiles kept per group.")] = 3,
    ensemble: EnsembleOpt = False,
    min_score: Annotated[float | None, typer.Option("--min-score", help="Leave out hits below this cosine.")] = None,
    as_json: JsonOpt = False,
    export: Annotated[Path | None, typer.Option("--export", help="Write hit JPEGs and index.html here.")] = None,
    store: StoreOpt = None,
    qdrant_url: QdrantUrlOpt = None,
    collection: CollectionOpt = None,
    checkpoint: CheckpointOpt = None,
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
) -> None:
    """Search tiles by text, by image or by a stored tile, with filters; exactly one of QUERY, --image, --point."""
    from conchdb.errors import QueryError
    from conchdb.search.filters import filter_fields
    from conchdb.search.searcher import require_text

    if sum(q is not None for q in (query, image, point)) != 1:
        raise QueryError("give exactly one query", hint="QUERY text, --image PATH, or --point ID")
    if query is not None:
        require_text(query)
    if page < 1:
        raise QueryError(f"--page {page} is not a page number", hint="pages start at 1")
    searcher = _open_searcher(store, qdrant_url, collection)
    try:
        flt = searcher.parse_where(where)
        pixels = searcher.load_image(image) if image is not None else None  # checked before the model loads
        if point is None:
            searcher.encoder = load_encoder(checkpoint, tokenizer, device, precision, need_tokenizer=query is not None)
        vector = searcher.query_vector(text=query, image=pixels, point=point, ensemble=ensemble)
        hits = searcher.search(vector, top_k, flt, min_score, (page - 1) * top_k, group_by, group_size)
    finally:
        searcher.store.close()
    if export is not None:
        from conchdb.search.export import export_hits

        title = f"text: {query}" if query is not None else f"image: {image}" if image is not None else f"point: {point}"
        done = export_hits(hits, export, title)
        for tile in done.failures:
            err_console.print(f"[yellow]warning:[/] hit {tile.label}: {tile.error}", highlight=False, soft_wrap=True)
        err_console.print(f"export: {len(done.tiles) - len(done.failures)} images and {done.index}", highlight=False)
    if as_json:
        _print_json([h.to_dict() for h in hits])
        return
    from conchdb.search.tables import hits_table

    if not hits:
        out_console.print("no results")
        return
    out_console.print(hits_table(hits, filter_fields(flt)))


@app.command()
@handles_errors
def describe(
    image: Annotated[str, typer.Argument(help="An image file, or a slide region PATH+x,y,w,h (level-0 pixels).")],
    top_k: Annotated[int, typer.Option("--top-k", help="Number of texts, 1 to 1000.")] = 10,
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    qdrant_url: QdrantUrlOpt = None,
    collection: CollectionOpt = None,
    checkpoint: CheckpointOpt = None,
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
) -> None:
    """Image -> text: the added texts (conchdb texts add) closest to an image, else built-in histopathology terms."""
    searcher = _open_searcher(store, qdrant_url, collection)
    try:
        pixels = searcher.load_image(image)
        has_texts = searcher.has_texts()
        searcher.encoder = load_encoder(checkpoint, tokenizer, device, precision, need_tokenizer=not has_texts)
        matches = searcher.describe(searcher.image_vector(pixels), top_k)
    finally:
        searcher.store.close()
    if as_json:
        _print_json([m.to_dict() for m in matches])
        return
    from conchdb.search.tables import texts_table

    out_console.print(texts_table(matches))


@app.command()
@handles_errors
def classify(
    image: Annotated[
        str | None, typer.Argument(help="A tile or ROI image, or a slide region PATH+x,y,w,h.")
    ] = None,
    slide: Annotated[
        str | None, typer.Option("--slide", help="A stored slide id: MI-Zero over its stored tiles.")
    ] = None,
    label: Annotated[list[str], typer.Option("--label", help="A class name; repeat, at least two.")] = [],  # noqa: B006
    prompts: Annotated[
        Path | None, typer.Option("--prompts", help="Classes and templates in CONCH's prompts/*.json format.")
    ] = None,
    ensemble: Annotated[
        bool, typer.Option("--ensemble", help="Put each --label into CONCH-style templates.")
    ] = False,
    topk: Annotated[str, typer.Option("--topk", help="MI-Zero: k values of top-k mean pooling.")] = "1,5,10,50,100",
    where: WhereOpt = [],  # noqa: B006
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    qdrant_url: QdrantUrlOpt = None,
    collection: CollectionOpt = None,
    checkpoint: CheckpointOpt = None,
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
) -> None:
    """Zero-shot classification of an image, or of a slide (--slide) from its stored tile vectors."""
    from conchdb.errors import QueryError
    from conchdb.search import Searcher, classes_from_labels, load_prompt_file
    from conchdb.search.zeroshot import parse_ks

    if (image is None) == (slide is None):
        raise QueryError("give an IMAGE or --slide SLIDE_ID (one of them)")
    if bool(label) == (prompts is not None):
        raise QueryError("give the classes with --label TEXT (repeated) or --prompts FILE.json (one of them)")
    classes = load_prompt_file(prompts) if prompts is not None else classes_from_labels(label, ensemble)
    try:
        ks = parse_ks(topk)
    except ValueError as exc:
        raise QueryError(f"--topk {topk!r}: {exc}", hint="give k values such as 1,5,10,50,100") from None
    if image is not None:
        searcher = Searcher(None, None, cache_dir=load_settings().home / "cache")
        pixels = searcher.load_image(image)
        searcher.encoder = load_encoder(checkpoint, tokenizer, device, precision)
        scores = searcher.classify(searcher.image_vector(pixels), classes)
        if as_json:
            _print_json({"image": image, **scores.to_dict()})
            return
        from conchdb.search.tables import classes_table

        out_console.print(classes_table(scores, title=f"{image}: {scores.prediction}"))
        return
    searcher = _open_searcher(store, qdrant_url, collection)
    try:
        flt = searcher.parse_where(where)
        searcher.slide_tiles(slide, flt)  # an unknown slide fails before the model loads
        searcher.encoder = load_encoder(checkpoint, tokenizer, device, precision)
        n_tiles, results = searcher.classify_slide(slide, classes, ks, flt)
    finally:
        searcher.store.close()
    if as_json:
        _print_json({"slide_id": slide, "tiles": n_tiles, "results": [r.to_dict() for r in results]})
        return
    from conchdb.search.tables import mi_zero_table

    out_console.print(mi_zero_table(results, title=f"{slide}: MI-Zero over {n_tiles} stored tiles"))


@app.command()
@handles_errors
def heatmap(
    slide_id: Annotated[str, typer.Argument(help="A stored slide id.")],
    out: Annotated[Path, typer.Option("--out", help="PNG file to write.")],
    query: Annotated[str | None, typer.Argument(help="Text query (or give --image).")] = None,
    image: ImageQueryOpt = None,
    ensemble: EnsembleOpt = False,
    where: WhereOpt = [],  # noqa: B006
    size: Annotated[int, typer.Option("--size", help="Longest side of the thumbnail, pixels.")] = 1024,
    store: StoreOpt = None,
    qdrant_url: QdrantUrlOpt = None,
    collection: CollectionOpt = None,
    checkpoint: CheckpointOpt = None,
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
) -> None:
    """Similarity of each stored tile of a slide to a text or image query, over the slide's thumbnail."""
    from conchdb.errors import QueryError
    from conchdb.search.heatmap import slide_heatmap
    from conchdb.search.searcher import require_text

    if (query is None) == (image is None):
        raise QueryError("give a text QUERY or --image PATH (one of them)")
    if query is not None:
        require_text(query)
    if not 64 <= size <= 8192:
        raise QueryError(f"--size {size} is outside 64..8192")
    searcher = _open_searcher(store, qdrant_url, collection)
    try:
        flt = searcher.parse_where(where)
        searcher.slide_tiles(slide_id, flt)  # an unknown slide fails before the model loads
        pixels = searcher.load_image(image) if image is not None else None
        searcher.encoder = load_encoder(checkpoint, tokenizer, device, precision, need_tokenizer=query is not None)
        vector = searcher.query_vector(text=query, image=pixels, ensemble=ensemble)
        tiles, scores = searcher.slide_similarity(slide_id, vector, flt)
    finally:
        searcher.store.close()
    result = slide_heatmap(tiles, scores, f"{slide_id}: {query if query is not None else image}", size)
    try:
        result.image.save(out, "PNG")
    except (OSError, ValueError) as exc:
        raise ConchdbError(f"cannot write {out}: {exc}", hint="give --out a writable .png path") from None
    best = result.best.payload
    out_console.print(
        f"wrote {out}: {result.tiles} tiles, scores {result.low:.4f} to {result.high:.4f}, "
        f"best at ({best.get('x')}, {best.get('y')})",
        highlight=False,
        soft_wrap=True,
    )


@texts_app.command("add")
@handles_errors
def texts_add(
    file: Annotated[Path, typer.Argument(help="A .txt file (one text per line) or a .csv with a `text` column.")],
    as_json: JsonOpt = False,
    store: StoreOpt = None,
    qdrant_url: QdrantUrlOpt = None,
    collection: CollectionOpt = None,
    checkpoint: CheckpointOpt = None,
    tokenizer: TokenizerOpt = None,
    device: DeviceOpt = None,
    precision: PrecisionOpt = None,
) -> None:
    """Embed captions, report sentences or terms into the texts collection that `describe` ranks."""
    from conchdb.catalog import texts_collection
    from conchdb.search.texts import add_texts, read_text_file

    texts = read_text_file(file)  # a bad file fails before the model loads
    opened, name = open_store_from_options(store, qdrant_url, collection)
    try:
        encoder = load_encoder(checkpoint, tokenizer, device, precision)
        target = texts_collection(name)
        written = add_texts(texts, encoder, opened, target)
        total = opened.count(target)
    finally:
        opened.close()
    if as_json:
        _print_json({"file": str(file), "collection": target, "added": written, "total": total})
        return
    message = f"added {written} texts from {file} to '{target}' ({total} in all)"
    out_console.print(message, highlight=False, soft_wrap=True)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
