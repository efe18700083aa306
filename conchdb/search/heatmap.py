"""Similarity heatmaps: how close each stored tile of a slide is to a query, over the slide.

The scores come from the stored tile vectors (one dot product per tile, nothing is
re-embedded); the picture is the slide's thumbnail with each tile's square tinted by its
score, a colour bar labelled with the score range, and the query as the title. Where
tiles overlap (a stride smaller than the tile) the overlapping scores are averaged.
The colour scale spans the slide's own lowest to highest score, so the contrast shows
where on this slide the query fits best; the bar's labels give the absolute values.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from conchdb.search.regions import open_source, thumbnail
from conchdb.store import Hit

# Anchor colours of the scale, low to high: matplotlib's viridis at nine stops, a perceptually
# uniform palette (equal steps in score look like equal steps in colour, and it reads in grey
# and to colour-blind eyes); its yellow high end stands out against pink and purple H&E.
VIRIDIS = (
    (0.000, 68, 1, 84), (0.125, 72, 40, 120), (0.250, 62, 73, 137), (0.375, 49, 104, 142), (0.500, 38, 130, 142),
    (0.625, 31, 158, 137), (0.750, 53, 183, 121), (0.875, 110, 206, 88), (1.000, 253, 231, 37),
)
_ANCHORS = np.array(VIRIDIS, dtype=np.float64)
BAR_WIDTH = 24
MARGIN = 12
TITLE_HEIGHT = 34


@dataclass
class Heatmap:
    """The picture and the numbers behind it."""

    image: Image.Image
    tiles: int
    low: float
    high: float
    best: Hit


def colormap(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] to uint8 RGB, interpolated between the anchor colours."""
    values = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    channels = [np.interp(values, _ANCHORS[:, 0], _ANCHORS[:, c]) for c in (1, 2, 3)]
    return np.stack(channels, axis=-1).round().astype(np.uint8)


def score_layer(shape: tuple[int, int], tiles: Sequence[Hit], scores: np.ndarray, downsample: float) -> np.ndarray:
    """(H, W) mean score of the tiles covering each thumbnail pixel; NaN where no tile is."""
    total = np.zeros(shape, dtype=np.float64)
    count = np.zeros(shape, dtype=np.int32)
    height, width = shape
    for tile, score in zip(tiles, scores, strict=True):
        x, y, size = (float(tile.payload[k]) for k in ("x", "y", "size"))
        x0, y0 = int(round(x / downsample)), int(round(y / downsample))
        x1 = min(width, max(x0 + 1, int(round((x + size) / downsample))))
        y1 = min(height, max(y0 + 1, int(round((y + size) / downsample))))
        total[y0:y1, x0:x1] += score
        count[y0:y1, x0:x1] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def render(
    thumb: Image.Image, downsample: float, tiles: Sequence[Hit], scores: np.ndarray, title: str, alpha: float = 0.55
) -> tuple[Image.Image, float, float]:
    """The thumbnail tinted by tile scores, with a title and a labelled colour bar; also the
    score range the colours span."""
    scores = np.asarray(scores, dtype=np.float64)
    low, high = float(scores.min()), float(scores.max())
    span = high - low if high > low else 1e-6
    base = np.asarray(thumb.convert("RGB"), dtype=np.float64)
    layer = score_layer(base.shape[:2], tiles, scores, downsample)
    covered = ~np.isnan(layer)
    colours = colormap((np.nan_to_num(layer, nan=low) - low) / span).astype(np.float64)
    base[covered] = (1 - alpha) * base[covered] + alpha * colours[covered]
    tinted = Image.fromarray(base.round().astype(np.uint8))

    width, height = tinted.size
    legend = 80
    canvas = Image.new("RGB", (width + 2 * MARGIN + BAR_WIDTH + legend, height + TITLE_HEIGHT + MARGIN), "white")
    canvas.paste(tinted, (MARGIN, TITLE_HEIGHT))
    draw = ImageDraw.Draw(canvas)
    draw.text((MARGIN, 8), title, fill=(20, 20, 20), font=_font(16))
    bar_x = width + MARGIN + MARGIN
    ramp = colormap(np.linspace(1.0, 0.0, height))[:, None, :].repeat(BAR_WIDTH, axis=1)
    canvas.paste(Image.fromarray(ramp), (bar_x, TITLE_HEIGHT))
    small = _font(12)
    for frac in (0.0, 0.25, 0.5, 0.75, 1.0):
        y = TITLE_HEIGHT + int(round((1 - frac) * (height - 1)))
        draw.line([(bar_x + BAR_WIDTH, y), (bar_x + BAR_WIDTH + 4, y)], fill=(40, 40, 40))
        draw.text((bar_x + BAR_WIDTH + 6, max(TITLE_HEIGHT, y - 7)), f"{low + frac * span:.3f}", fill=(40, 40, 40),
                  font=small)
    return canvas, low, high


def slide_heatmap(tiles: Sequence[Hit], scores: np.ndarray, title: str, max_side: int = 1024) -> Heatmap:
    """The heatmap of one slide's tiles, drawn over a thumbnail of its source slide."""
    with open_source(tiles[0].payload) as slide:
        thumb, downsample = thumbnail(slide, max_side)
    image, low, high = render(thumb, downsample, tiles, scores, title)
    return Heatmap(image, len(tiles), low, high, tiles[int(np.argmax(scores))])
