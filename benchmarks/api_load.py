"""HTTP load on `conchdb serve`: concurrent clients sending mixed text, image and tile requests.

    python benchmarks/api_load.py [--clients 32] [--seconds 20] [--n 20000] [--model full|tiny]
                                  [--device cpu] [--image-batch 16] [--tokenizer FILE] [--json]

Builds an embedded store of N tiles cut from a few synthetic slides (PNG files at 0.5 µm/px,
so that every tile can be cut again for `GET /v1/tiles/{id}.jpg`), with random unit vectors
(the hits are meaningless; only times are measured). Then starts the real `conchdb serve`
in a subprocess on 127.0.0.1 and runs `--clients` concurrent clients for `--seconds`, each
sending, at random, a text search (terms of the built-in vocabulary, so that repeated
queries meet the server's cache as they would), an image search (a tile uploaded as PNG),
or a tile image request (2 : 1 : 2). Every request goes to 127.0.0.1. Any answer but 200,
or a failed request, is an error.

The same load runs twice, against two servers over the same store: as served (image queries
that wait together encoded as one batch of at most `--image-batch`), and with
`--image-batch 1`, each image encoded alone (the baseline: image requests/s when images are
encoded one at a time). The targets checked: no errors; p99 of text searches and of tile
images at most 150 ms each while image queries run; image requests/s at least 2x the
baseline's.

Beside it, in the same run, the same kinds of query go through an in-process `Searcher`
one at a time (after the server has stopped, so they do not compete): a text query's
embedding and search (no cache), an image's embedding and search, a tile cut from its
slide and JPEG-encoded.

The model is CONCH's full-size architecture with random weights (`--model full`; latency
does not depend on the values, and the real weights are gated) or the tests' tiny one.
Progress goes to stderr; stdout gets a table, or with --json one JSON object:
{"requests_per_s", "p50_ms", "p99_ms", "errors", "clients", "seconds", "image_batch", "kinds":
{kind: {"requests", "requests_per_s", "p50_ms", "p99_ms", "errors"}}, "one_at_a_time": {the same
for the baseline server}, "image_speedup", "targets": {name: bool}, "in_process": {kind:
{"p50_ms", "p99_ms"}}}.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conchdb.model.checkpoint import save_checkpoint
from conchdb.model.conch import ConchModel
from conchdb.model.config import ConchConfig
from conchdb.model.encoder import Encoder
from conchdb.search import Searcher, regions
from conchdb.search.vocabulary import all_terms
from conchdb.store import CollectionSpec, Point, stable_id
from conchdb.store.edge import EdgeStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from search import default_tokenizer  # noqa: E402  (the sibling benchmark's tokenizer lookup)

COLLECTION = "conch_tiles"
SLIDES, SLIDE_PX, TILE_PX = 6, 1024, 256
MIX = (("text", 2), ("image", 1), ("tile", 2))
SCHEMA = {"slide_id": "keyword", "path": "keyword", "cohort": "keyword", "x": "integer", "y": "integer",
          "size": "integer", "mpp": "float", "tile_px": "integer"}
BATCH = 2048
TARGET_P99_MS = 150.0
TARGET_IMAGE_SPEEDUP = 2.0


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def random_model(kind: str) -> ConchModel:
    """CONCH's released architecture (or the tiny test one) with random weights."""
    torch.manual_seed(0)
    model = ConchModel(ConchConfig() if kind == "full" else ConchConfig.tiny())
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim >= 2:
                param.normal_(0.0, 0.02)
    return model


def write_slides(folder: Path) -> list[Path]:
    """Synthetic slides: smooth colour fields with noise, as PNGs that record 0.5 µm/px."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    yy, xx = np.mgrid[:SLIDE_PX, :SLIDE_PX] / SLIDE_PX
    for i in range(SLIDES):
        base = rng.uniform(60, 200, 3)
        rgb = base + 50 * np.stack([np.sin(6 * xx + i), np.cos(5 * yy - i), np.sin(4 * (xx + yy))], -1)
        rgb += rng.normal(0, 12, rgb.shape)
        path = folder / f"slide{i}.png"
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(path, dpi=(50800, 50800))
        paths.append(path)
    return paths


def build_store(folder: Path, slides: list[Path], n: int, encoder: Encoder) -> list[Point]:
    """N points over the slides' tile positions (cycled), random unit vectors; returns one point per tile."""
    rng = np.random.default_rng(1)
    positions = [(p, x, y) for p in slides for y in range(0, SLIDE_PX, TILE_PX) for x in range(0, SLIDE_PX, TILE_PX)]
    metadata = {**encoder.describe(), "tiling": {"target_mpp": 0.5, "tile_px": TILE_PX}}
    distinct: list[Point] = []
    with EdgeStore(folder) as store:
        store.ensure_collection(CollectionSpec(COLLECTION, encoder.dim, metadata, dict(SCHEMA)))  # type: ignore[arg-type]
        for start in range(0, n, BATCH):
            count = min(BATCH, n - start)
            vectors = rng.standard_normal((count, encoder.dim)).astype(np.float32)
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
            points = []
            for i, vector in zip(range(start, start + count), vectors, strict=True):
                path, x, y = positions[i % len(positions)]
                payload = {"slide_id": path.name, "path": str(path), "cohort": f"copy{i // len(positions)}",
                           "x": x, "y": y, "size": TILE_PX, "mpp": 0.5, "tile_px": TILE_PX}
                points.append(Point(stable_id("api-load", i), vector, payload))
            store.upsert(COLLECTION, points)
            distinct += points[: max(0, len(positions) - len(distinct))]
        store.finish_bulk_load(COLLECTION)
    return distinct


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(store: Path, checkpoint: Path, tokenizer: Path, device: str, port: int,
                 image_batch: int) -> subprocess.Popen:
    env = {**os.environ, "CONCHDB_HOME": str(store.parent / "home")}
    env.pop("CONCHDB_API_KEY", None)
    command = [sys.executable, "-m", "conchdb.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
               "--store", str(store), "--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer),
               "--device", device, "--image-batch", str(image_batch)]
    log_name = store.parent / f"server-{port}.log"  # a file: a pipe nobody reads would fill and stall the server
    with open(log_name, "wb") as log_file:
        server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=log_file)
    server.log_name = str(log_name)  # type: ignore[attr-defined]
    return server


def serve_and_load(folder: Path, checkpoint: Path, args: argparse.Namespace, image_batch: int, texts: list[str],
                   uploads: list[bytes], ids: list[str]) -> dict:
    """Start `conchdb serve` over the store with `image_batch`, run the load, stop it; the summary."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(folder / "store", checkpoint, args.tokenizer, args.device, port, image_batch)
    try:
        asyncio.run(wait_ready(url, server))
        log(f"server (image batch {image_batch}) ready on {url}; {args.clients} clients for {args.seconds:g} s")
        failures: list[str] = []
        records = asyncio.run(load(url, args.clients, args.seconds, texts, uploads, ids, failures))
    finally:
        server.terminate()
        server.wait(30)
    for failure in failures[:5]:
        log(f"failed: {failure}")
    if failures:
        log(f"the server's log ends: {server_log(server)}")
    return {"image_batch": image_batch, **summary(records, args.seconds), "failures": failures[:5]}


def targets(served: dict, alone: dict) -> dict:
    """The issue's targets, each True when met."""
    kinds = served["kinds"]
    base = alone["kinds"]["image"]["requests_per_s"]
    return {
        "no_errors": served["errors"] == 0,
        "text_p99_ms<=150": kinds["text"]["p99_ms"] is not None and kinds["text"]["p99_ms"] <= TARGET_P99_MS,
        "tile_p99_ms<=150": kinds["tile"]["p99_ms"] is not None and kinds["tile"]["p99_ms"] <= TARGET_P99_MS,
        "image_req_s>=2x_one_at_a_time": base > 0 and kinds["image"]["requests_per_s"] >= TARGET_IMAGE_SPEEDUP * base,
    }


async def wait_ready(url: str, server: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, trust_env=False) as client:
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise SystemExit(f"the server exited: {server_log(server)}")
            try:
                if (await client.get("/v1/health")).json().get("status") == "ok":
                    return
            except httpx.HTTPError:
                pass
            await asyncio.sleep(0.2)
    raise SystemExit("the server did not become ready")


def server_log(server: subprocess.Popen, tail: int = 2000) -> str:
    """The end of what the server wrote to stderr (its log file)."""
    name = getattr(server, "log_name", None)
    return Path(name).read_text(errors="replace")[-tail:] if name and Path(name).exists() else ""


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


async def load(url: str, clients: int, seconds: float, texts: list[str], uploads: list[bytes],
               point_ids: list[str], failures: list[str]) -> list[tuple[str, float, bool]]:
    """`clients` concurrent clients for `seconds`; (kind, seconds, ok) per request, and what
    went wrong with each failed one appended to `failures`."""
    import httpx

    kinds, weights = zip(*MIX, strict=True)
    records: list[tuple[str, float, bool]] = []
    deadline = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)

    async def client_loop(seed: int, client: httpx.AsyncClient) -> None:
        rng = random.Random(seed)
        while time.perf_counter() < deadline:
            kind = rng.choices(kinds, weights)[0]
            start = time.perf_counter()
            try:
                if kind == "text":
                    response = await client.post("/v1/search/text", json={"query": rng.choice(texts), "top_k": 10})
                elif kind == "image":
                    files = {"image": ("q.png", rng.choice(uploads), "image/png")}
                    response = await client.post("/v1/search/image", files=files, data={"top_k": "10"})
                else:
                    response = await client.get(f"/v1/tiles/{rng.choice(point_ids)}.jpg")
                ok = response.status_code == 200
                if not ok:
                    failures.append(f"{kind}: {response.status_code} {response.text[:200]}")
            except httpx.HTTPError as exc:
                ok = False
                failures.append(f"{kind}: {type(exc).__name__} {exc}")
            records.append((kind, time.perf_counter() - start, ok))

    async with httpx.AsyncClient(base_url=url, trust_env=False, limits=limits, timeout=120) as client:
        await asyncio.gather(*(client_loop(i, client) for i in range(clients)))
    return records


def summary(records: list[tuple[str, float, bool]], seconds: float) -> dict:
    def stats(rows: list[tuple[str, float, bool]]) -> dict:
        times = np.array([1e3 * t for _, t, ok in rows if ok]) if rows else np.array([])
        return {
            "requests": len(rows),
            "requests_per_s": round(len(rows) / seconds, 2),
            "p50_ms": round(float(np.percentile(times, 50)), 2) if times.size else None,
            "p99_ms": round(float(np.percentile(times, 99)), 2) if times.size else None,
            "errors": sum(not ok for _, _, ok in rows),
        }

    out = stats(records)
    out["kinds"] = {kind: stats([r for r in records if r[0] == kind]) for kind, _ in MIX}
    return out


def in_process(store: Path, encoder: Encoder, texts: list[str], tiles: list[Image.Image], points: list[Point],
               count: int) -> dict:
    """The same kinds of query through a `Searcher` in this process, one at a time."""
    timings: dict[str, list[float]] = {"text": [], "image": [], "tile": []}
    with EdgeStore(store) as opened:
        searcher = Searcher(encoder, opened, COLLECTION)
        searcher.search(searcher.text_vector(texts[0]), 10)  # warm-up
        for i in range(count):
            start = time.perf_counter()
            searcher.search(searcher.text_vector(texts[i % len(texts)]), 10)
            timings["text"].append(time.perf_counter() - start)
            start = time.perf_counter()
            searcher.search(searcher.image_vector(tiles[i % len(tiles)]), 10)
            timings["image"].append(time.perf_counter() - start)
            payload = points[i % len(points)].payload
            start = time.perf_counter()
            with regions.open_source(payload) as slide:
                regions.read_hit_tile(slide, payload).save(io.BytesIO(), "JPEG", quality=90)
            timings["tile"].append(time.perf_counter() - start)
    return {kind: {"p50_ms": round(float(np.percentile(1e3 * np.array(t), 50)), 2),
                   "p99_ms": round(float(np.percentile(1e3 * np.array(t), 99)), 2)} for kind, t in timings.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the load (default 20 s)")
    parser.add_argument("--n", type=int, default=20_000, help="tiles in the store (default 20,000)")
    parser.add_argument("--model", choices=("full", "tiny"), default="full", help="CONCH's size or the tests' tiny")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--image-batch", type=int, default=8, help="the server's largest image batch (default 8)")
    parser.add_argument("--tokenizer", type=Path, default=default_tokenizer(), help="CONCH tokenizer JSON")
    parser.add_argument("--in-process", type=int, default=30, help="in-process queries of each kind (default 30)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    if args.tokenizer is None or not args.tokenizer.is_file():
        parser.error("give --tokenizer FILE (or set CONCHDB_TEST_ASSETS to the shared assets folder)")
    if args.image_batch < 2:
        parser.error("--image-batch must be 2 or more (the baseline, 1, is measured beside it in every run)")

    with tempfile.TemporaryDirectory(prefix="conchdb-api-load-") as tmp:
        folder = Path(tmp)
        checkpoint = folder / "model.bin"
        save_checkpoint(random_model(args.model), checkpoint)
        encoder = Encoder.load(str(checkpoint), args.tokenizer, device=args.device, precision="auto")
        slides = write_slides(folder / "slides")
        log(f"building a store of {args.n} tiles over {SLIDES} slides")
        points = build_store(folder / "store", slides, args.n, encoder)
        tiles = []
        for point in points[:16]:
            p = point.payload
            with Image.open(p["path"]) as image:
                tiles.append(image.convert("RGB").crop((p["x"], p["y"], p["x"] + TILE_PX, p["y"] + TILE_PX)))
        texts = [term for term, _ in all_terms()]
        uploads, ids = [png_bytes(t) for t in tiles], [p.id for p in points]
        served = serve_and_load(folder, checkpoint, args, args.image_batch, texts, uploads, ids)
        alone = serve_and_load(folder, checkpoint, args, 1, texts, uploads, ids)
        base = alone["kinds"]["image"]["requests_per_s"]
        result = {"clients": args.clients, "seconds": args.seconds, "n_tiles": args.n, "model": args.model,
                  "device": args.device, **served, "one_at_a_time": alone,
                  "image_speedup": round(served["kinds"]["image"]["requests_per_s"] / base, 2) if base else None,
                  "targets": targets(served, alone)}
        log(f"in-process Searcher: {args.in_process} queries of each kind")
        result["in_process"] = in_process(folder / "store", encoder, texts, tiles, points, args.in_process)

    if args.json:
        print(json.dumps(result))
        return
    print(f"{args.clients} clients, {args.seconds:g} s, {args.n} tiles, {args.model} model on {args.device}")
    print(f"{'server':<16}{'kind':<8}{'requests':>10}{'req/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}"
          f"{'in-proc p50':>13}{'in-proc p99':>13}")
    for name, run in ((f"image batch {args.image_batch}", result), ("one at a time", result["one_at_a_time"])):
        for kind, row in [*run["kinds"].items(), ("all", run)]:
            local = result["in_process"].get(kind, {})
            print(f"{name:<16}{kind:<8}{row['requests']:>10}{row['requests_per_s']:>10}{row['p50_ms']!s:>10}"
                  f"{row['p99_ms']!s:>10}{row['errors']:>8}{local.get('p50_ms', ''):>13}{local.get('p99_ms', ''):>13}")
    print(f"image requests/s: {result['image_speedup']}x one at a time")
    for name, met in result["targets"].items():
        print(f"target {name}: {'met' if met else 'NOT met'}")


if __name__ == "__main__":
    main()
