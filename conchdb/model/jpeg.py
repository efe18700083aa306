"""Decoding slide JPEG tiles on the model's device (`torchvision.io.decode_jpeg`) and cutting
grid tiles out of them, so CPU cores do not have to decode a megapixel per tile.

The input is what `conchdb.slides.jpeg` reads: self-contained JPEG streams and, per grid
tile, which of them it covers and where it lies in their mosaic. Every stream of a batch
is decoded once (neighbouring grid tiles share JPEG tiles), the mosaics are assembled on
the device and each region is resized to the tile side with antialiased bicubic, so the
output is the uint8 (N, side, side, 3) batch the feed takes. On the CPU the same code runs
with torchvision's CPU decoder, which is how the tests compare it with OpenSlide's pixels.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch


class Region(Protocol):
    indices: tuple[int, ...]
    cols: int
    rows: int
    left: int
    top: int
    width: int
    height: int


def decode_streams(streams: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    """JPEG streams to (3, H, W) uint8 tensors on `device`, decoded in one batched call."""
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(s), dtype=torch.uint8) for s in streams]
    decoded = decode_jpeg(data, mode=ImageReadMode.RGB, device=device)
    return list(decoded)


def cut_tiles(
    regions: Sequence[Region],
    decoded: dict[int, torch.Tensor],
    tile_w: int,
    tile_h: int,
    side: int,
    device: torch.device,
) -> torch.Tensor:
    """Each region cut from its mosaic of `decoded` tiles and resized to `side`: (N, side, side, 3) uint8."""
    import torchvision.transforms.functional as TF

    out = torch.empty((len(regions), side, side, 3), dtype=torch.uint8, device=device)
    for n, region in enumerate(regions):
        mosaic = torch.zeros((3, region.rows * tile_h, region.cols * tile_w), dtype=torch.uint8, device=device)
        for k, index in enumerate(region.indices):
            r, c = divmod(k, region.cols)
            tile = decoded[index][:, :tile_h, :tile_w]
            mosaic[:, r * tile_h : r * tile_h + tile.shape[1], c * tile_w : c * tile_w + tile.shape[2]] = tile
        crop = mosaic[:, region.top : region.top + region.height, region.left : region.left + region.width]
        if crop.shape[1:] != (side, side):
            resized = TF.resize(crop.unsqueeze(0).float(), [side, side],
                                interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
            crop = resized[0].clamp_(0, 255).round_().to(torch.uint8)
        out[n] = crop.permute(1, 2, 0)
    return out
