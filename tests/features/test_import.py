"""`conchdb import-features` and `conchdb export`: goldens, refusals, reruns, round trips, pixels."""

from __future__ import annotations

import json
import re
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conchdb.catalog import TILES_COLLECTION as TILES
from conchdb.catalog import slides_collection
from conchdb.cli import app
from conchdb.features.importer import ImportOptions, import_features
from conchdb.search import Searcher
from conchdb.store import Condition, Filter
from conchdb.store.edge import EdgeStore
from tests.features.conftest import grid_coords, write_clam_files, write_trident_file
from tests.search.conftest import SLIDE_H, SLIDE_W, TILE, make_slide_image

runner = CliRunner()
RNG = np.random.default_rng(3)


def raw(n: int, dim: int = 512) -> np.ndarray:
    return RNG.standard_normal((n, dim)).astype(np.float32)


def by_coords(store, collection: str, flt: Filter | None = None) -> dict[tuple[int, int], np.ndarray]:
    return {(h.payload["x"], h.payload["y"]): h.vector for h in store.scroll(collection, flt, with_vectors=True)}


# -- goldens: the projection is CONCH's ---------------------------------------------------------


@pytest.mark.slow
def test_golden_features_import_as_conchs_embeddings_and_are_found_by_their_image(
    tmp_path, golden, golden_encoder, conch_assets
):
    unproj, proj, names = golden["image_unproj"], golden["image_proj"], [str(n) for n in golden["image_names"]]
    coords = grid_coords(len(unproj), 512)
    write_trident_file(tmp_path / "trident", "golden", unproj, coords, patch_size=512, target_mag=20, level0_mag=40)
    feats = write_clam_files(tmp_path / "clam", "golden", unproj, coords, patch_size=512)
    with EdgeStore(tmp_path / "store") as store:
        for fmt, root in (("trident", tmp_path / "trident"), ("clam", feats)):
            summary = import_features(root, golden_encoder, store, fmt, ImportOptions(fmt))
            assert summary.exit_code == 0 and summary.tiles_written == len(unproj), summary.to_dict()
            assert summary.without_slide == ["golden"]
            stored = by_coords(store, fmt)
            for row, (x, y) in enumerate(coords):
                np.testing.assert_allclose(stored[(x, y)], proj[row], atol=1e-5)
        tile = next(store.scroll("trident")).payload
        assert (tile["source"], tile["size"], tile["tile_px"], tile["magnification"]) == ("trident", 1024, 512, 20)
        assert all(tile.get(key) is None for key in ("mpp", "target_mpp", "path")), "unknown without the slide"
        (record,) = [h.payload for h in store.scroll(slides_collection("trident"))]
        assert (record["status"], record["tiles"], record["slide_missing"]) == ("done", len(unproj), True)
        assert (record["patch_size_level0"], record["level0_magnification"]) == (1024, 40)
        searcher = Searcher(golden_encoder, store, "trident")
        for row in (0, 3):
            vector = searcher.image_vector(conch_assets / "golden" / "images" / names[row])
            best = store.query("trident", vector, k=1)[0]
            assert (best.payload["x"], best.payload["y"]) == tuple(coords[row])
            assert best.score > 0.9999


# -- the command line ---------------------------------------------------------------------------


@pytest.fixture
def env(tmp_path, monkeypatch, checkpoint, tokenizer_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONCHDB_HOME", str(tmp_path / "home"))
    for name in ("CONCHDB_CHECKPOINT", "CONCHDB_TOKENIZER", "CONCHDB_QDRANT_URL", "CONCHDB_STORE"):
        monkeypatch.delenv(name, raising=False)
    return {
        "store": ["--store", str(tmp_path / "store")],
        "model": ["--checkpoint", str(checkpoint), "--device", "cpu", "--precision", "fp32"],
        "tokenizer": ["--tokenizer", str(tokenizer_path)],
    }


def run(*args: str):
    return runner.invoke(app, list(args))


def import_json(folder: Path, env, *more: str, code: int = 0) -> dict:
    result = run("import-features", str(folder), "--format", "trident", "--json", *env["store"], *env["model"], *more)
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    return json.loads(result.stdout)


def test_bad_files_are_refused_by_name_and_the_rest_imported_with_exit_3(tmp_path, env):
    root = tmp_path / "job"
    write_trident_file(root, "good", raw(4), grid_coords(4))
    write_trident_file(root, "uni", raw(4, 1024), grid_coords(4))
    write_trident_file(root, "v15", raw(4, 768), grid_coords(4))
    unit = raw(4)
    write_trident_file(root, "unit", unit / np.linalg.norm(unit, axis=1, keepdims=True), grid_coords(4))
    with h5py.File(root / "features_conch_v1" / "nofeatures.h5", "w") as fh:
        fh.create_dataset("coords", data=grid_coords(2))
    cut = write_trident_file(root, "cut", raw(40), grid_coords(40))
    cut.write_bytes(cut.read_bytes()[:2000])
    doc = import_json(root, env, code=3)
    assert (doc["feature_files"], doc["ingested"], doc["tiles_written"]) == (6, 1, 4)
    errors = {Path(f["slide"]).stem: f["error"] for f in doc["failed"]}
    expected = {"uni": "1024-d", "v15": "768-d", "unit": "already projected and normalized",
                "nofeatures": "no 'features' dataset", "cut": "cannot read the HDF5 file"}
    assert set(errors) == set(expected)
    for name, words in expected.items():
        assert words in errors[name] and f"{name}.h5" in errors[name], errors[name]
    table = run("import-features", str(root), "--format", "trident", *env["store"], *env["model"])
    assert table.exit_code == 3 and "refused" in table.stdout and "Traceback" not in table.output


def test_an_empty_folder_and_an_unknown_format_fail_before_the_model_loads(tmp_path, env):
    (tmp_path / "empty").mkdir()
    result = run("import-features", str(tmp_path / "empty"), "--format", "trident", *env["store"],
                 "--checkpoint", str(tmp_path / "missing.bin"))
    assert result.exit_code == 2 and "no trident feature files" in result.stderr
    result = run("import-features", str(tmp_path / "empty"), "--format", "uni", *env["store"])
    assert result.exit_code == 2 and "use --format trident or --format clam" in result.stderr


def test_importing_the_same_folder_twice_writes_nothing_new(tmp_path, env):
    root = tmp_path / "job"
    write_trident_file(root, "a", raw(5), grid_coords(5))
    write_trident_file(root, "b", raw(3), grid_coords(3))
    first = import_json(root, env)
    assert (first["ingested"], first["tiles_written"]) == (2, 8)
    with EdgeStore(tmp_path / "store") as store:
        before = {h.id: (h.payload["ingest_run"], h.vector.tolist()) for h in store.scroll(TILES, with_vectors=True)}
        floor = store.collection_metadata(TILES)["noise_floor"]  # an import ends as an ingest does
        assert floor["slides"] == 2 and floor["tiles"] == 8
    second = import_json(root, env)
    assert (second["ingested"], second["skipped"], second["tiles_written"]) == (0, 2, 0)
    with EdgeStore(tmp_path / "store") as store:
        after = {h.id: (h.payload["ingest_run"], h.vector.tolist()) for h in store.scroll(TILES, with_vectors=True)}
        assert store.count(slides_collection("conch_tiles")) == 2
    assert after == before


def test_a_changed_manifest_relabels_imported_slides_without_projecting_again(tmp_path, env):
    root = tmp_path / "job"
    write_trident_file(root, "a", raw(5), grid_coords(5))
    write_trident_file(root, "b", raw(3), grid_coords(3))
    (root / "manifest.csv").write_text("slide,diagnosis\na,benign\nb,normal\n")
    import_json(root, env)
    with EdgeStore(tmp_path / "store") as store:
        before = {h.id: h.vector.tolist() for h in store.scroll(TILES, with_vectors=True)}
    (root / "manifest.csv").write_text("slide,diagnosis,stage\na,malignant,2\nb,normal,1\n")
    again = import_json(root, env)
    assert (again["skipped"], again["tiles_written"], again["relabelled"]) == (2, 0, ["a", "b"])
    with EdgeStore(tmp_path / "store") as store:
        assert {h.id: h.vector.tolist() for h in store.scroll(TILES, with_vectors=True)} == before
        malignant = Filter((Condition("diagnosis", "eq", "malignant"),))
        assert {h.payload["slide_id"] for h in store.scroll(TILES, malignant)} == {"a"}
        assert store.count(TILES, malignant) == 5
        assert store.count(TILES, Filter((Condition("stage", "eq", 1),))) == 3


def test_export_raw_then_import_elsewhere_gives_the_same_vectors_and_coordinates(tmp_path, env):
    root = tmp_path / "job"
    write_trident_file(root, "a", raw(6), grid_coords(6, 1024), patch_size=512, target_mag=20, level0_mag=40)
    clam = write_clam_files(tmp_path / "clam", "b", raw(4), grid_coords(4, 256), patch_size=256)
    import_json(root, env)
    clam_doc = run("import-features", str(clam), "--format", "clam", "--json", *env["store"], *env["model"])
    assert clam_doc.exit_code == 0, clam_doc.output
    out = tmp_path / "export"
    result = run("export", "--all", "--out", str(out), "--raw", "--json", *env["store"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.h5")) == ["a.h5", "b.h5"]
    with h5py.File(out / "a.h5") as fh:
        attrs = dict(fh["coords"].attrs)
        assert (attrs["patch_size"], attrs["patch_size_level0"], attrs["target_magnification"]) == (512, 1024, 20)
        assert attrs["level0_magnification"] == 40 and attrs["name"] == "a" and fh["features"].shape == (6, 512)
    again = import_json(out, env, "--collection", "again")
    assert again["ingested"] == 2
    with EdgeStore(tmp_path / "store") as store:
        for slide in ("a", "b"):
            flt = Filter((Condition("slide_id", "eq", slide),))
            first, second = by_coords(store, "conch_tiles", flt), by_coords(store, "again", flt)
            assert first.keys() == second.keys() and len(first) in (4, 6)
            for key, vector in first.items():
                np.testing.assert_allclose(second[key], vector, atol=1e-6)
        stored = by_coords(store, "conch_tiles", Filter((Condition("slide_id", "eq", "a"),)))
    projected = tmp_path / "projected"
    result = run("export", "a", "--out", str(projected), "--where", "x<2048", *env["store"])
    assert result.exit_code == 0, result.output
    with h5py.File(projected / "a.h5") as fh:
        coords, features = fh["coords"][()], fh["features"][()]
    assert len(coords) == 4 and all(x < 2048 for x, _ in coords)
    for (x, y), vector in zip(coords, features, strict=True):
        np.testing.assert_allclose(vector, stored[(int(x), int(y))], atol=1e-7)


def test_export_names_its_problems(tmp_path, env):
    root = tmp_path / "job"
    write_trident_file(root, "a", raw(2), grid_coords(2))
    import_json(root, env, "--no-keep-raw")
    result = run("export", "nope", "--out", str(tmp_path / "o"), *env["store"])
    assert result.exit_code == 2 and "no done slide 'nope'" in result.stderr
    result = run("export", "--out", str(tmp_path / "o"), *env["store"])
    assert result.exit_code == 2 and "slide ids or --all" in result.stderr
    result = run("export", "a", "--raw", "--out", str(tmp_path / "o"), *env["store"])
    assert result.exit_code == 3 and "no pre-projection features are kept" in result.stderr


def _slide_folder(tmp_path: Path) -> tuple[Path, Path]:
    slides = tmp_path / "slides"
    (slides / "case").mkdir(parents=True)
    path = slides / "case" / "s1.png"
    make_slide_image(0).save(path)
    (slides / "manifest.csv").write_text("slide,mpp,site\ncase/s1.png,0.5,colon\n")
    return slides, path


def test_with_slides_tile_images_and_heatmaps_cut_the_right_pixels(tmp_path, env, encoder):
    slides, path = _slide_folder(tmp_path)
    pixels = np.asarray(Image.open(path).convert("RGB"))
    coords = np.array([(x, y) for y in range(0, SLIDE_H, TILE) for x in range(0, SLIDE_W, TILE)], dtype=np.int64)
    tiles = np.stack([pixels[y : y + TILE, x : x + TILE] for x, y in coords])
    root = tmp_path / "job"
    write_trident_file(root, "s1", encoder.encode_tiles(tiles, raw=True), coords, patch_size=TILE, target_mag=20,
                       level0_mag=20, width=SLIDE_W, height=SLIDE_H)
    alone = import_json(root, env)
    assert alone["slides_without_slide_file"] == ["s1"]
    joined = import_json(root, env, "--slides", str(slides))
    assert joined["ingested"] == 1 and joined["slides_without_slide_file"] == []
    assert joined["slides_without_manifest_row"] == []
    kept = list((tmp_path / "store" / "features" / "conch_tiles").glob("*.h5"))
    assert len(kept) == 1, "the unjoined import's kept features went with its record"
    with EdgeStore(tmp_path / "store") as store:
        assert store.count("conch_tiles", Filter((Condition("slide_id", "eq", "s1"),))) == 0, "replaced"
        hits = list(store.scroll("conch_tiles", None, with_vectors=True))
        assert {h.payload["slide_id"] for h in hits} == {"case/s1.png"} and len(hits) == len(coords)
        first = hits[0].payload
        assert (first["mpp"], first["target_mpp"], first["size"], first["site"]) == (0.5, 0.5, TILE, "colon")
        assert first["tiling"] == "trident-0.5um-64px-s64" and first["path"] == str(path)
    ids = {h.id: h.vector for h in hits}
    gallery = tmp_path / "gallery"
    result = run("search", "tumor", "--top-k", "5", "--json", "--export", str(gallery), *env["store"],
                 *env["model"], *env["tokenizer"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    matrix = np.stack(list(ids.values()))
    for d in doc:
        jpeg = next(gallery.glob(f"{d['rank']:04d}_*.jpg"))
        vector = encoder.encode_images([jpeg])[0]
        assert list(ids)[int(np.argmax(matrix @ vector))] == d["id"], f"hit {d['rank']} shows another tile"
    result = run("heatmap", "case/s1.png", "tumor", "--out", str(tmp_path / "h.png"), *env["store"],
                 *env["model"], *env["tokenizer"])
    assert result.exit_code == 0, result.output
    best = next(h for h in hits if h.id == doc[0]["id"]).payload
    assert re.search(rf"best at \({best['x']}, {best['y']}\)", result.stdout), result.stdout
    with Image.open(tmp_path / "h.png") as picture:
        assert picture.width > SLIDE_W // 2


def test_a_file_whose_coordinates_lie_outside_its_slide_is_refused(tmp_path, env):
    slides, path = _slide_folder(tmp_path)
    root = tmp_path / "job"
    write_trident_file(root, "s1", raw(2), np.array([[0, 0], [SLIDE_W + 64, 0]]), patch_size=TILE, target_mag=20,
                       level0_mag=20)
    doc = import_json(root, env, "--slides", str(slides), code=3)
    (failure,) = doc["failed"]
    assert "outside" in failure["error"] and str(path) in failure["error"] and "s1.h5" in failure["error"]


@pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")
def test_import_into_a_server_store_projects_with_the_encoder(tmp_path, encoder):
    from qdrant_client import QdrantClient

    from conchdb.store.server import ServerStore

    features = raw(5)
    write_trident_file(tmp_path / "job", "a", features, grid_coords(5))
    store = ServerStore(client=QdrantClient(":memory:"))
    summary = import_features(tmp_path / "job", encoder, store, "tiles", ImportOptions("trident"))
    assert summary.exit_code == 0 and summary.tiles_written == 5
    stored = by_coords(store, "tiles")
    expected = encoder.project(features)
    for row, (x, y) in enumerate(grid_coords(5)):
        np.testing.assert_allclose(stored[(x, y)], expected[row], atol=1e-6)
    record = next(store.scroll(slides_collection("tiles"))).payload
    assert record["status"] == "done" and record.get("raw_features") is None
    store.close()


def test_an_imported_slide_gets_its_mosaic_as_an_ingested_one_does(tmp_path, env):
    from conchdb.archive.marks import build_mosaics
    from conchdb.archive.mosaic import mosaic_size
    from conchdb.catalog import MOSAIC_FIELD

    root = tmp_path / "job"
    write_trident_file(root, "big", raw(200), grid_coords(200))
    assert import_json(root, env)["tiles_written"] == 200
    with EdgeStore(tmp_path / "store") as store:
        marked = list(store.scroll(TILES, Filter((Condition(MOSAIC_FIELD, "eq", True),))))
        assert len(marked) == mosaic_size(200) == 10
        assert all(h.payload["source"] == "trident" for h in marked)  # the mark kept the import's fields
        again = build_mosaics(store, TILES)
        assert (again.marked, again.unmarked) == (0, 0)
