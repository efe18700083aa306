"""Retrieval and zero-shot evaluation: hand-computed figures with ties, the synthetic
archive, slides with two labels or none, and the commands."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conchdb.archive.marks import build_mosaics
from conchdb.cli import app
from conchdb.errors import QueryError
from conchdb.search import metrics
from conchdb.search.evaluation import evaluate_retrieval, evaluate_zeroshot, retrieval_scores
from conchdb.store.edge import EdgeStore
from tests.search.archive import CLASSES, Archive, make_archive, write_archive
from tests.search.conftest import QUIET_LOCAL_MODE

pytestmark = QUIET_LOCAL_MODE
runner = CliRunner()


def test_retrieval_figures_equal_a_hand_computation_with_ties():
    truth = ["A", "A", "B", "C"]
    ranked = [
        ["A", "B", "B", "A", "C"],  # top-1 right; A and B tie 2-2, A ranks first: MV@5 A, right
        ["B", "A", "C", "C", "A"],  # top-1 wrong; A and C tie, A ranks first: MV@5 A, right
        ["A", "B", "C", "A", "C"],  # top-1 wrong; A and C tie, A first: MV@5 A, wrong
        ["C", "B", "A", "B", "A"],  # top-1 right; B and A tie, B first: MV@5 B, wrong
    ]
    top1, mv5, mmv5, f1, rows = retrieval_scores(truth, ranked)
    assert top1 == 0.5 and mv5 == 0.5
    assert mmv5 == pytest.approx((1 + 0 + 0) / 3)  # per-class MV@5 recall: A 2/2, B 0/1, C 0/1
    assert f1 == pytest.approx((0.8 + 0 + 0) / 3)  # A: precision 2/3, recall 1; B and C: 0
    by_label = {r.label: r for r in rows}
    assert set(by_label) == {"A", "B", "C"}
    assert (by_label["A"].slides, by_label["A"].top1, by_label["A"].mv5) == (2, 0.5, 1.0)
    assert by_label["A"].precision == pytest.approx(2 / 3) and by_label["A"].f1 == pytest.approx(0.8)
    assert (by_label["C"].top1, by_label["C"].mv5, by_label["B"].top1) == (1.0, 0.0, 0.0)


def test_majority_vote_breaks_ties_by_rank():
    assert metrics.majority_vote(["x", "y", "y", "x"]) == "x"
    assert metrics.majority_vote(["z", "y", "x", "y", "x"]) == "y"
    assert metrics.majority_vote(["q"]) == "q"
    with pytest.raises(ValueError):
        metrics.majority_vote([])


def test_zero_shot_figures_equal_a_hand_computation():
    classes = ["A", "B", "C"]
    matrix = metrics.confusion(["A", "A", "B", "B", "C"], ["A", "B", "B", "B", "A"], classes)
    assert matrix.tolist() == [[1, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert metrics.balanced_accuracy(matrix) == pytest.approx((0.5 + 1 + 0) / 3)
    # F1: A = 0.5 (precision 1/2, recall 1/2), B = 0.8 (2/3, 1), C = 0; supports 2, 2, 1
    assert metrics.weighted_f1(matrix, classes) == pytest.approx((0.5 * 2 + 0.8 * 2 + 0) / 5)
    assert metrics.macro_f1(matrix, classes) == pytest.approx((0.5 + 0.8 + 0) / 3)


@pytest.fixture(scope="module")
def archive() -> Archive:
    """Six slides a class: enough that every query has five of its class left to find."""
    return make_archive(per_class=6)


@pytest.fixture
def store(tmp_path, archive):
    """The archive, plus a copy of one slide under another cohort with another diagnosis and
    a slide stored without one."""
    opened = EdgeStore(tmp_path / "store")
    write_archive(opened, "tiles", archive, labels={archive.slides[-1]: None})
    conflict = Archive([archive.slides[0]], {archive.slides[0]: "normal"}, archive.patients,
                       {archive.slides[0]: archive.vectors[archive.slides[0]]}, archive.directions)
    write_archive(opened, "tiles", conflict, cohort="second")
    build_mosaics(opened, "tiles")
    yield opened
    opened.close()


def test_retrieval_over_the_archive_reports_conflicting_and_unlabelled_slides(store, archive):
    report = evaluate_retrieval(store, "tiles", label="diagnosis", group="patient_id")
    doc = report.to_dict()
    assert doc["conflicting_labels"] == {archive.slides[0]: ["adenoma", "normal"]}
    assert doc["unlabelled"] == [archive.slides[-1]]
    assert report.slides == len(archive.slides) - 2
    assert report.top1 == 1.0 and report.mv5 == 1.0 and report.mmv5 == 1.0 and report.macro_f1 == 1.0
    assert {r.label for r in report.classes} == set(CLASSES)
    for query in doc["queries"]:
        assert archive.slides[0] not in query["results"] and archive.slides[-1] not in query["results"]
        assert all(archive.patients[r] != archive.patients[query["slide_id"]] for r in query["results"])
        assert len(query["results"]) == 5


def test_zero_shot_over_the_archive_with_the_planted_directions_as_classes(store, archive):
    report = evaluate_zeroshot(store, "tiles", archive.directions, list(CLASSES), 10.0, label="diagnosis",
                               ks=(1, 5))
    assert report.samples == len(archive.slides) - 2
    assert [r.k for r in report.rows] == [1, 5]
    for row in report.rows:
        assert row.balanced_accuracy == 1.0 and row.weighted_f1 == 1.0
        assert np.array_equal(row.confusion, np.diag([5, 6, 5]))  # adenoma and normal each lose one slide
    doc = report.to_dict()
    assert doc["conflicting_labels"] == {archive.slides[0]: ["adenoma", "normal"]}
    assert doc["unlabelled"] == [archive.slides[-1]]
    # two of the three classes: the third class's slides are reported, not counted
    two = evaluate_zeroshot(store, "tiles", archive.directions[:2], list(CLASSES[:2]), 10.0, label="diagnosis")
    assert two.samples == 11 and len(two.to_dict()["labels_not_in_classes"]) == 5
    tiles = evaluate_zeroshot(store, "tiles", archive.directions, list(CLASSES), 10.0, label="diagnosis", tiles=True)
    assert tiles.level == "tile" and tiles.rows[0].k is None
    assert tiles.samples == 30 * (len(archive.slides) - 1) + 30  # the unlabelled slide's tiles are left out
    assert tiles.to_dict()["labels_not_in_classes"] == {"(none)": 30}
    with pytest.raises(QueryError, match="no stored slide has one value of 'site'"):
        evaluate_retrieval(store, "tiles", label="site")


def test_the_evaluate_commands(tmp_path, monkeypatch, store_dir, checkpoint, tokenizer_path):
    monkeypatch.setenv("CONCHDB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CONCHDB_QDRANT_URL", raising=False)
    base = ["--store", str(store_dir)]
    assert runner.invoke(app, ["mosaic", *base]).exit_code == 0
    result = runner.invoke(app, ["evaluate", "retrieval", "--label", "diagnosis", "--json", *base])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["slides"] == 3 and doc["top1"] == 0.0  # one slide per diagnosis: no right answer exists
    assert {c["label"] for c in doc["classes"]} == {"adenocarcinoma", "adenoma", "normal"}
    table = runner.invoke(app, ["evaluate", "retrieval", "--label", "diagnosis", *base])
    assert table.exit_code == 0 and "mMV@5" in table.stdout
    png = tmp_path / "confusion.png"
    model = ["--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer_path), "--device", "cpu"]
    result = runner.invoke(app, ["evaluate", "zeroshot", "--label", "diagnosis", "--topk", "1,5", "--png", str(png),
                                 "--json", *model, *base])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["samples"] == 3 and [r["k"] for r in doc["results"]] == [1, 5]
    assert np.asarray(doc["results"][0]["confusion"]["matrix"]).sum() == 3
    with Image.open(png) as image:
        assert image.size[0] > 200
    table = runner.invoke(app, ["evaluate", "zeroshot", "--label", "diagnosis", "--tiles", *model, *base])
    assert table.exit_code == 0, table.output
    assert "balanced accuracy" in table.stdout and "confusion" in table.stdout
    bad = runner.invoke(app, ["evaluate", "retrieval", "--label", "nope", *base])
    assert bad.exit_code == 2 and "Traceback" not in bad.output and "nope" in bad.output
