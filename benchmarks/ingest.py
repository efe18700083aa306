"""Whole-ingest throughput, with the time split by stage, beside a lockstep baseline.

Writes a synthetic pyramidal 40× slide of real H&E tissue (the same one as
`benchmarks/tiling.py`, smaller), then ingests it twice in this one run into fresh
embedded stores, with the full-size CONCH architecture (random weights: speed does not
depend on the values) or `--model tiny` to expose everything but the model:

- conchdb: `conchdb.ingest.pipeline.ingest` (reader processes, batched preprocessing on the
  model's device, a writer thread); stages timed by the pipeline itself;
- lockstep baseline: for each tile in turn, `read_region` at level 0, PIL resize, the
  reference per-image preprocessing, the model on a batch of one, one upsert.

The stage columns are seconds spent in the main thread waiting for tiles (reading),
preprocessing, in the model, and writing (the writer thread's time, overlapped with the rest).

    python benchmarks/ingest.py [--size 6144] [--model full|tiny] [--device auto] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Reader workers re-run this script's top-level imports (CPython's forkserver prepares the
# main module in each child), so the heavy modules are imported inside the functions.


def lockstep(slide_path: Path, grid_tiles: list, size0: int, tile_px: int, encoder: Any, store_dir: Path) -> dict:
    """One tile at a time through every stage, as a simple script would do it."""
    import openslide

    from conchdb.model.preprocess import preprocess_pil
    from conchdb.slides.region import TILE_FILTER
    from conchdb.store import CollectionSpec, Point, tile_point_id
    from conchdb.store.edge import EdgeStore

    store = EdgeStore(store_dir)

    store.ensure_collection(CollectionSpec("tiles", encoder.dim, {"model_fingerprint": encoder.fingerprint}))
    times = {"read_s": 0.0, "preprocess_s": 0.0, "model_s": 0.0, "write_s": 0.0}
    slide = openslide.OpenSlide(str(slide_path))
    start = time.perf_counter()
    for x, y in grid_tiles:
        t0 = time.perf_counter()
        region = slide.read_region((x, y), 0, (size0, size0)).convert("RGB").resize((tile_px, tile_px), TILE_FILTER)
        t1 = time.perf_counter()
        pixels = preprocess_pil(region).unsqueeze(0)
        t2 = time.perf_counter()
        vector = encoder._run_images(pixels, raw=False)[0]
        t3 = time.perf_counter()
        pid = tile_point_id("bench", x, y, size0, 0.5, encoder.fingerprint)
        store.upsert("tiles", [Point(pid, vector, {"x": x, "y": y})])
        t4 = time.perf_counter()
        for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            times[key] += dt
    elapsed = time.perf_counter() - start
    slide.close()
    store.close()
    return {"tiles": len(grid_tiles), "seconds": elapsed, "tiles_per_s": len(grid_tiles) / elapsed, **times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=6144, help="slide side in level-0 px at 0.25 µm/px")
    parser.add_argument("--model", choices=("full", "tiny"), default="full")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None, help="default 8 on CPU, 128 on GPU")
    parser.add_argument("--readers", type=int, default=2)
    parser.add_argument("--source", type=Path, default=None, help="tissue source slide")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    import torch

    from conchdb.ingest.pipeline import IngestOptions, ingest
    from conchdb.model.conch import ConchModel
    from conchdb.model.config import ConchConfig
    from conchdb.model.encoder import Encoder
    from conchdb.store.edge import EdgeStore

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiling import default_source, write_slide  # the sibling benchmark's slide writer

    torch.manual_seed(0)
    model = ConchModel(ConchConfig() if args.model == "full" else ConchConfig.tiny())
    encoder = Encoder.from_model(model, device=args.device)
    encoder.batch_size = args.batch_size or (128 if encoder.device.type == "cuda" else 8)
    with tempfile.TemporaryDirectory(prefix="conchdb-bench-") as tmp:
        root = Path(tmp)
        cohort = root / "cohort"
        cohort.mkdir()
        slide_path = cohort / "synthetic_40x.tif"
        write_slide(slide_path, args.size, args.source or default_source())

        options = IngestOptions(batch_size=encoder.batch_size, readers=args.readers)
        store = EdgeStore(root / "store")
        summary = ingest(cohort, encoder, store, "tiles", options=options)
        if summary.tiles_written == 0:
            store.close()
            parser.error(f"a slide of --size {args.size} px gave no tissue tile to embed; give a larger --size "
                         f"(the default is {parser.get_default('size')})")
        tiles = [(h.payload["x"], h.payload["y"]) for h in store.scroll("tiles")]
        size0 = next(iter(store.scroll("tiles"))).payload["size"]
        store.close()
        t = summary.timings
        ours = {
            "tiles": summary.tiles_written,
            "seconds": summary.seconds,
            "tiles_per_s": summary.tiles_written / summary.seconds,
            "read_s": t.get("read_wait_s", 0.0),
            "preprocess_s": t.get("preprocess_s", 0.0),
            "model_s": t.get("model_s", 0.0),
            "write_s": t.get("write_s", 0.0),
            "index_s": t.get("index_s", 0.0),
        }
        base = lockstep(slide_path, sorted(tiles), size0, 512, encoder, root / "baseline")

    doc = {
        "device": str(encoder.device),
        "model": args.model,
        "batch_size": encoder.batch_size,
        "readers": args.readers,
        "slide_px": args.size,
        "conchdb": {k: round(v, 3) for k, v in ours.items()},
        "lockstep_baseline": {k: round(v, 3) for k, v in base.items()},
        "speedup": round(ours["tiles_per_s"] / base["tiles_per_s"], 3),
    }
    if args.json:
        print(json.dumps(doc))
        return
    print(f"ingest of a {args.size}×{args.size} px 40× slide, {ours['tiles']} tiles, {args.model} CONCH on "
          f"{encoder.device}, batch {encoder.batch_size}, {args.readers} readers")
    cols = ("tiles_per_s", "seconds", "read_s", "preprocess_s", "model_s", "write_s")
    print(f"{'':<18}" + "".join(f"{c:>14}" for c in cols))
    for name, row in (("conchdb", ours), ("lockstep baseline", base)):
        print(f"{name:<18}" + "".join(f"{row[c]:>14.2f}" for c in cols))
    print(f"speedup {doc['speedup']:.2f}x; slowest conchdb stage: "
          f"{max(('read_s', 'preprocess_s', 'model_s', 'write_s'), key=lambda c: ours[c])}")


if __name__ == "__main__":
    main()
