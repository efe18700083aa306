"""Distributed ingest against in-process ingest of the same small cohort, in one run.

Writes a cohort of synthetic pyramidal slides of real H&E tissue (the sibling
`tiling.py` benchmark's writer, each slide a little larger so no two are the same file),
starts a redis-server on a free loopback port and `conchdb worker` processes, and ingests
the cohort three times into fresh embedded stores:

- in-process: `conchdb.ingest.pipeline.ingest`;
- through the broker with one worker: the same work in the same order, plus the queue
  and the transfer of vectors and payloads back to the ingesting process, so its extra
  seconds over the in-process run are the overhead the broker adds (both start warm:
  one slide is ingested each way before the timed runs);
- through the broker with `--workers` workers (default 2): the throughput of several.

It prints seconds per slide each way, the overhead per slide and per 1,000 tiles, and the
bytes the events carried per tile, or one JSON object with `--json`. Worker start-up
(loading the model) is reported apart: it is paid once per worker, not per slide.

    python benchmarks/workers.py [--slides 4] [--size 4096] [--model tiny|full] [--workers 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Reader processes re-run this script's top-level imports, so heavy modules are imported in functions.


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_redis(folder: Path) -> tuple[subprocess.Popen, str]:
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (Debian: apt-get install redis-server)")
    port = _free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(folder),
                             "--appendonly", "yes", "--save", "", "--maxmemory-policy", "noeviction"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(200):
        try:
            redis.Redis(port=port, socket_connect_timeout=0.2).ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    return proc, f"redis://127.0.0.1:{port}/0"


def _start_worker(
    url: str, ckpt: Path, device: str, batch: int, home: Path, log: Path
) -> tuple[subprocess.Popen, float]:
    """A `conchdb worker` process; returns it once its heartbeat is in Redis, with the seconds that took."""
    import redis

    env = {**os.environ, "CONCHDB_HOME": str(home), "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    args = [sys.executable, "-m", "conchdb.cli", "worker", "--broker", url, "--checkpoint", str(ckpt),
            "--device", device, "--batch-size", str(batch)]
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)
    client = redis.Redis.from_url(url)
    while True:
        beats = [json.loads(client.get(k) or "{}") for k in client.scan_iter(match="conchdb:worker:*")]
        if any(b.get("pid") == proc.pid for b in beats):
            return proc, time.perf_counter() - start
        if proc.poll() is not None:
            sys.exit(f"the worker stopped:\n{log.read_text()}")
        time.sleep(0.1)


def _broker_ingest(cohort: Path, store_dir: Path, url: str, options: Any) -> tuple[Any, int]:
    """One broker ingest into a fresh embedded store; returns the summary and the event bytes read."""
    from conchdb.ingest.cohort import discover
    from conchdb.ingest.manifest import read_manifest
    from conchdb.store.edge import EdgeStore
    from conchdb.workers.dispatch import BrokerIngest, BrokerOptions

    found = discover(cohort)
    store = EdgeStore(store_dir)
    try:
        run = BrokerIngest(found, read_manifest(None, found), store, "tiles", options, BrokerOptions(url))
        counted = [0]
        blpop = run.client.blpop

        def counting(*args: Any, **kwargs: Any) -> Any:
            popped = blpop(*args, **kwargs)
            if popped is not None:
                counted[0] += len(popped[1])
            return popped

        run.client.blpop = counting  # type: ignore[method-assign]
        return run.run(), counted[0]
    finally:
        store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=4)
    parser.add_argument("--size", type=int, default=4096, help="side of the first slide, level-0 px at 0.25 µm/px")
    parser.add_argument("--model", choices=("full", "tiny"), default="tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N (every worker uses it)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--readers", type=int, default=1)
    parser.add_argument("--source", type=Path, default=None, help="tissue source slide")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    from conchdb.ingest.pipeline import IngestOptions, ingest
    from conchdb.model.checkpoint import save_checkpoint
    from conchdb.model.conch import ConchModel
    from conchdb.model.config import ConchConfig
    from conchdb.model.encoder import Encoder
    from conchdb.store.edge import EdgeStore

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiling import default_source, write_slide  # the sibling benchmark's slide writer

    with tempfile.TemporaryDirectory(prefix="conchdb-bench-workers-") as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        ckpt = root / "model.bin"
        save_checkpoint(ConchModel(ConchConfig() if args.model == "full" else ConchConfig.tiny()), ckpt)
        cohort = root / "cohort"
        cohort.mkdir()
        for i in range(args.slides):
            write_slide(cohort / f"slide{i}.tif", args.size + 256 * i, args.source or default_source())
        options = IngestOptions(batch_size=args.batch_size, readers=args.readers)

        encoder = Encoder.load(str(ckpt), device=args.device, need_tokenizer=False, batch_size=args.batch_size)
        # Every run starts warm: one slide ingested before, so first-call costs (the model's
        # first batch, the slide library) are not counted against one side.
        warm = EdgeStore(root / "warm_in_process")
        ingest(cohort / "slide0.tif", encoder, warm, "tiles", options=options)
        warm.close()
        store = EdgeStore(root / "in_process")
        local = ingest(cohort, encoder, store, "tiles", options=options)
        store.close()
        del encoder

        redis_proc, url = _start_redis(root)
        workers: list[subprocess.Popen] = []
        try:
            first, startup = _start_worker(url, ckpt, args.device, args.batch_size, root, root / "worker0.log")
            workers.append(first)
            _broker_ingest(cohort / "slide0.tif", root / "warm_one_worker", url, options)
            one, one_bytes = _broker_ingest(cohort, root / "one_worker", url, options)
            for i in range(1, args.workers):
                workers.append(_start_worker(url, ckpt, args.device, args.batch_size, root,
                                             root / f"worker{i}.log")[0])
            many, _ = _broker_ingest(cohort, root / "many_workers", url, options)
        finally:
            for proc in workers:
                proc.send_signal(signal.SIGTERM)
            for proc in workers:
                proc.wait(timeout=60)
            redis_proc.terminate()
            redis_proc.wait(timeout=30)

    tiles = local.tiles_written
    assert one.tiles_written == many.tiles_written == tiles, "a distributed run stored other tiles"
    overhead = one.seconds - local.seconds
    doc = {
        "device": args.device,
        "model": args.model,
        "slides": args.slides,
        "tiles": tiles,
        "load": os.getloadavg()[0],
        "worker_startup_s": round(startup, 3),
        "in_process": {"seconds": round(local.seconds, 3), "s_per_slide": round(local.seconds / args.slides, 3)},
        "one_worker": {"seconds": round(one.seconds, 3), "s_per_slide": round(one.seconds / args.slides, 3)},
        f"{args.workers}_workers": {"seconds": round(many.seconds, 3),
                                    "s_per_slide": round(many.seconds / args.slides, 3)},
        "overhead_s_per_slide": round(overhead / args.slides, 3),
        "overhead_s_per_1000_tiles": round(overhead / tiles * 1000, 3),
        "event_bytes_per_tile": round(one_bytes / tiles, 1),
    }
    if args.json:
        print(json.dumps(doc))
        return
    print(f"{args.slides} slides, {tiles} tiles, {args.model} CONCH on {args.device}, batch {args.batch_size}, "
          f"{args.readers} reader(s); 1-min load average {doc['load']:.2f}")
    print(f"{'':<22}{'seconds':>10}{'s/slide':>10}")
    for name in ("in_process", "one_worker", f"{args.workers}_workers"):
        print(f"{name:<22}{doc[name]['seconds']:>10.2f}{doc[name]['s_per_slide']:>10.2f}")
    print(f"broker overhead: {doc['overhead_s_per_slide']:.3f} s per slide, "
          f"{doc['overhead_s_per_1000_tiles']:.2f} s per 1,000 tiles; events {doc['event_bytes_per_tile']:.0f} B "
          f"per tile; worker start-up {startup:.1f} s (once per worker)")


if __name__ == "__main__":
    main()
