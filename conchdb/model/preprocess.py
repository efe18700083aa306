"""CONCH's image preprocessing, in two forms that agree.

`preprocess_pil` is the reference transform for one image of any mode and size: shorter
side to 448 with PIL bicubic, center crop, RGB, [0, 1], OpenAI CLIP mean/std. The goldens
pin it. `preprocess_batch` does the same to a uint8 batch of tiles on the model's device
(torch bicubic with antialias), which is how ingest feeds a GPU without a PIL round trip.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

PREPROCESSING = {
    "resize": "shorter side, bicubic",
    "crop": "center",
    "mean": list(OPENAI_MEAN),
    "std": list(OPENAI_STD),
}


def preprocess_pil(image: Image.Image, size: int = 448) -> torch.Tensor:
    """One image to a normalized (3, size, size) float tensor, as the reference does it."""
    import torchvision.transforms.functional as TF  # only image queries pay for importing torchvision

    image = TF.resize(image, size, interpolation=TF.InterpolationMode.BICUBIC)
    image = TF.center_crop(image, [size, size])
    tensor = TF.to_tensor(image.convert("RGB"))
    return TF.normalize(tensor, OPENAI_MEAN, OPENAI_STD)


def preprocess_batch(
    tiles: np.ndarray | torch.Tensor, size: int = 448, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """uint8 tiles (N, H, W, 3) to normalized (N, 3, size, size) float32 on `device`.

    The resized values are rounded to whole intensities, as PIL's uint8 output is, which
    keeps this path within ~1e-6 (cosine) of the reference on real tissue.
    """
    import torchvision.transforms.functional as TF

    if isinstance(tiles, np.ndarray) and not tiles.flags.writeable:
        tiles = tiles.copy()  # torch cannot wrap read-only memory (e.g. shared-memory batches)
    batch = torch.as_tensor(tiles)
    if batch.ndim != 4 or batch.shape[-1] != 3 or batch.dtype != torch.uint8:
        raise ValueError(f"expected uint8 tiles of shape (N, H, W, 3), got {tuple(batch.shape)} {batch.dtype}")
    x = batch.to(device, non_blocking=True).permute(0, 3, 1, 2).float()
    h, w = x.shape[-2:]
    if (h, w) != (size, size):
        x = TF.resize(x, size, interpolation=TF.InterpolationMode.BICUBIC, antialias=True)
        x = TF.center_crop(x, [size, size]).clamp_(0, 255).round_()
    x = x.div_(255.0)
    mean = torch.tensor(OPENAI_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(OPENAI_STD, device=x.device).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)
