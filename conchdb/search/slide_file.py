"""A slide that is not in the store, tiled and embedded as ingest would, for a query.

`conchdb search --slide-file PATH` asks "which stored slides look like this new one?"
before (or without) ingesting it. The slide is cut with the collection's own tiling (the
one recorded when it was built), read with the same `TileReader` and embedded with the
same `Encoder.encode_tiles` path as ingest, so a query slide that is also stored gets the
very vectors its stored copy has. Nothing is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from conchdb.errors import QueryError
from conchdb.slides.grid import Tile, TileGrid, TilingParams, plan_tiles
from conchdb.slides.reader import TileReader
from conchdb.slides.slide import open_slide
from conchdb.slides.tissue import TissueParams

if TYPE_CHECKING:
    from conchdb.model.encoder import Encoder


@dataclass
class EmbeddedSlide:
    """A slide file's tiles and their vectors (row i is tile i), and what it was read with."""

    path: Path
    grid: TileGrid
    vectors: np.ndarray
    mpp: float | None
    mpp_source: str | None

    @property
    def tiles(self) -> tuple[Tile, ...]:
        return self.grid.tiles


def tiling_from_metadata(metadata: Mapping[str, Any]) -> TilingParams:
    """The `TilingParams` a collection recorded (`metadata["tiling"]`), defaults for what it lacks."""
    recorded = metadata.get("tiling")
    if not isinstance(recorded, Mapping):
        return TilingParams()
    known = {f.name for f in fields(TilingParams)}
    values = {k: v for k, v in recorded.items() if k in known and k != "tissue"}
    tissue = recorded.get("tissue")
    if isinstance(tissue, Mapping):
        tissue_known = {f.name for f in fields(TissueParams)}
        values["tissue"] = TissueParams(**{k: v for k, v in tissue.items() if k in tissue_known})
    return TilingParams(**values)


def embed_slide_file(
    path: str | Path,
    encoder: Encoder,
    params: TilingParams,
    *,
    slide_mpp: float | None = None,
    readers: int = 0,
    batch_size: int = 32,
) -> EmbeddedSlide:
    """Tile `path` with `params` and embed every tile; a slide without tissue is an error."""
    path = Path(path)
    with open_slide(path, slide_mpp, override_source="slide_mpp") as slide:
        _, grid = plan_tiles(slide, params)
        mpp, source = slide.mpp, slide.mpp_source
    if len(grid) == 0:
        raise QueryError(
            f"no tissue found in {path} at {params.target_mpp:g} µm/px",
            fix="check the slide with the tiles command; a query slide needs tissue to compare",
            parameter="slide_file",
        )
    parts = []
    with TileReader(path, grid, batch_size=batch_size, workers=readers, mpp_override=slide_mpp) as reader:
        for batch in reader:
            parts.append(encoder.encode_tiles(batch.tiles))
    return EmbeddedSlide(path, grid, np.concatenate(parts).astype(np.float32), mpp, source)
