"""A confusion matrix as a PNG, drawn with Pillow (conchdb has no plotting library).

Rows are the true classes, columns the predicted ones; each cell is shaded by the share
of its row (so classes of different sizes read alike) and shows the count. Class names
longer than the margin are cut with an ellipsis.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

CELL = 56
MARGIN = 170
NAME_CHARS = 24


def _short(name: str) -> str:
    return name if len(name) <= NAME_CHARS else name[: NAME_CHARS - 1] + "…"


def confusion_image(matrix: np.ndarray, classes: Sequence[str], title: str) -> Image.Image:
    """The matrix with row/column names, a title, and counts in the cells."""
    n = len(classes)
    font = ImageFont.load_default()
    width, height = MARGIN + n * CELL + 20, MARGIN + n * CELL + 20
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((10, 10), title, fill="black", font=font)
    draw.text((MARGIN, MARGIN - 40), "predicted →", fill="black", font=font)
    draw.text((10, MARGIN - 20), "true ↓", fill="black", font=font)
    rows = matrix.sum(axis=1, keepdims=True)
    share = np.divide(matrix, rows, out=np.zeros(matrix.shape, dtype=float), where=rows > 0)
    for i, name in enumerate(classes):
        y = MARGIN + i * CELL
        draw.text((10, y + CELL // 2 - 6), _short(name), fill="black", font=font)
        column = Image.new("RGB", (MARGIN - 50, 14), "white")
        ImageDraw.Draw(column).text((0, 0), _short(name), fill="black", font=font)
        image.paste(column.rotate(90, expand=True), (MARGIN + i * CELL + CELL // 2 - 7, 40))
        for j in range(n):
            x = MARGIN + j * CELL
            level = int(255 - 200 * share[i, j])
            colour = (level, level, 255) if i == j else (255, level, level)
            draw.rectangle([x, y, x + CELL - 2, y + CELL - 2], fill=colour, outline=(200, 200, 200))
            text = str(int(matrix[i, j]))
            draw.text((x + CELL // 2 - 4 * len(text), y + CELL // 2 - 6), text, fill="black", font=font)
    return image
