"""Where the tissue is: a boolean mask on a thumbnail of about 8 µm/px.

Stained tissue is coloured and glass is grey-white, so saturation separates them on H&E
and IHC alike, where brightness is fooled by pale fat or dark pen. Otsu picks the split
per slide; a floor under it keeps a blank slide's sensor noise from becoming tissue, and
a hysteresis step keeps pale tissue that touches clearly stained tissue. A closing joins
ragged edges, small specks (dust, debris) are dropped, and holes (lumens, fat) are kept,
because a tile over a hole really has less tissue in it.

The thumbnail is read block by block from the coarsest pyramid level that is still
at least as fine as the mask, so memory stays small even for a one-level slide.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage.filters import apply_hysteresis_threshold, threshold_otsu
from skimage.morphology import isotropic_closing

from conchdb.errors import ConchdbError
from conchdb.slides.region import choose_level, read_region
from conchdb.slides.slide import Slide

READ_BLOCK_PX = 4096
"""Largest side, in pixels of the level read, of one thumbnail block (≤ 64 MiB RGBA)."""

UNKNOWN_MPP_THUMBNAIL_PX = 1024
"""Thumbnail longest side for an image without a pixel size (µm parameters cannot apply)."""


@dataclass(frozen=True)
class TissueParams:
    """Tissue detection settings; the defaults suit H&E and IHC brightfield slides."""

    mask_mpp: float = 8.0
    """µm per mask pixel: fine enough for 256 µm tiles (32 mask pixels a side), cheap to read."""
    min_saturation: float = 0.05
    """Floor under Otsu's threshold (HSV saturation, 0–1): glass never reaches it."""
    hysteresis: float = 0.5
    """Pale tissue touching clearly stained tissue is kept down to this fraction of the
    threshold (loose stroma, fat septa); 1.0 turns it off."""
    closing_um: float = 16.0
    """Radius of the morphological closing, joining tissue split by thin pale gaps."""
    min_component_um2: float = 20_000.0
    """Connected pieces smaller than this area (a 140 µm square) are dust, not tissue."""

    def __post_init__(self) -> None:
        if not self.mask_mpp > 0:
            raise ConchdbError(f"mask_mpp must be positive, got {self.mask_mpp}", parameter="mask_mpp")
        if not 0 <= self.min_saturation < 1:
            raise ConchdbError(
                f"min_saturation must lie in [0, 1), got {self.min_saturation}", parameter="min_saturation"
            )
        if not 0 < self.hysteresis <= 1:
            raise ConchdbError(f"hysteresis must lie in (0, 1], got {self.hysteresis}", parameter="hysteresis")
        if self.closing_um < 0 or self.min_component_um2 < 0:
            raise ConchdbError(
                "closing_um and min_component_um2 must not be negative",
                parameter="closing_um" if self.closing_um < 0 else "min_component_um2",
            )


@dataclass(frozen=True)
class TissueMask:
    """A tissue mask and the thumbnail it came from; mask pixel (i, j) covers level-0
    pixels [j·d, (j+1)·d) × [i·d, (i+1)·d) where d is `downsample`."""

    mask: np.ndarray
    thumbnail: np.ndarray
    downsample: float
    threshold: float

    def fractions(self, xs: np.ndarray, ys: np.ndarray, size: float) -> np.ndarray:
        """Tissue fraction of each level-0 square (x, y, size), weighted by exact overlap area.

        A summed-area table is exactly bilinear between its grid points (the mask is
        constant inside each pixel), so interpolating it gives the area-weighted sum for
        boxes with fractional edges: no bias towards whole mask pixels."""
        height, width = self.mask.shape
        table = np.zeros((height + 1, width + 1), dtype=np.float64)
        table[1:, 1:] = self.mask.cumsum(axis=0).cumsum(axis=1)
        x0 = np.clip(np.asarray(xs, dtype=np.float64) / self.downsample, 0, width)
        y0 = np.clip(np.asarray(ys, dtype=np.float64) / self.downsample, 0, height)
        x1 = np.clip(x0 + size / self.downsample, 0, width)
        y1 = np.clip(y0 + size / self.downsample, 0, height)

        def corner(u: np.ndarray, v: np.ndarray) -> np.ndarray:
            return ndimage.map_coordinates(table, [v, u], order=1, mode="nearest")

        covered = corner(x1, y1) - corner(x0, y1) - corner(x1, y0) + corner(x0, y0)
        area = (size / self.downsample) ** 2
        return np.clip(covered / area, 0.0, 1.0)


def read_thumbnail(slide: Slide, downsample: float) -> np.ndarray:
    """RGB thumbnail at `downsample` level-0 pixels per pixel, read in bounded blocks."""
    width0, height0 = slide.dimensions
    out_w, out_h = max(1, math.ceil(width0 / downsample)), max(1, math.ceil(height0 / downsample))
    level = choose_level(slide, downsample)
    scale = downsample / slide.level_downsamples[level]  # level pixels per thumbnail pixel
    block = max(1, int(READ_BLOCK_PX / scale))  # thumbnail pixels per block side
    thumbnail = np.empty((out_h, out_w, 3), dtype=np.uint8)
    for top in range(0, out_h, block):
        for left in range(0, out_w, block):
            bw, bh = min(block, out_w - left), min(block, out_h - top)
            region = read_region(
                slide, round(left * downsample), round(top * downsample), bw * downsample, bh * downsample,
                out_size=(bw, bh), level=level, resample=Image.Resampling.BOX,
            )
            thumbnail[top : top + bh, left : left + bw] = np.asarray(region)
    return thumbnail


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1]: (max − min) / max, 0 for black."""
    rgb = rgb.astype(np.float32)
    high = rgb.max(axis=2)
    low = rgb.min(axis=2)
    return np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)


def remove_small_components(mask: np.ndarray, min_pixels: float) -> np.ndarray:
    """Drop 8-connected components with fewer than `min_pixels` pixels."""
    if min_pixels <= 1 or not mask.any():
        return mask
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    keep = sizes >= min_pixels
    keep[0] = False
    return keep[labels]


def tissue_threshold(sat: np.ndarray, floor: float) -> float:
    """Otsu's threshold on saturation, never below `floor`; a flat image uses the floor."""
    if float(sat.max() - sat.min()) < 1e-3:
        return floor
    return max(float(threshold_otsu(sat)), floor)


def compute_tissue_mask(slide: Slide, params: TissueParams | None = None) -> TissueMask:
    """Tissue mask of `slide` on a thumbnail at `params.mask_mpp` µm/px.

    Without a pixel size (a plain image that does not say) the thumbnail is at most
    1024 px a side and only the threshold applies, since the µm-sized steps cannot."""
    params = params or TissueParams()
    mpp = slide.mpp
    if mpp is None:
        downsample = max(1.0, max(slide.dimensions) / UNKNOWN_MPP_THUMBNAIL_PX)
    else:
        downsample = max(1.0, params.mask_mpp / mpp)
    thumbnail = read_thumbnail(slide, downsample)
    sat = saturation(thumbnail)
    threshold = tissue_threshold(sat, params.min_saturation)
    low = max(params.min_saturation, threshold * params.hysteresis)
    mask = apply_hysteresis_threshold(sat, low, threshold) if low < threshold else sat > threshold
    if mpp is not None:
        um_per_px = mpp * downsample
        radius = params.closing_um / um_per_px
        if radius >= 1 and mask.any():
            mask = isotropic_closing(mask, radius)
        mask = remove_small_components(mask, params.min_component_um2 / um_per_px**2)
    return TissueMask(mask=mask, thumbnail=thumbnail, downsample=downsample, threshold=threshold)
