"""Encoder throughput: conchdb's retrieval path beside the reference's extra caption pooler.

CONCH's reference `encode_image` runs the 256-query caption pooler on every call although
retrieval never reads it; conchdb skips it. Both paths run here in one process, on the same
device, precision and random full-size weights (speed does not depend on the values), from
uint8 512 px tiles, batched preprocessing included.

    python benchmarks/encoder.py [--device auto] [--precision auto] [--batch-sizes 1,8,32] [--json]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from conchdb.model.conch import ConchModel
from conchdb.model.device import resolve_device, resolve_precision
from conchdb.model.encoder import Encoder


def tiles_per_second(encoder: Encoder, tiles: np.ndarray, min_seconds: float, min_iters: int) -> float:
    encoder.encode_tiles(tiles)  # warm-up: allocator, kernels, autocast caches
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    done, start = 0, time.perf_counter()
    iters = 0
    while iters < min_iters or time.perf_counter() - start < min_seconds:
        encoder.encode_tiles(tiles)
        done += len(tiles)
        iters += 1
    if encoder.device.type == "cuda":
        torch.cuda.synchronize()
    return done / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--batch-sizes", default=None, help="comma-separated; default 1,4,8 (CPU), 1,32,128,256 (GPU)")
    parser.add_argument("--min-seconds", type=float, default=None, help="time per measurement")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    device = resolve_device(args.device)
    dtype = resolve_precision(args.precision, device)
    on_gpu = device.type == "cuda"
    sizes = [int(b) for b in (args.batch_sizes or ("1,32,128,256" if on_gpu else "1,4,8")).split(",")]
    min_seconds = args.min_seconds if args.min_seconds is not None else (5.0 if on_gpu else 3.0)
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]

    torch.manual_seed(0)
    retrieval = ConchModel()
    with_caption = ConchModel(caption_pooler=True)
    with_caption.load_state_dict(retrieval.state_dict(), strict=False)
    encoders = {
        "retrieval": Encoder(retrieval, None, device, dtype),
        "with_caption_pooler": Encoder(with_caption, None, device, dtype),
    }
    rng = np.random.default_rng(0)
    results: dict[str, dict[str, float]] = {name: {} for name in encoders}
    for batch in sizes:
        tiles = rng.integers(0, 256, (batch, 512, 512, 3), dtype=np.uint8)
        for name, encoder in encoders.items():
            encoder.batch_size = batch
            results[name][str(batch)] = tiles_per_second(encoder, tiles, min_seconds, min_iters=2)

    device_name = torch.cuda.get_device_name(device) if on_gpu else f"cpu ({torch.get_num_threads()} threads)"
    doc = {
        "device": device_name,
        "precision": precision,
        "retrieval_tiles_per_s": results["retrieval"],
        "with_caption_pooler_tiles_per_s": results["with_caption_pooler"],
    }
    if args.json:
        print(json.dumps(doc))
        return
    print(f"CONCH image encoder, 512 px uint8 tiles -> 512-d, {device_name}, {precision}")
    print(f"{'batch':>6} {'retrieval tiles/s':>18} {'+caption pooler tiles/s':>24} {'speedup':>8}")
    for batch in sizes:
        r, c = results["retrieval"][str(batch)], results["with_caption_pooler"][str(batch)]
        print(f"{batch:>6} {r:>18.2f} {c:>24.2f} {r / c:>7.2f}x")


if __name__ == "__main__":
    main()
