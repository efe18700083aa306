"""`conchdb search | describe | classify | heatmap | texts add` as a user runs them."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conchdb.cli import app
from conchdb.search import vocabulary
from conchdb.search.texts import text_id
from tests.search.conftest import SLIDE_H, SLIDE_W, SLIDES, TILE

runner = CliRunner()


@pytest.fixture
def env(tmp_path, monkeypatch, store_dir, checkpoint, tokenizer_path):
    """A working folder, a private CONCHDB_HOME, and the options every command needs."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONCHDB_HOME", str(tmp_path / "home"))
    for name in ("CONCHDB_CHECKPOINT", "CONCHDB_TOKENIZER", "CONCHDB_QDRANT_URL", "CONCHDB_STORE"):
        monkeypatch.delenv(name, raising=False)
    return ["--store", str(store_dir), "--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer_path),
            "--device", "cpu", "--precision", "fp32"]


def run(*args: str):
    return runner.invoke(app, list(args))


def ok(*args: str):
    result = run(*args)
    assert result.exit_code == 0, result.output
    return result


def fails(*args: str, words: str):
    """A usage error: exit 2, the message on stderr, no traceback."""
    result = run(*args)
    assert result.exit_code == 2, result.output
    assert re.search(words, result.stderr), result.stderr
    assert "Traceback" not in result.output
    return result


# -- search -----------------------------------------------------------------------------------


def test_search_json_has_the_documented_shape(env, corpus):
    doc = json.loads(ok("search", "adenocarcinoma with necrosis", "--top-k", "5", "--json", *env).stdout)
    assert [d["rank"] for d in doc] == [1, 2, 3, 4, 5]
    for d in doc:
        assert set(d) == {"rank", "score", "id", "slide_id", "x", "y", "size", "payload", "weak"}
        assert d["slide_id"] == d["payload"]["slide_id"] and d["x"] == d["payload"]["x"]
        assert d["size"] == TILE
    assert [d["score"] for d in doc] == sorted((d["score"] for d in doc), reverse=True)


def test_search_by_image_where_and_table(env, corpus, tmp_path):
    corpus.tile(30).save(tmp_path / "query.png")
    out = ok("search", "--image", str(tmp_path / "query.png"), "--where", "grade>=2", "--where", "site=rectum",
             "--top-k", "3", *env).stdout
    lines = [line for line in out.splitlines() if re.match(r"^\W*\d+\W", line)]
    assert len(lines) == 3
    assert "grade" in out and "site" in out and "rectum" in out
    doc = json.loads(ok("search", "--image", str(tmp_path / "query.png"), "--json", *env).stdout)
    assert doc[0]["id"] == corpus.points[30].id and doc[0]["score"] >= 0.999


def test_search_by_point_grouped_by_slide(env, corpus):
    doc = json.loads(ok("search", "--point", corpus.ids()[2], "--group-by", "slide", "--group-size", "2", "--json",
                        *env).stdout)
    assert len(doc) == len(SLIDES) and len({d["slide_id"] for d in doc}) == len(SLIDES)
    assert doc[0]["id"] == corpus.ids()[2]
    assert all(len(d["tiles"]) == 2 and {t["slide_id"] for t in d["tiles"]} == {d["slide_id"]} for d in doc)


def test_search_pages(env, corpus):
    first = json.loads(ok("search", "--point", corpus.ids()[0], "--top-k", "4", "--json", *env).stdout)
    second = json.loads(ok("search", "--point", corpus.ids()[0], "--top-k", "2", "--page", "2", "--json",
                           *env).stdout)
    assert [d["id"] for d in second] == [d["id"] for d in first[2:]]
    assert [d["rank"] for d in second] == [3, 4]


def test_export_writes_jpegs_of_the_tile_size_and_a_gallery(env, corpus, tmp_path):
    folder = tmp_path / "gallery"
    doc = json.loads(ok("search", "tumor", "--top-k", "4", "--json", "--export", str(folder), *env).stdout)
    jpegs = sorted(folder.glob("*.jpg"))
    assert len(jpegs) == 4
    html = (folder / "index.html").read_text()
    for path in jpegs:
        with Image.open(path) as image:
            assert image.format == "JPEG" and image.size == (TILE, TILE)
        assert f'src="{path.name}"' in html
    for d in doc:
        assert f"{d['score']:.4f}" in html and d["slide_id"] in html
    # each JPEG shows its own stored tile: of all tiles, it is closest to the hit's
    for d in doc:
        jpeg = np.asarray(Image.open(next(p for p in jpegs if p.name.startswith(f"{d['rank']:04d}_"))), dtype=float)
        diffs = [np.abs(jpeg - np.asarray(corpus.tile(i), dtype=float)).mean() for i in range(len(corpus.points))]
        assert corpus.ids()[int(np.argmin(diffs))] == d["id"]


def test_grouped_export_writes_every_tile_of_each_group(env, corpus, tmp_path):
    folder = tmp_path / "groups"
    ok("search", "--point", corpus.ids()[0], "--group-by", "slide", "--group-size", "2", "--export", str(folder), *env)
    assert len(list(folder.glob("*.jpg"))) == 2 * len(SLIDES)
    assert "#1.2" in (folder / "index.html").read_text()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["search", ""], "query is empty"),
        (["search", "   "], "query is empty"),
        (["search", "tumor", "--point", "x"], "exactly one"),
        (["search"], "exactly one"),
        (["search", "--point", "6f1c1d2e-0000-4000-8000-000000000000"], "no point with id"),
        (["search", "--image", "missing.png"], "image not found"),
        (["search", "tumor", "--where", "grade=high"], r"'grade=high'.*not an integer"),
        (["search", "tumor", "--where", "grade==2"], "unknown operator"),
        (["search", "tumor", "--where", "nosuchfield=1"], "no field 'nosuchfield'"),
        (["search", "tumor", "--top-k", "0"], "top-k 0"),
        (["search", "tumor", "--top-k", "1001"], "top-k 1001"),
        (["search", "tumor", "--collection", "other"], "does not exist"),
        (["classify", "--slide", "case_z/none.png", "--label", "a", "--label", "b"], "no tiles of slide"),
        (["heatmap", "case_z/none.png", "tumor", "--out", "h.png"], "no tiles of slide"),
        (["classify", "--label", "a", "--label", "b"], "IMAGE or --slide"),
        (["classify", "--slide", "case_a/s1.png", "--label", "a"], "at least two"),
        (["classify", "--slide", "case_a/s1.png", "--label", "a", "--label", "b", "--topk", "0,x"], "--topk"),
        (["describe", "missing.png"], "image not found"),
    ],
)
def test_bad_input_is_a_clear_error_with_exit_2(env, args, words):
    fails(*args, *env, words=words)


def test_an_image_that_is_not_an_image(env, tmp_path):
    (tmp_path / "fake.png").write_bytes(b"this is text, not a PNG")
    fails("search", "--image", str(tmp_path / "fake.png"), *env, words="cannot read .* as an image")
    fails("describe", str(tmp_path / "fake.png"), *env, words="cannot read .* as an image")
    fails("classify", str(tmp_path / "fake.png"), "--label", "a", "--label", "b", *env,
          words="cannot read .* as an image")


def test_the_filter_error_shows_the_grammar(env):
    result = fails("search", "tumor", "--where", "grade", *env, words="not of the form")
    assert "field>=x" in result.stderr


# -- describe, classify, heatmap, texts -------------------------------------------------------


def test_describe_lists_vocabulary_terms_then_added_texts(env, corpus, encoder, tmp_path):
    corpus.tile(8).save(tmp_path / "t.png")
    doc = json.loads(ok("describe", str(tmp_path / "t.png"), "--top-k", "5", "--json", *env).stdout)
    terms = {t for t, _ in vocabulary.all_terms()}
    assert len(doc) == 5 and all(d["text"] in terms and d["source"] == "vocabulary" for d in doc)
    assert list((tmp_path / "home" / "cache").glob("vocabulary-*.npy"))

    (tmp_path / "captions.txt").write_text("glands of adenocarcinoma\n\nlymph node\nfibrous stroma\n")
    added = json.loads(ok("texts", "add", str(tmp_path / "captions.txt"), "--json", *env).stdout)
    assert added["added"] == 3 and added["total"] == 3 and added["collection"] == "conch_tiles_texts"
    again = json.loads(ok("texts", "add", str(tmp_path / "captions.txt"), "--json", *env).stdout)
    assert again["total"] == 3, "deterministic ids: adding the same texts twice stores them once"
    doc = json.loads(ok("describe", str(tmp_path / "t.png"), "--json", *env).stdout)
    texts = ["glands of adenocarcinoma", "lymph node", "fibrous stroma"]
    scores = encoder.encode_texts(texts) @ encoder.encode_images([tmp_path / "t.png"])[0]
    assert [d["text"] for d in doc] == [texts[i] for i in np.argsort(-scores)]
    assert [d["id"] for d in doc] == [text_id(d["text"]) for d in doc]
    assert "glands of adenocarcinoma" in ok("describe", str(tmp_path / "t.png"), *env).stdout


def test_texts_add_csv_and_bad_files(env, tmp_path):
    (tmp_path / "t.csv").write_text("text,organ\ncolon tumour,colon\nlung tumour,lung\n")
    assert "added 2 texts" in ok("texts", "add", str(tmp_path / "t.csv"), *env).stdout
    (tmp_path / "bad.csv").write_text("caption,organ\nx,y\n")
    fails("texts", "add", str(tmp_path / "bad.csv"), *env, words="no `text` column")
    (tmp_path / "empty.txt").write_text("\n\n")
    fails("texts", "add", str(tmp_path / "empty.txt"), *env, words="holds no texts")


def test_classify_an_image_with_labels_and_with_a_prompt_file(env, corpus, encoder, tmp_path):
    corpus.tile(5).save(tmp_path / "t.png")
    doc = json.loads(ok("classify", str(tmp_path / "t.png"), "--label", "tumor", "--label", "stroma",
                        "--label", "fat", "--json", *env).stdout)
    logits = encoder.logit_scale * (encoder.encode_texts(["tumor", "stroma", "fat"])
                                    @ encoder.encode_images([tmp_path / "t.png"])[0])
    probs = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
    got = {c["label"]: c["probability"] for c in doc["classes"]}
    assert got == pytest.approx(dict(zip(["tumor", "stroma", "fat"], probs.tolist(), strict=True)), abs=1e-4)
    assert doc["prediction"] == ["tumor", "stroma", "fat"][int(np.argmax(probs))]

    (tmp_path / "p.json").write_text(json.dumps({"0": {"classnames": {"T": ["tumor"], "N": ["normal"]},
                                                       "templates": ["CLASSNAME.", "an image of CLASSNAME."]}}))
    out = ok("classify", str(tmp_path / "t.png"), "--prompts", str(tmp_path / "p.json"), *env).stdout
    assert "probability" in out and " T " in out and " N " in out


def test_classify_a_slide_with_mi_zero(env, corpus, encoder):
    doc = json.loads(ok("classify", "--slide", "case_b/s3.png", "--label", "tumor", "--label", "normal",
                        "--topk", "1,10,100", "--json", *env).stdout)
    assert doc["slide_id"] == "case_b/s3.png" and doc["tiles"] == 24
    assert [r["k"] for r in doc["results"]] == [1, 10, 100]
    assert [r["k_used"] for r in doc["results"]] == [1, 10, 24]
    tiles = np.stack([p.vector for p in corpus.points if p.payload["slide_id"] == "case_b/s3.png"])
    logits = encoder.logit_scale * tiles @ encoder.encode_texts(["tumor", "normal"]).T
    for r in doc["results"]:
        pooled = np.sort(logits, axis=0)[::-1][: r["k_used"]].mean(axis=0)
        got = {c["label"]: c["logit"] for c in r["classes"]}
        assert [got["tumor"], got["normal"]] == pytest.approx(pooled.tolist(), rel=1e-4)
    table = ok("classify", "--slide", "case_b/s3.png", "--label", "tumor", "--label", "normal", *env).stdout
    assert "top-100 (24)" in table and "prediction" in table


def test_heatmap_writes_a_png_over_the_thumbnail(env, corpus, tmp_path):
    out = tmp_path / "heat.png"
    printed = ok("heatmap", "case_a/s1.png", "glandular tumour", "--out", str(out), "--size", "192", *env).stdout
    assert "24 tiles" in printed
    with Image.open(out) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert width > 192 and height > SLIDE_H * 192 // SLIDE_W
    corpus.tile(0).save(tmp_path / "q.png")
    ok("heatmap", "case_a/s1.png", "--image", str(tmp_path / "q.png"), "--out", str(tmp_path / "h2.png"), *env)
    assert Path(tmp_path / "h2.png").is_file()


def test_a_decompression_bomb_is_a_clear_error(env, tmp_path, monkeypatch):
    Image.new("RGB", (100, 100)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 px is then over twice PIL's limit
    for args in (["search", "--image", "bomb.png"], ["describe", "bomb.png"],
                 ["classify", "bomb.png", "--label", "a", "--label", "b"]):
        fails(*args, *env, words=r"bomb.png is too large")


def test_errors_name_the_option_they_are_about(env, corpus):
    assert "fix: --top-k: give a top-k between 1 and 1000" in fails("search", "tumor", "--top-k", "0", *env,
                                                                     words="top-k 0").stderr
    assert "fix: --where:" in fails("search", "tumor", "--where", "grade", *env, words="not of the form").stderr
    assert "fix: --collection:" in fails("search", "tumor", "--collection", "other", *env,
                                         words="does not exist").stderr
    # the library says `labels`; classify's option is `--label`, found on the running command
    corpus.tile(0).save("q.png")
    assert "fix: --label: give each class once" in fails("classify", "q.png", "--label", "a", "--label", "a", *env,
                                                          words="given twice").stderr


def test_slide_mpp_is_for_region_queries(env, corpus, tmp_path):
    Image.new("RGB", (256, 256), (200, 120, 170)).save(tmp_path / "plain.png")
    doc = json.loads(ok("search", "--image", f"{tmp_path / 'plain.png'}+0,0,128,128", "--slide-mpp", "0.25",
                        "--top-k", "2", "--json", *env).stdout)
    assert len(doc) == 2
    result = fails("search", "--image", f"{tmp_path / 'plain.png'}+0,0,128,128", "--slide-mpp", "40", *env,
                   words="not a pixel size")
    assert "--slide-mpp" in result.stderr
    fails("search", "tumor", "--slide-mpp", "0.25", *env, words="region query")
