"""`conchdb ingest` and `conchdb stats`: fill the store from slides, and say what it holds."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from conchdb.catalog import SlideStatus
from conchdb.cli.app import Options, app, err_console, handles_errors, uses_options
from conchdb.cli.summaries import print_ingest_summary, print_stats
from conchdb.cli.tiles import MinTissueOpt, StridePxOpt, TargetMppOpt, TilePxOpt
from conchdb.errors import ConchdbError


@app.command()
@handles_errors
@uses_options(store=True, collection=True, model=True)
def ingest(
    options: Options,
    path: Annotated[str, typer.Argument(
        help="A slide file, a folder searched recursively, or a DICOMweb server: dicomweb+https://HOST/PATH "
        "(whole-slide series found by QIDO-RS; credentials from $CONCHDB_DICOMWEB_TOKEN, or "
        "$CONCHDB_DICOMWEB_USER and $CONCHDB_DICOMWEB_PASSWORD)."
    )],
    manifest: Annotated[
        Path | None, typer.Option("--manifest", help="CSV with a 'slide' column (default: PATH/manifest.csv).")
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Tiles per model batch (default: 32 on the CPU, more on a GPU).")
    ] = None,
    readers: Annotated[
        int | None, typer.Option("--readers", help="Tile reader processes per slide (default: all cores but one).")
    ] = None,
    slides_in_flight: Annotated[
        int, typer.Option("--slides-in-flight", help="Slides read at once (the current one and those after it).")
    ] = 1,
    compile_model: Annotated[
        bool, typer.Option("--compile", help="torch.compile the vision tower (pays a warm-up; for long runs on a GPU).")
    ] = False,
    gpu_jpeg: Annotated[
        bool, typer.Option("--gpu-jpeg", help="Decode tiled-JPEG slides on the model's device (others: OpenSlide).")
    ] = False,
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
    broker: Annotated[
        str | None, typer.Option("--broker", help="Redis URL: workers embed the slides (also $CONCHDB_BROKER_URL).")
    ] = None,
    roi: Annotated[
        Path | None,
        typer.Option("--roi", help="QuPath GeoJSON exports, one per slide: tile only inside their annotations."),
    ] = None,
    study: Annotated[
        list[str] | None, typer.Option("--study", help="DICOMweb: only this study (Study Instance UID; repeatable).")
    ] = None,
    where_dicom: Annotated[
        list[str] | None, typer.Option("--where-dicom", help="DICOMweb: only series whose attribute KEY (a keyword "
                                       "or tag, e.g. PatientID, AccessionNumber, StudyDate=20240101-20241231) "
                                       "matches VALUE, by QIDO-RS matching (repeatable).")
    ] = None,
    ca_bundle: Annotated[
        Path | None, typer.Option("--ca-bundle", help="DICOMweb: CA bundle (PEM) to verify the server's TLS "
                                  "certificate with (also $CONCHDB_DICOMWEB_CA_BUNDLE).")
    ] = None,
) -> None:
    """Tile, embed and store every slide under PATH; reruns skip slides already done.

    With --broker the slides are embedded by `conchdb worker` processes instead of here.
    Exit status: 0 when every slide is in the store, 3 when some failed (named in the
    summary) and the rest were ingested, 2 for bad options, manifest, weights or broker.
    """

    from conchdb.ingest.manifest import read_manifest
    from conchdb.ingest.pipeline import Ingest, IngestOptions
    from conchdb.slides.grid import TilingParams
    from conchdb.slides.reader import default_readers

    readers = default_readers() if readers is None else readers
    if (batch_size is not None and batch_size < 1) or readers < 0 or slides_in_flight < 1:
        raise ConchdbError("--batch-size and --slides-in-flight must be ≥ 1 and --readers ≥ 0",
                           "e.g. --batch-size 32 --readers 2 --slides-in-flight 1")
    params = TilingParams(target_mpp, tile_px, stride_px, min_tissue)
    settings = IngestOptions(params, batch_size or 32, readers, force, cohort, slide_mpp, slides_in_flight,
                             compile_model, gpu_jpeg)
    if roi is not None:
        if not roi.is_dir():
            raise ConchdbError(f"--roi {roi} is not a folder", "give the folder of QuPath GeoJSON exports",
                               parameter="roi")
        settings.roi = roi
    found = _discover(path, study or [], where_dicom or [], ca_bundle)
    if broker or options.settings.broker_url:
        from conchdb.cli.workers import ingest_through_broker

        display = _ingest_progress(not as_json, json_notices=as_json)
        summary = ingest_through_broker(Path(found.root), manifest, broker, options, settings, display, cohort=found)
        _finish(summary, as_json)
    table = read_manifest(manifest, found)  # every input is checked before the model loads
    # Tiles need only the vision tower; the fingerprint recorded is still the whole checkpoint's.
    encoder = options.load_encoder(("vision",), need_tokenizer=False, batch_size=batch_size or 32)
    if batch_size is None:
        from conchdb.model.feed import device_batch_size

        settings.batch_size = encoder.batch_size = device_batch_size(encoder.device, fallback=32)
    opened = options.open_store()
    try:
        with _ingest_progress(enabled=not as_json) as progress:
            summary = Ingest(found, table, encoder, opened, options.collection_name, settings, progress).run()
    finally:
        opened.close()
    _finish(summary, as_json)


def _discover(path: str, studies: list[str], where: list[str], ca_bundle: Path | None) -> Any:
    """The cohort at `path`: a folder or file, or the whole-slide series of a DICOMweb server.

    The DICOMweb options reach the processes that read the slides (tile readers, the tile
    server) through the environment, as `CONCHDB_DICOMWEB_*` settings do; workers on other
    machines need them set there."""
    import os

    from conchdb.ingest.cohort import discover, discover_dicomweb
    from conchdb.slides.dicom import is_dicomweb

    if not is_dicomweb(path):
        if studies or where or ca_bundle:
            raise ConchdbError("--study, --where-dicom and --ca-bundle apply to a DICOMweb source only",
                               "give PATH as dicomweb+https://HOST/PATH, or leave the options out",
                               parameter="study")
        return discover(Path(path))
    conditions = {}
    for item in where:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConchdbError(f"--where-dicom {item!r} is not KEY=VALUE",
                               "e.g. --where-dicom PatientID=P0001 or --where-dicom AccessionNumber=A123",
                               parameter="where_dicom")
        conditions[key.strip()] = value.strip()
    if ca_bundle is not None:
        if not ca_bundle.is_file():
            raise ConchdbError(f"{ca_bundle}: no such file", "give the PEM file of the CA that signed the "
                               "server's certificate", parameter="ca_bundle")
        os.environ["CONCHDB_DICOMWEB_CA_BUNDLE"] = str(ca_bundle.resolve())
    return discover_dicomweb(path, tuple(studies), conditions)


def _finish(summary: Any, as_json: bool) -> None:
    """Print an ingest's summary and exit with its code (0, or 3 when slides failed)."""
    import json

    if as_json:
        typer.echo(json.dumps(summary.to_dict()))
    else:
        print_ingest_summary(summary.to_dict())
    raise typer.Exit(summary.exit_code)


def _ingest_progress(enabled: bool, json_notices: bool = False) -> Any:
    """A rich progress display fed by the pipeline's callbacks (a context manager).

    Notices of a run through workers (what it waits for, slides sent again) are a line under
    the bars; disabled, with `json_notices`, they go to stderr as JSON lines, so stdout keeps
    the one summary object."""
    import contextlib
    import json
    import sys

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.text import Text

    from conchdb.ingest.pipeline import Progress as Callbacks

    @contextlib.contextmanager
    def display() -> Any:
        if not enabled:
            def to_stderr(message: str, data: dict[str, Any]) -> None:
                print(json.dumps({**data, "message": message}), file=sys.stderr, flush=True)

            yield Callbacks(on_notice=to_stderr if json_notices else None)
            return
        class Bars(Progress):
            """The bars, then one line of what a run through workers waits for (rich's pattern
            for extra lines: `get_renderables`)."""

            waiting = ""

            def get_renderables(self) -> Any:
                yield self.make_tasks_table(self.tasks)
                if self.waiting:
                    yield Text(self.waiting, style="dim", overflow="ellipsis", no_wrap=True)

        bar = Bars(
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
            if outcome.status == SlideStatus.FAILED:
                bar.console.print(f"[red]failed[/] {outcome.error}", highlight=False, soft_wrap=True)

        def on_notice(message: str, data: dict[str, Any]) -> None:
            if data.get("event") == "running":  # changes often: one line under the bars, rewritten
                bar.waiting = message
                bar.refresh()
            else:
                bar.console.print(f"[yellow]{message}[/]", highlight=False, soft_wrap=True)

        with bar:
            yield Callbacks(on_start, on_slide, on_batch, on_outcome, on_notice)

    return display()



@app.command()
@handles_errors
@uses_options(store=True)
def stats(
    options: Options,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Collections, point counts, slides by status, model fingerprint, tiling, location and size."""
    import json

    from conchdb.archive.stats import archive_stats

    opened = options.open_store()
    try:
        doc = archive_stats(opened)
    finally:
        opened.close()
    if as_json:
        typer.echo(json.dumps(doc))
        return
    print_stats(doc)
