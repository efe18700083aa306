"""The GPU feeding path on one device, in one run, one table: model only, end to end, and the
lockstep baseline.

- model only (synthetic uint8 tiles already on the device, batched preprocessing included):
  tiles/s at each batch size, in fp32 and bf16, with and without `torch.compile` (its
  warm-up seconds reported), beside the same forward with CONCH's caption pooler (what the
  reference runs); achieved TFLOP/s (FLOPs per tile counted by torch's FlopCounterMode) and
  the fraction of `--peak-tflops` (790: an H200's dense bf16);
- end to end: a synthetic 40× pyramidal slide of JPEG tiles made from real tissue, ingested
  by `conchdb.ingest.pipeline` into a fresh embedded store with each reader count (the
  single-reader run uses a smaller slide, `--one-reader-px`, to stay in the time budget), and
  once with the slide's JPEG tiles decoded on the device (`--gpu-jpeg` path); with the time
  the model side waited for tiles, for host-to-device copies, for vectors, and writing;
- the lockstep baseline on the same slide (open it, `read_region` each tile, PIL
  preprocessing, the model on one tile, one upsert), on the first `--lockstep-tiles` tiles;
- peak GPU memory and the peak resident memory of this process and its readers (shared
  slots touched by several processes count once per process, so it is an upper bound).

    python benchmarks/gpu.py [--device auto] [--small] [--json]

`--small` is the CPU-sized configuration (tiny model, small batches and slide, no compile).
Random weights: speed does not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# Reader workers re-run this script's top-level imports (forkserver prepares the main module
# in each child), so the heavy modules are imported inside the functions.

TILE = 256
JPEG_QUALITY = 90


def write_slide(path: Path, size: int, source: Path) -> None:
    """A `size`² px pyramid at 0.25 µm/px (levels 1, 4, 16) repeating real tissue. Level 0 repeats
    the texture's JPEG tiles byte for byte (encoded once), so a 60,000 px slide takes seconds."""
    import numpy as np
    import tifffile
    from PIL import Image

    from conchdb.slides.pyramid import write_pyramid_tiff

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from tiling import DOWNSAMPLES, MPP, TEXTURE, repeated_level, tissue_texture

    texture = tissue_texture(source)
    tex_rows, tex_cols = TEXTURE[1] // TILE, TEXTURE[0] // TILE
    sample = path.with_suffix(".texture.tif")
    write_pyramid_tiff(sample, [texture], mpp=MPP, tile=TILE, quality=JPEG_QUALITY)
    with tifffile.TiffFile(sample) as tif:
        page = tif.pages[0]
        fh = tif.filehandle
        encoded = []
        for offset, count in zip(page.dataoffsets, page.databytecounts, strict=True):
            fh.seek(offset)
            encoded.append(fh.read(count))
        photometric, tables, subsampling = page.photometric, page.jpegtables, page.subsampling
    sample.unlink()
    across = -(-size // TILE)

    def level0():
        for row in range(across):
            for col in range(across):
                yield encoded[(row % tex_rows) * tex_cols + col % tex_cols]

    per_cm = 1e4 / MPP
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(level0(), shape=(size, size, 3), dtype=np.uint8, tile=(TILE, TILE), photometric=photometric,
                  compression="jpeg", subsampling=subsampling, jpegtables=tables, subfiletype=0,
                  resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
        for d in DOWNSAMPLES[1:]:
            small = np.asarray(Image.fromarray(texture).resize((TEXTURE[0] // d, TEXTURE[1] // d),
                                                               Image.Resampling.LANCZOS))
            level = repeated_level(small, -(-size // d), -(-size // d), TILE)
            tiles = (level.tile(r, c) for r in range(-(-level.height // TILE)) for c in range(-(-level.width // TILE)))
            tif.write(tiles, shape=(level.height, level.width, 3), dtype=np.uint8, tile=(TILE, TILE),
                      photometric="rgb", compression="jpeg", compressionargs={"level": JPEG_QUALITY},
                      subsampling=(2, 2), subfiletype=1, resolution=(per_cm / d, per_cm / d),
                      resolutionunit="CENTIMETER")


def flops_per_tile(model: Any, image_size: int, device: Any) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:  # its module hooks refuse inference mode
        model.encode_image(torch.zeros(1, 3, image_size, image_size, device=device))
    return float(counter.get_total_flops())


def model_only(feed: Any, batch: int, min_seconds: float) -> tuple[float, float]:
    """(tiles/s, warm-up seconds) for the feed's forward on uint8 tiles already on the device.
    The warm-up call is where a compiled feed compiles (once per new shape)."""
    import torch

    encoder = feed.encoder
    tiles = torch.randint(0, 256, (batch, encoder.image_size, encoder.image_size, 3), dtype=torch.uint8,
                          device=encoder.device)
    start = time.perf_counter()
    feed.submit(tiles)
    feed.drain()
    warm = time.perf_counter() - start
    done, start = 0, time.perf_counter()
    while done < 3 * batch or time.perf_counter() - start < min_seconds:
        feed.submit(tiles)
        done += batch
    feed.drain()
    return done / (time.perf_counter() - start), warm


def end_to_end(slide: Path, encoder: Any, readers: int, batch: int, root: Path, gpu_jpeg: bool = False) -> dict:
    from conchdb.ingest.pipeline import IngestOptions, ingest
    from conchdb.store.edge import EdgeStore

    store_dir = root / f"store-{readers}-{int(gpu_jpeg)}-{slide.parent.name}"
    store = EdgeStore(store_dir)
    try:
        options = IngestOptions(batch_size=batch, readers=readers, gpu_jpeg=gpu_jpeg)
        summary = ingest(slide.parent, encoder, store, "tiles", options=options)
    finally:
        store.close()
    t = summary.timings
    return {
        "tiles": summary.tiles_written,
        "seconds": round(summary.seconds, 3),
        "tiles_per_s": round(summary.tiles_written / summary.seconds, 2) if summary.seconds else 0.0,
        "stage_wait_s": {k: round(t.get(k, 0.0), 3)
                         for k in ("read_wait_s", "h2d_wait_s", "model_s", "d2h_wait_s", "write_s", "index_s")},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--small", action="store_true", help="CPU-sized: tiny model, small batches and slide")
    parser.add_argument("--model", choices=("full", "tiny"), default=None)
    parser.add_argument("--batch-sizes", default=None, help="model-only batch sizes (default 64,128,256,512)")
    parser.add_argument("--compile", choices=("both", "off", "on"), default=None, help="model-only compile modes")
    parser.add_argument("--slide-px", type=int, default=None, help="end-to-end slide side (default 61440)")
    parser.add_argument("--one-reader-px", type=int, default=None, help="slide side for 1 reader (default 24576)")
    parser.add_argument("--readers", default=None, help="reader counts (default 1,8,15)")
    parser.add_argument("--lockstep-tiles", type=int, default=None, help="tiles the baseline runs (default 300)")
    parser.add_argument("--min-seconds", type=float, default=None, help="per model-only measurement")
    parser.add_argument("--peak-tflops", type=float, default=790.0)
    parser.add_argument("--source", type=Path, default=None, help="tissue source slide")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    import psutil
    import torch

    from conchdb.model.conch import ConchModel
    from conchdb.model.config import ConchConfig
    from conchdb.model.device import resolve_device, resolve_precision
    from conchdb.model.encoder import Encoder
    from conchdb.model.feed import DeviceFeed, device_batch_size
    from conchdb.slides.grid import TilingParams, plan_tiles
    from conchdb.slides.slide import open_slide

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from ingest import lockstep
    from tiling import ProcessTreeMonitor, default_source

    small = args.small
    model_kind = args.model or ("tiny" if small else "full")
    sizes = [int(b) for b in (args.batch_sizes or ("4,8" if small else "64,128,256,512")).split(",")]
    compile_modes = {"both": [False, True], "off": [False], "on": [True]}[args.compile or ("off" if small else "both")]
    slide_px = args.slide_px or (4096 if small else 61440)
    one_reader_px = min(args.one_reader_px or (slide_px if small else 24576), slide_px)
    reader_counts = [int(r) for r in (args.readers or ("1,2" if small else "1,8,15")).split(",")]
    lockstep_tiles = args.lockstep_tiles or (20 if small else 300)
    min_seconds = args.min_seconds if args.min_seconds is not None else (0.5 if small else 2.0)
    config = ConchConfig() if model_kind == "full" else ConchConfig.tiny()
    source = args.source or default_source()

    torch.manual_seed(0)
    base = ConchModel(config, towers=("vision",))
    captioned = ConchModel(config, caption_pooler=True, towers=("vision",))
    captioned.load_state_dict(base.state_dict(), strict=False)
    device = resolve_device(args.device)

    def encoder_of(model: ConchModel, precision: str) -> Encoder:  # one tower: a fingerprint must be given
        return Encoder(model, None, device, resolve_precision(precision, device), fingerprint="bench")

    encoders = {precision: encoder_of(base, precision) for precision in ("fp32", "bf16")}
    on_gpu = device.type == "cuda"
    image_size = config.vision.image_size
    flops = flops_per_tile(base.to(device), image_size, device)
    flops_caption = flops_per_tile(captioned.to(device), image_size, device)

    # model_tiles_per_s[precision]["eager" | "compile"][batch]; one feed per mode, so a
    # compiled forward is compiled for the first size and once more, dynamic, for the rest.
    model_rates: dict[str, dict[str, dict[str, float]]] = {}
    caption_rates: dict[str, dict[str, float]] = {}
    compile_s: dict[str, float] = {}
    for precision, encoder in encoders.items():
        model_rates[precision] = {}
        for compiled in compile_modes:
            mode = "compile" if compiled else "eager"
            feed = DeviceFeed(encoder, compile=compiled)
            model_rates[precision][mode] = {}
            for batch in sizes:
                rate, warm = model_only(feed, batch, min_seconds)
                model_rates[precision][mode][str(batch)] = round(rate, 2)
                if compiled:
                    compile_s[precision] = round(compile_s.get(precision, 0.0) + warm, 2)
        cap = DeviceFeed(encoder_of(captioned, precision))
        caption_rates[precision] = {str(b): round(model_only(cap, b, min_seconds)[0], 2) for b in sizes}
        del cap
    tflops = {p: {m: {b: round(r * flops / 1e12, 3) for b, r in rates.items()} for m, rates in modes.items()}
              for p, modes in model_rates.items()}
    caption_tflops = {p: {b: round(r * flops_caption / 1e12, 3) for b, r in rates.items()}
                      for p, rates in caption_rates.items()}

    encoder = encoders["bf16" if on_gpu else "fp32"]
    batch = device_batch_size(device, fallback=max(sizes))
    e2e: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="conchdb-gpu-bench-") as tmp, ProcessTreeMonitor() as monitor:
        root = Path(tmp)
        big, little = root / "big" / "synthetic_40x.tif", root / "little" / "synthetic_40x.tif"
        big.parent.mkdir()
        t = time.perf_counter()
        write_slide(big, slide_px, source)
        slide_write_s = time.perf_counter() - t
        if 1 in reader_counts and one_reader_px != slide_px:
            little.parent.mkdir()
            write_slide(little, one_reader_px, source)
        for readers in reader_counts:
            slide = little if readers == 1 and little.exists() else big
            e2e[f"{readers} readers"] = {"slide_px": one_reader_px if slide == little else slide_px,
                                         **end_to_end(slide, encoder, readers, batch, root)}
        # Readers only matter if the device decoder is refused and the pipeline falls back.
        e2e["gpu-jpeg"] = {"slide_px": slide_px,
                           **end_to_end(big, encoder, max(reader_counts), batch, root, gpu_jpeg=True)}
        with open_slide(big) as opened:
            _, grid = plan_tiles(opened, TilingParams())
        coords = [(t.x, t.y) for t in grid.tiles[:lockstep_tiles]]
        base_run = lockstep(big, coords, grid.tile_size_level0, grid.tile_px, encoder, root / "lockstep")
    peak_gpu_mb = round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if on_gpu else None

    best = max((row["tiles_per_s"] for row in e2e.values()), default=0.0)
    doc = {
        "device": torch.cuda.get_device_name(device) if on_gpu else f"cpu ({psutil.cpu_count()} cores)",
        "model": model_kind,
        "flops_per_tile": flops,
        "flops_per_tile_caption_pooler": flops_caption,
        "model_tiles_per_s": model_rates,
        "caption_pooler_tiles_per_s": caption_rates,
        "compile_warmup_s": compile_s,
        "tflops": tflops,
        "caption_pooler_tflops": caption_tflops,
        "fraction_of_peak": {p: {m: {b: round(v / args.peak_tflops, 4) for b, v in r.items()} for m, r in modes.items()}
                             for p, modes in tflops.items()},
        "end_to_end_batch_size": batch,
        "end_to_end_tiles_per_s": {k: row["tiles_per_s"] for k, row in e2e.items()},
        "end_to_end": e2e,
        "lockstep_tiles_per_s": round(base_run["tiles_per_s"], 2),
        "lockstep_tiles": base_run["tiles"],
        "speedup_vs_lockstep": round(best / base_run["tiles_per_s"], 2) if base_run["tiles_per_s"] else None,
        "stage_wait_s": {k: row["stage_wait_s"] for k, row in e2e.items()},
        "peak_gpu_mb": peak_gpu_mb,
        "peak_host_mb": round(monitor.peak_rss / 2**20, 1),
        "slide_write_s": round(slide_write_s, 2),
        # Reader slots live in /dev/shm; a container's small default there kills readers (SIGBUS).
        "dev_shm_mb": round(shutil.disk_usage("/dev/shm").total / 2**20) if Path("/dev/shm").exists() else None,
    }
    if args.json:
        print(json.dumps(doc))
        return
    print(f"{doc['device']}: {model_kind} CONCH vision tower, {flops / 1e9:.1f} GFLOP/tile "
          f"({flops_caption / 1e9:.1f} with the caption pooler)")
    print(f"{'model only, tiles/s':<22}" + "".join(f"{'b' + str(b):>12}" for b in sizes)
          + f"{'TFLOP/s max':>14}{'of peak':>9}")
    rows = [(f"{p} {m}", rates, tflops[p][m]) for p, modes in model_rates.items() for m, rates in modes.items()]
    rows += [(f"{p} caption pooler", rates, caption_tflops[p]) for p, rates in caption_rates.items()]
    for name, rates, achieved in rows:
        top = max(achieved.values())
        print(f"{name:<22}" + "".join(f"{rates[str(b)]:>12.1f}" for b in sizes)
              + f"{top:>14.3f}{top / args.peak_tflops:>9.1%}")
    if compile_s:
        print("compile warm-up, all sizes (s): " + ", ".join(f"{k} {v}" for k, v in compile_s.items()))
    waits = ("read_wait_s", "h2d_wait_s", "model_s", "d2h_wait_s", "write_s")
    print(f"\n{'end to end':<14}{'slide px':>9}{'tiles':>7}{'tiles/s':>10}" + "".join(f"{w:>13}" for w in waits))
    for name, row in e2e.items():
        print(f"{name:<14}{row['slide_px']:>9}{row['tiles']:>7}{row['tiles_per_s']:>10.1f}"
              + "".join(f"{row['stage_wait_s'][w]:>13.2f}" for w in waits))
    print(f"{'lockstep':<14}{slide_px:>9}{base_run['tiles']:>7}{base_run['tiles_per_s']:>10.1f}")
    print(f"\nbatch {batch}; best end to end {doc['speedup_vs_lockstep']}× lockstep; peak GPU "
          f"{peak_gpu_mb} MB, peak host {doc['peak_host_mb']} MB; slide written in {doc['slide_write_s']} s")


if __name__ == "__main__":
    main()
