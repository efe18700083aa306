"""A store copied with `conchdb copy` answers a text search as the original does."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from conchdb.cli import app

runner = CliRunner()


def test_a_copied_store_answers_a_text_search_as_the_original(tmp_path, monkeypatch, store_dir, checkpoint,
                                                               tokenizer_path):
    monkeypatch.setenv("CONCHDB_HOME", str(tmp_path / "home"))
    for name in ("CONCHDB_CHECKPOINT", "CONCHDB_TOKENIZER", "CONCHDB_QDRANT_URL", "CONCHDB_STORE"):
        monkeypatch.delenv(name, raising=False)
    copied = runner.invoke(app, ["copy", "--store", str(store_dir), "--to", str(tmp_path / "copy"), "--json"])
    assert copied.exit_code == 0, copied.output
    model = ["--checkpoint", str(checkpoint), "--tokenizer", str(tokenizer_path), "--device", "cpu",
             "--precision", "fp32"]
    answers = []
    for store in (store_dir, tmp_path / "copy"):
        result = runner.invoke(app, ["search", "adenocarcinoma with necrosis", "--where", "grade>=2", "--top-k", "5",
                                     "--json", "--store", str(store), *model])
        assert result.exit_code == 0, result.output
        answers.append([(d["id"], round(d["score"], 4), d["payload"]) for d in json.loads(result.stdout)])
    assert len(answers[0]) == 5 and answers[0] == answers[1]
