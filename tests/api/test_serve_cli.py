"""`conchdb serve` end to end up to the socket: options and CONCHDB_* settings become the app that
uvicorn is handed (uvicorn itself is replaced here; the live server is in test_page)."""

from __future__ import annotations

import shutil

from fastapi.testclient import TestClient
from typer.testing import CliRunner

from conchdb.cli import app as cli_app
from tests.search.conftest import checkpoint  # noqa: F401 - fixture

runner = CliRunner()


def test_serve_opens_the_store_and_model_once_and_hands_uvicorn_a_keyed_app(
    ingested, tmp_path, monkeypatch, checkpoint, tokenizer_path  # noqa: F811
):
    import uvicorn

    store = tmp_path / "store"
    shutil.copytree(ingested.store, store)
    seen: dict = {}

    def fake_run(app, host, port, **kwargs):
        seen.update(host=host, port=port)
        with TestClient(app, base_url="http://127.0.0.1") as client:
            seen["health"] = client.get("/v1/health").json()
            seen["no_key"] = client.get("/v1/stats").status_code
            seen["hits"] = client.post("/v1/search/text", json={"query": "tumor", "top_k": 3},
                                       headers={"Authorization": "Bearer s3cret"}).json()["hits"]

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.setenv("CONCHDB_API_KEY", "s3cret")
    monkeypatch.setenv("CONCHDB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CONCHDB_QDRANT_URL", raising=False)
    result = runner.invoke(cli_app, [
        "serve", "--host", "0.0.0.0", "--port", "8123", "--store", str(store), "--checkpoint", str(checkpoint),
        "--tokenizer", str(tokenizer_path), "--device", "cpu", "--precision", "fp32",
    ])
    assert result.exit_code == 0, result.output
    assert "API key required" in result.output
    assert seen["host"] == "0.0.0.0" and seen["port"] == 8123  # a key from CONCHDB_API_KEY allows it
    assert seen["health"]["status"] == "ok" and seen["health"]["points"] == 72
    assert seen["no_key"] == 401 and len(seen["hits"]) == 3
    from conchdb.store.edge import EdgeStore

    with EdgeStore(store):  # the server released the store's lock when it stopped
        pass


def test_serve_refuses_an_empty_key_and_a_bad_upload_limit(monkeypatch):
    monkeypatch.delenv("CONCHDB_API_KEY", raising=False)
    empty = runner.invoke(cli_app, ["serve", "--api-key", "  "])
    assert empty.exit_code == 2 and "empty" in empty.output
    limit = runner.invoke(cli_app, ["serve", "--max-upload-mb", "0"])
    assert limit.exit_code == 2 and "--max-upload-mb" in limit.output
