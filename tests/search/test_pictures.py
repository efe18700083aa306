"""Export galleries and heatmaps: the pixels they read and the pictures they draw."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conchdb.search.export import export_hits
from conchdb.search.heatmap import _ANCHORS, colormap, render, score_layer
from conchdb.search.regions import open_source, parse_region, read_hit_tile
from conchdb.search.searcher import SearchHit
from conchdb.store import Hit


def _hit(rank: int, **payload) -> SearchHit:
    return SearchHit(rank, 0.9 - rank / 100, f"id-{rank}", payload)


def test_a_missing_slide_is_named_in_the_gallery_and_the_rest_exported(corpus, tmp_path):
    good = corpus.points[3].payload
    hits = [_hit(1, **good), _hit(2, **{**good, "path": str(tmp_path / "gone.svs"), "slide_id": "gone.svs"})]
    result = export_hits(hits, tmp_path / "out", "text: <b>tumor</b>")
    assert [t.file is not None for t in result.tiles] == [True, False]
    assert "gone.svs" in result.failures[0].error and "no such file" in result.failures[0].error
    html = (tmp_path / "out" / "index.html").read_text()
    assert "no image:" in html and "&lt;b&gt;tumor&lt;/b&gt;" in html, "titles and values are escaped"


def test_a_real_aperio_tile_is_cut_at_its_resolution(slides_dir, tmp_path):
    # cmu_small_region.svs is 0.499 µm/px: a 512-px tile at 0.5 µm/px spans 513 level-0 px
    payload = {"slide_id": "cmu", "path": str(slides_dir / "cmu_small_region.svs"), "x": 1026, "y": 513,
               "size": 513, "tile_px": 512, "mpp": 0.499, "target_mpp": 0.5}
    export_hits([SearchHit(1, 0.5, "a", payload)], tmp_path, "region")
    (jpeg,) = tmp_path.glob("*.jpg")
    with Image.open(jpeg) as image:
        assert image.size == (512, 512)
        pixels = np.asarray(image, dtype=float)
    with open_source(payload) as slide:
        direct = np.asarray(slide.read_region((1026, 513), 0, (513, 513)).resize((512, 512)), dtype=float)
    assert np.abs(pixels - direct).mean() < 6


def test_read_hit_tile_resizes_to_tile_px(corpus):
    payload = {**corpus.points[0].payload, "tile_px": 32}
    with open_source(payload) as slide:
        assert read_hit_tile(slide, payload).size == (32, 32)


@pytest.mark.parametrize(
    ("spec", "region"),
    [("a.svs+1,2,3,4", ("a.svs", 1, 2, 3, 4)), ("dir/x+y.svs+10,20,30,40", ("dir/x+y.svs", 10, 20, 30, 40)),
     ("plain.png", None), ("a.svs+1,2,3", None)],
)
def test_region_specs(spec, region):
    got = parse_region(spec)
    assert (None if got is None else (str(got.path), got.x, got.y, got.w, got.h)) == region


def _tile(x, y, size=10):
    return Hit("id", 0.0, {"x": x, "y": y, "size": size})


def test_score_layer_averages_overlaps_and_leaves_the_rest_empty():
    layer = score_layer((10, 20), [_tile(0, 0), _tile(5, 0)], np.array([0.2, 0.4]), downsample=1.0)
    assert [layer[0, 0], layer[0, 7], layer[0, 12]] == pytest.approx([0.2, 0.3, 0.4])
    assert np.isnan(layer[0, 16])


def test_colormap_runs_from_the_low_to_the_high_anchor():
    ends = colormap(np.array([0.0, 1.0, -5.0, 7.0]))
    assert ends[0].tolist() == _ANCHORS[0, 1:].tolist() and ends[1].tolist() == _ANCHORS[-1, 1:].tolist()
    assert ends[2].tolist() == ends[0].tolist() and ends[3].tolist() == ends[1].tolist()


def test_the_best_tile_is_drawn_in_the_high_colour():
    thumb = Image.new("RGB", (40, 20), "white")
    image, low, high = render(thumb, 1.0, [_tile(0, 0, 20), _tile(20, 0, 20)], np.array([0.1, 0.3]), "q")
    assert (low, high) == (0.1, 0.3)
    pixels = np.asarray(image, dtype=float)
    left, right = pixels[34 + 10, 12 + 10], pixels[34 + 10, 12 + 30]  # title band 34 px, margin 12 px
    assert np.abs(right - (0.45 * 255 + 0.55 * _ANCHORS[-1, 1:])).max() <= 1
    assert np.abs(left - (0.45 * 255 + 0.55 * _ANCHORS[0, 1:])).max() <= 1
