"""The GPU feeding path (device feed, zero-copy readers, slides in flight) run on the CPU:
the same points as the simple path, and a failing slide stops alone."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conchdb.catalog import SlideStatus
from conchdb.ingest.cohort import discover
from conchdb.ingest.inflight import slides_in_flight
from conchdb.ingest.manifest import read_manifest
from conchdb.ingest.pipeline import Ingest, IngestOptions, Progress
from conchdb.model.encoder import Encoder
from conchdb.model.feed import DeviceFeed, embed_batches
from conchdb.slides.grid import TilingParams, plan_tiles
from conchdb.slides.pyramid import write_pyramid_tiff
from conchdb.slides.reader import TileReader
from conchdb.slides.slide import open_slide
from conchdb.store import tile_point_id
from conchdb.store.edge import EdgeStore
from tests.model.conftest import make_tiny_model

PARAMS = TilingParams(tile_px=224)  # fewer, larger tiles keep the tiny model's runs short


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    enc = Encoder.from_model(make_tiny_model(0), device="cpu")
    enc.batch_size = 8
    return enc


@pytest.fixture(scope="module")
def cohort(slides_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three readable slides (two pyramids of real tissue, one plain image) and one whose
    regions cannot be decoded."""
    root = tmp_path_factory.mktemp("feed") / "cohort"
    root.mkdir()
    shutil.copy(slides_dir / "cmu_small_region.svs", root / "a_cmu.svs")
    with open_slide(slides_dir / "cmu_small_region.svs") as slide:
        w, h = slide.dimensions
        rgb = np.asarray(slide.read_region((0, 0), 0, (w, h)).convert("RGB"))
    write_pyramid_tiff(root / "b_pyramid.tif", [rgb[:, ::-1].copy(), rgb[::2, ::-2].copy()], mpp=0.499)
    shutil.copy(slides_dir / "boxes.png", root / "c_boxes.png")
    shutil.copy(slides_dir / "unreadable.svs", root / "d_unreadable.svs")
    return root


def _simple(root: Path, encoder: Encoder) -> dict[tuple[str, int, int], np.ndarray]:
    """The simple path: each readable slide read in-process, `Encoder.encode_tiles`."""
    out = {}
    for slide in discover(root).slides:
        if "unreadable" in slide.id:
            continue
        with open_slide(slide.path) as opened:
            _, grid = plan_tiles(opened, PARAMS)
        for batch in TileReader(slide.path, grid, batch_size=5, workers=0):
            for (x, y), vec in zip(batch.coords, encoder.encode_tiles(batch.tiles), strict=True):
                out[(slide.id, int(x), int(y))] = vec
    return out


def _run(root: Path, encoder: Encoder, store_dir: Path, progress: Progress | None = None, **options):
    cohort = discover(root)
    store = EdgeStore(store_dir)
    try:
        run = Ingest(cohort, read_manifest(None, cohort), encoder, store, "tiles",
                     IngestOptions(params=PARAMS, **{"batch_size": 8, "read_batch": 3, **options}), progress)
        summary = run.run()
        points = {h.id: h for h in store.scroll("tiles", with_vectors=True)}
        return run, summary, points
    finally:
        store.close()


@pytest.fixture(scope="module")
def reference(cohort: Path, encoder: Encoder) -> dict[tuple[str, int, int], np.ndarray]:
    return _simple(cohort, encoder)


@pytest.mark.parametrize("readers", [0, 1, 2])
@pytest.mark.parametrize("in_flight", [1, 3])
def test_same_points_as_the_simple_path(cohort, encoder, reference, tmp_path, readers, in_flight):
    run, summary, points = _run(cohort, encoder, tmp_path / "store", readers=readers, slides_in_flight=in_flight)
    statuses = {o.slide_id: o.status for o in summary.outcomes}
    assert statuses.pop("d_unreadable.svs") == SlideStatus.FAILED  # fails alone ...
    assert set(statuses.values()) == {SlideStatus.DONE}  # ... the others are done
    assert len(points) == len(reference)
    by_tile = {(p.payload["slide_id"], p.payload["x"], p.payload["y"]): p for p in points.values()}
    assert set(by_tile) == set(reference)
    for (slide_id, x, y), vec in reference.items():
        point = by_tile[(slide_id, x, y)]
        slide = next(s for s in run.cohort.slides if s.id == slide_id)
        identity = f"{run.cohort_name}/{slide_id}@{slide.identity}"
        size = point.payload["size"]
        assert point.id == tile_point_id(identity, x, y, size, PARAMS.target_mpp, encoder.fingerprint)
        cosine = float(np.dot(point.vector, vec) / (np.linalg.norm(point.vector) * np.linalg.norm(vec)))
        assert cosine > 0.9999


def test_a_dead_reader_process_fails_only_its_slide(cohort, encoder, reference, tmp_path, monkeypatch):
    """Killing the first slide's reader processes after its first batch fails that slide with
    the reader's message; the slides after it (already reading ahead) are done."""
    opened: list[TileReader] = []
    original = Ingest._open_source

    def recording(self, *args):
        reader = original(self, *args)
        if reader is not None:
            opened.append(reader)
        return reader

    killed: list[bool] = []

    def on_batch(_n: int) -> None:
        if not killed:
            victim = next(r for r in opened if r.path.name == "a_cmu.svs")
            for proc in victim._procs:
                proc.kill()
            killed.append(True)

    monkeypatch.setattr(Ingest, "_open_source", recording)
    _, summary, points = _run(cohort, encoder, tmp_path / "store", Progress(on_batch=on_batch),
                              readers=2, slides_in_flight=3)
    outcomes = {o.slide_id: o for o in summary.outcomes}
    assert outcomes["a_cmu.svs"].status == SlideStatus.FAILED
    assert "tile reader process died" in outcomes["a_cmu.svs"].error
    assert outcomes["b_pyramid.tif"].status == SlideStatus.DONE
    assert outcomes["c_boxes.png"].status == SlideStatus.DONE
    assert {p.payload["slide_id"] for p in points.values()} == {"b_pyramid.tif", "c_boxes.png"}
    assert all(not r._procs for r in opened)  # every reader was shut down


def test_a_failing_source_drops_what_is_in_flight(encoder):
    """A source that raises mid-slide: the error goes on and the feed is empty for the next slide."""
    feed = DeviceFeed(encoder)
    tiles = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)

    class Batch:
        def __init__(self, start):
            self.tiles, self.start = tiles, start

    def failing():
        yield Batch(0)
        raise RuntimeError("reader gone")

    with pytest.raises(RuntimeError, match="reader gone"):
        list(embed_batches(failing(), feed))
    assert feed.drain() == []
    (start, vectors), = list(embed_batches([Batch(4)], feed))
    assert start == 4 and np.allclose(vectors, encoder.encode_tiles(tiles), atol=1e-5)


def test_slides_in_flight_reads_ahead_and_closes_what_it_did_not_hand_out():
    """With depth 3, three readers are started before the first slide is handed out; leaving
    early closes the readers not handed out."""
    events: list[str] = []

    class FakeReader:
        def __init__(self, name):
            self.name = name

        def start(self):
            events.append(f"start {self.name}")

        def close(self):
            events.append(f"close {self.name}")

    flight = slides_in_flight(list("abcde"), lambda item: item, lambda _item, plan: FakeReader(plan), depth=3)
    item, plan, reader = next(flight)
    assert (item, plan, reader.name) == ("a", "a", "a")
    deadline = time.monotonic() + 10  # the planner thread starts them while "a" is embedded
    while not {"start a", "start b", "start c"} <= set(events) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert {"start a", "start b", "start c"} <= set(events) and "start e" not in events
    flight.close()
    assert {"close b", "close c"} <= set(events) and "close a" not in events


def test_attention_is_fused_in_the_trunk_and_the_pooler(encoder):
    """Both the ViT blocks and the attentional pooler reach F.scaled_dot_product_attention."""
    calls: list[str] = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append("sdpa")
        return original(*args, **kwargs)

    model = encoder.model
    blocks = len(model.visual.trunk.blocks)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
        with torch.inference_mode():
            model.encode_image(torch.zeros(2, 3, 64, 64))
    assert len(calls) == blocks + 1


def test_compiled_forward_sees_one_batch_size(encoder, monkeypatch):
    """With `compile`, a short last batch is padded to the compiled size (one compile), the
    padding is dropped from the vectors, and the first call's seconds are reported."""
    seen: list[int] = []

    def fake_compile(fn):
        def run(pixels):
            seen.append(len(pixels))
            return fn(pixels)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    feed = DeviceFeed(encoder, compile=True)
    tiles = np.random.default_rng(1).integers(0, 255, (11, 64, 64, 3), dtype=np.uint8)
    out = feed.submit(tiles[:8], 0) + feed.submit(tiles[8:], 8) + feed.drain()
    assert seen == [8, 8]
    assert [tag for tag, _ in out] == [0, 8] and len(out[1][1]) == 3
    assert np.allclose(np.concatenate([v for _, v in out]), encoder.encode_tiles(tiles), atol=1e-5)
    assert feed.timings["compile_s"] > 0
