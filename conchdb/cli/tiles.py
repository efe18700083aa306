"""`conchdb tiles`: how a slide is tiled, before anything is embedded."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from conchdb.cli.app import app, err_console, handles_errors
from conchdb.cli.summaries import print_tiling
from conchdb.errors import ConchdbError

TargetMppOpt = Annotated[float, typer.Option("--target-mpp", help="Tile resolution, µm per pixel.")]
TilePxOpt = Annotated[int, typer.Option("--tile-px", help="Tile side in pixels.")]
StridePxOpt = Annotated[
    int | None, typer.Option("--stride-px", help="Step between tiles in pixels (default: the tile side).")
]
MinTissueOpt = Annotated[float, typer.Option("--min-tissue", help="Smallest tissue fraction kept.")]


@app.command()
@handles_errors
def tiles(
    slide: Annotated[Path, typer.Argument(help="A slide or image file.")],
    target_mpp: TargetMppOpt = 0.5,
    tile_px: TilePxOpt = 512,
    stride_px: StridePxOpt = None,
    min_tissue: MinTissueOpt = 0.25,
    slide_mpp: Annotated[
        float | None, typer.Option("--slide-mpp", help="The slide's level-0 µm/px, overriding its metadata.")
    ] = None,
    qc: Annotated[Path | None, typer.Option("--qc", help="Write a PNG: thumbnail, tissue mask, tiles.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the grid as one JSON object.")] = False,
) -> None:
    """Show how a slide is tiled: pixel size and its source, read level, and the tiles on tissue."""
    import json

    from conchdb.ingest.cohort import discover
    from conchdb.slides.grid import TilingParams, plan_tiles
    from conchdb.slides.qc import write_qc
    from conchdb.slides.slide import open_slide

    params = TilingParams(target_mpp, tile_px, stride_px, min_tissue)
    slide_id = discover(slide).slides[0].id
    with open_slide(slide, slide_mpp, override_source="--slide-mpp") as opened:
        mask, grid = plan_tiles(opened, params)
        if qc is not None:
            try:
                write_qc(qc, mask, grid)
            except OSError as exc:
                raise ConchdbError(f"cannot write the QC picture {qc}: {exc}", "check the folder") from None
        info = {
            "slide": str(slide),
            "slide_id": slide_id,
            "mpp": opened.mpp,
            "mpp_source": opened.mpp_source,
            "target_mpp": grid.target_mpp,
            "tile_px": grid.tile_px,
            "tile_size_level0": grid.tile_size_level0,
            "read_level": grid.read_level,
            "tiles": [{"x": t.x, "y": t.y, "tissue": t.tissue} for t in grid.tiles],
        }
        sizes = zip(opened.level_dimensions, opened.level_downsamples, strict=True)
        levels = [f"{w}×{h} (×{d:.4g})" for (w, h), d in sizes]
        kind = f"{opened.vendor} (OpenSlide)" if opened.vendor else "plain image (Pillow)"
        width, height = opened.dimensions
    for warning in grid.warnings:
        err_console.print(f"[yellow]warning:[/] {warning}", highlight=False, soft_wrap=True)
    if qc is not None:
        err_console.print(f"qc: wrote {qc}", highlight=False)
    if as_json:
        typer.echo(json.dumps(info))
        return
    print_tiling(info, grid, f"{slide}  (id {slide_id}, {kind})", f"{width} × {height} px", levels, min_tissue)
