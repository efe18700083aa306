"""`conchdb worker` and `conchdb workers status`, and the broker half of `conchdb ingest --broker`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from conchdb.cli.app import Options, app, handles_errors, out_console, print_json, uses_options
from conchdb.errors import ConchdbError

workers_app = typer.Typer(help="What the ingest workers are doing.", no_args_is_help=True)
app.add_typer(workers_app, name="workers")

BrokerOpt = Annotated[
    str | None, typer.Option("--broker", help="Redis URL of the broker (default: $CONCHDB_BROKER_URL).")
]
QueueOpt = Annotated[str | None, typer.Option("--queue", help="Queue name (default: $CONCHDB_QUEUE or conchdb).")]


def broker_url(given: str | None, settings: Any) -> str:
    url = given or settings.broker_url
    if not url:
        raise ConchdbError("no broker given", "give a Redis URL, e.g. redis://HOST:6379/0, or set CONCHDB_BROKER_URL",
                           parameter="broker_url")
    return url


@app.command()
@handles_errors
@uses_options(model=True)
def worker(
    options: Options,
    broker: BrokerOpt = None,
    queue: QueueOpt = None,
    concurrency: Annotated[
        int, typer.Option("--concurrency", help="Slides at once in this process (1 per GPU is best).")
    ] = 1,
    batch_size: Annotated[int, typer.Option("--batch-size", help="Tiles per model batch.")] = 32,
) -> None:
    """Embed slides sent by `conchdb ingest --broker`: loads the model once, then one slide at a time."""
    from conchdb.workers.broker import connect
    from conchdb.workers.worker import WorkerConfig, run_worker

    if concurrency < 1:
        raise ConchdbError(f"concurrency {concurrency} is below 1", "run one worker process per GPU, each at 1",
                           parameter="concurrency")
    settings = options.settings
    url = broker_url(broker, settings)
    connect(url).close()  # an unreachable broker fails before the model loads
    # Tiles need only the vision tower; the fingerprint recorded is still the whole checkpoint's.
    encoder = options.load_encoder(("vision",), need_tokenizer=False, batch_size=batch_size)
    config = WorkerConfig(url, queue or settings.queue, concurrency, settings.visibility_timeout,
                          settings.max_deliveries, settings.qdrant_api_key)
    raise typer.Exit(run_worker(config, encoder))


@workers_app.command("status")
@handles_errors
@uses_options()
def status(
    options: Options,
    broker: BrokerOpt = None,
    queue: QueueOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Workers online with their devices, slides running, tasks queued; workers lost with the slides they held.

    A worker is lost when its heartbeat is older than $CONCHDB_WORKER_LOST_S (30 s); an
    ingest running now sends its slides again at once.
    """
    import time

    from conchdb.workers.broker import connect
    from conchdb.workers.status import workers_status

    client = connect(broker_url(broker, options.settings))
    try:
        doc = workers_status(client, queue or options.settings.queue, options.settings.worker_lost_s)
    finally:
        client.close()
    if as_json:
        print_json(doc)
        return
    out_console.print(f"queue       {doc['queue']}: {doc['queued']} queued, {doc['running']} running, "
                      f"{doc['delivered_unfinished']} delivered and not finished", highlight=False)
    if not doc["workers"]:
        out_console.print("workers     none online")
    for w in doc["lost"]:
        out_console.print(f"[red]lost[/]        {w['node']}  device {w['device']}  "
                          f"no heartbeat for {w['silent_s']:.0f} s", highlight=False, soft_wrap=True)
        for r in w["held"]:
            out_console.print(f"  held      {r['slide']}: {r['done']}/{r['tiles']} tiles", highlight=False,
                              soft_wrap=True)
    for w in doc["workers"]:
        out_console.print(f"worker      {w['node']}  device {w['device']}  model {w['model_fingerprint'][:19]}",
                          highlight=False, soft_wrap=True)
        for r in w["running"]:
            out_console.print(f"  slide     {r['slide']}: {r['done']}/{r['tiles']} tiles, "
                              f"{time.time() - r['since']:.0f} s", highlight=False, soft_wrap=True)


def ingest_through_broker(
    path: Path, manifest: Path | None, broker: str | None, options: Options, settings: Any, display: Any,
    *, cohort: Any = None,
) -> Any:
    """Run `conchdb ingest` with workers; returns the summary (the caller prints it).

    `settings` are the ingest's `IngestOptions`; `display` is the progress display (a context
    manager yielding the pipeline's callbacks), entered once the inputs and the broker are
    checked, so an error is not drawn over a bar.
    """
    from conchdb.ingest.cohort import discover
    from conchdb.ingest.manifest import read_manifest
    from conchdb.workers.broker import connect
    from conchdb.workers.dispatch import BrokerIngest, BrokerOptions

    config = options.settings
    url = broker_url(broker, config)
    found = cohort if cohort is not None else discover(path)  # given: already found (DICOMweb)
    table = read_manifest(manifest, found)  # every input is checked before anything is sent
    connect(url).close()  # an unreachable broker fails before the store is opened
    opened = options.open_store()
    server = options.qdrant_url or (None if options.store is not None else config.qdrant_url)
    broker_options = BrokerOptions(url, config.queue, config.visibility_timeout, config.max_deliveries, server,
                                   lost_s=config.worker_lost_s)
    try:
        with display as progress:
            run = BrokerIngest(found, table, opened, options.collection_name, settings, broker_options, progress)
            return run.run()
    finally:
        opened.close()
