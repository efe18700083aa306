"""`conchdb search` steered (--like/--unlike, --more/--less, --region), weak hits in the table,
and QuPath GeoJSON out (--export-geojson, heatmap --geojson), as a user runs them."""

from __future__ import annotations

import json

import geojson
import numpy as np
import pytest

from conchdb.store.edge import EdgeStore
from tests.search.conftest import TILE
from tests.search.test_cli import env, fails, ok  # noqa: F401 - fixture

pytestmark = pytest.mark.filterwarnings("ignore:Payload indexes have no effect:UserWarning")


def search_json(*args: str) -> list[dict]:
    return json.loads(ok("search", *args, "--json").stdout)


def test_like_and_unlike_refine_and_leave_the_marked_hits_out(env, corpus):  # noqa: F811
    first = search_json("glandular epithelium", "--top-k", "10", *env)
    like, unlike = first[4]["id"], first[0]["id"]
    refined = search_json("glandular epithelium", "--top-k", "10", "--like", like, "--unlike", unlike, *env)
    assert not {like, unlike} & {d["id"] for d in refined}
    assert [d["id"] for d in refined] != [d["id"] for d in first if d["id"] not in (like, unlike)][:10]
    fails("search", "x", "--like", "00000000-0000-0000-0000-000000000000", *env, words="no tile with id")
    fails("search", "x", "--like", like, "--unlike", like, *env, words="both relevant and not")


def test_more_moves_the_ranking_and_a_bad_weight_is_refused(env, corpus):  # noqa: F811
    plain = search_json("glandular epithelium", "--top-k", "72", *env)
    more = search_json("glandular epithelium", "--top-k", "72", "--more", "necrosis:2", *env)
    assert [d["id"] for d in plain] != [d["id"] for d in more]
    assert {d["id"] for d in plain} == {d["id"] for d in more}
    fails("search", "x", "--more", "necrosis:9", *env, words="weight")
    fails("search", "--slide", "case_a/s1.png", "--more", "necrosis", *env, words="tile searches")


def test_region_of_a_stored_slide_finds_its_tile(env, corpus):  # noqa: F811
    p = corpus.points[20].payload
    hits = search_json("--region", f"{p['slide_id']}:{p['x']},{p['y']},{TILE},{TILE}", "--top-k", "2", *env)
    assert hits[0]["id"] == corpus.points[20].id and hits[0]["score"] > 0.999
    fails("search", "--region", "case_a/s1.png:1,2", *env, words="SLIDE_ID:x,y,w,h")
    fails("search", "--region", "case_a/nope.png:0,0,64,64", *env, words="no tiles of slide")
    fails("search", "--region", f"{p['slide_id']}:380,0,64,64", *env, words="outside")


def test_weak_hits_are_marked_in_json_and_dimmed_in_the_table(env, store_dir, corpus):  # noqa: F811
    with EdgeStore(store_dir) as store:  # a floor between the tiles' own score (1) and the rest
        store.update_metadata("conch_tiles", noise_floor={"value": 0.99999, "quantile": 0.99})
    point = corpus.points[5].id
    hits = search_json("--point", point, "--top-k", "5", *env)
    assert hits[0]["weak"] is False and all(h["weak"] == (h["score"] < 0.99999) for h in hits)
    assert any(h["weak"] for h in hits)
    table = ok("search", "--point", point, "--top-k", "5", *env).stdout
    assert "weak" in table and "noise floor" in table


def test_export_geojson_writes_one_qupath_file_per_slide(env, corpus, tmp_path):  # noqa: F811
    out = tmp_path / "qupath"
    hits = search_json("glandular epithelium", "--top-k", "12", "--export-geojson", str(out), *env)
    slides = {h["slide_id"] for h in hits}
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.geojson"))
    assert files == sorted(f"{s}.geojson" for s in slides)
    by_id = {h["id"]: h for h in hits}
    for slide in slides:
        doc = geojson.loads((out / f"{slide}.geojson").read_text())
        assert doc.is_valid and doc["type"] == "FeatureCollection"
        for f in doc["features"]:
            hit = by_id[f["id"]]
            x, y, size = hit["x"], hit["y"], hit["size"]
            assert f["geometry"]["coordinates"] == [[[x, y], [x + size, y], [x + size, y + size], [x, y + size],
                                                     [x, y]]]
            assert f["properties"]["measurements"]["score"] == pytest.approx(hit["score"])
            assert f["properties"]["measurements"]["rank"] == hit["rank"]
    assert sum(len(geojson.loads(p.read_text())["features"]) for p in out.rglob("*.geojson")) == 12


def test_heatmap_geojson_has_every_tile_with_its_similarity(env, corpus, encoder, tmp_path):  # noqa: F811
    out = tmp_path / "heat.geojson"
    ok("heatmap", "case_b/s3.png", "tumor", "--out", str(tmp_path / "h.png"), "--geojson", str(out), *env)
    doc = geojson.loads(out.read_text())
    assert doc.is_valid
    tiles = {p.id: p for p in corpus.points if p.payload["slide_id"] == "case_b/s3.png"}
    assert {f["id"] for f in doc["features"]} == set(tiles) and len(tiles) == 24
    text = encoder.encode_texts(["tumor"])[0]
    for f in doc["features"]:
        assert f["properties"]["objectType"] == "detection"
        want = float(np.dot(tiles[f["id"]].vector, text))
        assert f["properties"]["measurements"]["similarity"] == pytest.approx(want, abs=1e-4)


def test_annotated_tiles_are_searchable_and_scored_zero_shot(env, corpus, tmp_path):  # noqa: F811
    """QuPath regions on a stored slide (a store without slide records: its size is read from the
    file) label its tiles; `--where annotation=...` and `evaluate zeroshot --tiles` then use them."""
    def region(name, x0, y0, x1, y1):
        ring = [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]
        return {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring]},
                "properties": {"objectType": "annotation", "classification": {"name": name, "color": [9, 9, 9]}}}

    folder = tmp_path / "qupath" / "case_a"
    folder.mkdir(parents=True)
    features = [region("Tumor", 0, 0, 128, 128), region("Stroma", 256, 128, 384, 256)]
    doc = {"type": "FeatureCollection", "features": features}
    (folder / "s1.png.geojson").write_text(json.dumps(doc))
    store = env[env.index("--store") + 1]
    added = json.loads(ok("annotations", "add", str(tmp_path / "qupath"), "--store", store, "--json").stdout)
    assert added["files"][0]["labelled"] == {"Stroma": 4, "Tumor": 4}
    hits = search_json("glandular epithelium", "--where", "annotation=Tumor", "--top-k", "10", *env)
    assert len(hits) == 4 and {h["payload"]["annotation"] for h in hits} == {"Tumor"}
    assert {(h["x"], h["y"]) for h in hits} == {(0, 0), (64, 0), (0, 64), (64, 64)}
    result = ok("evaluate", "zeroshot", "--tiles", "--label", "annotation", "--json", *env)
    report = json.loads(result.stdout)
    assert report["samples"] == 8
