"""GPU JPEG decoding, run with torchvision's CPU decoder: the same pixels as OpenSlide within
JPEG tolerance, the CPU reader wherever it does not apply, and the same points in ingest."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from conchdb.ingest.gpu_jpeg import open_jpeg_source
from conchdb.slides.grid import TilingParams, plan_tiles
from conchdb.slides.pyramid import write_pyramid_tiff
from conchdb.slides.reader import TileReader
from conchdb.slides.slide import open_slide

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def pyramid(slides_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Real tissue as a 40×-like pyramid (0.25 µm/px), so 0.5 µm/px tiles are read at level 1."""
    with open_slide(slides_dir / "cmu_small_region.svs") as slide:
        w, h = slide.dimensions
        rgb = np.asarray(slide.read_region((0, 0), 0, (w, h)).convert("RGB"))
    big = np.repeat(np.repeat(rgb, 2, axis=0), 2, axis=1)
    path = tmp_path_factory.mktemp("jpeg") / "pyramid.tif"
    write_pyramid_tiff(path, [big, rgb, rgb[::2, ::2].copy()], mpp=0.25)
    return path


@pytest.mark.parametrize(("slide", "tile_px"), [("pyramid", 224), ("pyramid", 448), ("svs", 224)])
def test_device_decoding_gives_openslides_pixels(pyramid: Path, slides_dir: Path, slide: str, tile_px: int):
    """A tifffile pyramid (YCbCr tiles, read at level 1) and an Aperio SVS (RGB tiles sharing
    JPEG tables, read at level 0)."""
    pyramid = pyramid if slide == "pyramid" else slides_dir / "cmu_small_region.svs"
    with open_slide(pyramid) as slide:
        _, grid = plan_tiles(slide, TilingParams(tile_px=tile_px))
    source = open_jpeg_source(pyramid, grid, batch_size=6, device=CPU)
    assert source is not None
    with source:
        ours = torch.cat([b.tiles for b in source]).numpy().astype(np.float32)
    reference = np.concatenate([b.tiles for b in TileReader(pyramid, grid, batch_size=6, workers=0)])
    assert ours.shape == reference.shape
    diff = np.abs(ours - reference.astype(np.float32))
    assert diff.mean() < 2.0  # two JPEG decoders and two bicubic resizers, not bit-exact
    assert np.percentile(diff, 99) < 16


def test_other_compressions_fall_back(slides_dir: Path):
    """A PNG (no JPEG tiles) gets no device source: the CPU reader is used."""
    path = slides_dir / "boxes.png"
    with open_slide(path) as slide:
        _, grid = plan_tiles(slide, TilingParams())
    assert open_jpeg_source(path, grid, batch_size=4, device=CPU) is None


def test_ingest_with_device_decoding_gives_the_same_points(pyramid: Path, tmp_path: Path):
    """`gpu_jpeg` changes how pixels are decoded, not which tiles are stored: the same ids,
    and vectors as close as two JPEG decoders allow."""
    import shutil

    from conchdb.ingest.cohort import discover
    from conchdb.ingest.manifest import read_manifest
    from conchdb.ingest.pipeline import Ingest, IngestOptions
    from conchdb.model.encoder import Encoder
    from conchdb.store.edge import EdgeStore
    from tests.model.conftest import make_tiny_model

    root = tmp_path / "cohort"
    root.mkdir()
    shutil.copy(pyramid, root / "p.tif")
    encoder = Encoder.from_model(make_tiny_model(0), device="cpu")
    cohort = discover(root)
    points = {}
    for gpu_jpeg in (False, True):
        store = EdgeStore(tmp_path / f"store{gpu_jpeg}")
        options = IngestOptions(params=TilingParams(tile_px=224), batch_size=8, readers=0, gpu_jpeg=gpu_jpeg)
        Ingest(cohort, read_manifest(None, cohort), encoder, store, "tiles", options).run()
        points[gpu_jpeg] = {h.id: h.vector for h in store.scroll("tiles", with_vectors=True)}
        store.close()
    assert set(points[True]) == set(points[False]) and points[True]
    cosines = [float(np.dot(points[True][k], v)) for k, v in points[False].items()]
    assert min(cosines) > 0.99
