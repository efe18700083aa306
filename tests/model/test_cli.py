"""`conchdb embed` and `conchdb model fetch` as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conchdb.cli import app
from conchdb.model.tokenizer import TOKENIZER_NAME

from .test_tokenizer import serve  # noqa: F401 - fixture

runner = CliRunner()


@pytest.fixture
def env(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CONCHDB_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("CONCHDB_CHECKPOINT", raising=False)
    monkeypatch.delenv("CONCHDB_TOKENIZER", raising=False)
    return tmp_path


def _png(path: Path) -> Path:
    rng = np.random.default_rng(0)
    from PIL import Image

    Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).save(path)
    return path


def test_embed_json_matches_encoder(env, synthetic_checkpoint, tokenizer_path, full_encoder):
    image = _png(env / "tile.png")
    result = runner.invoke(
        app,
        ["embed", "--image", str(image), "--text", "tumor", "--text", "stroma",
         "--checkpoint", str(synthetic_checkpoint), "--tokenizer", str(tokenizer_path), "--device", "cpu"],
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert [d["kind"] for d in doc] == ["image", "text", "text"]
    assert [d["input"] for d in doc] == [str(image), "tumor", "stroma"]
    np.testing.assert_allclose(doc[0]["embedding"], full_encoder.encode_images([image])[0], atol=1e-5)
    np.testing.assert_allclose(doc[2]["embedding"], full_encoder.encode_texts(["stroma"])[0], atol=1e-5)


def test_embed_raw_npy_from_env_settings(env, tiny_checkpoint, monkeypatch):
    monkeypatch.setenv("CONCHDB_CHECKPOINT", str(tiny_checkpoint))
    image = _png(env / "tile.png")
    out = env / "vectors.npy"
    result = runner.invoke(app, ["embed", "--image", str(image), "--raw", "--format", "npy", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert np.load(out).shape == (1, 512)


def test_missing_checkpoint_exits_2_with_instructions(env, tokenizer_path):
    result = runner.invoke(app, ["embed", "--text", "tumor", "--tokenizer", str(tokenizer_path)])
    assert result.exit_code == 2
    assert "no CONCH checkpoint found" in result.output
    assert "huggingface.co/MahmoodLab/conch" in result.output
    assert "Traceback" not in result.output


def test_bad_checkpoint_shape_exits_2(env, tokenizer_path):
    bad = env / "bad.bin"
    torch.save({"visual.proj_contrast": torch.zeros(3, 3)}, bad)
    result = runner.invoke(app, ["embed", "--text", "x", "--checkpoint", str(bad), "--tokenizer", str(tokenizer_path)])
    assert result.exit_code == 2
    assert "does not fit" in result.output and "visual.proj_contrast" in result.output


def test_truncated_checkpoint_exits_2(env, tiny_checkpoint, tokenizer_path):
    cut = env / "cut.bin"
    cut.write_bytes(tiny_checkpoint.read_bytes()[:1000])
    result = runner.invoke(app, ["embed", "--text", "x", "--checkpoint", str(cut), "--tokenizer", str(tokenizer_path)])
    assert result.exit_code == 2
    assert "cut.bin" in result.output


def test_missing_tokenizer_exits_2(env, tiny_checkpoint):
    result = runner.invoke(app, ["embed", "--text", "x", "--checkpoint", str(tiny_checkpoint)])
    assert result.exit_code == 2
    assert "tokenizer not found" in result.output and "conchdb model fetch" in result.output


def test_corrupt_image_exits_2_naming_it(env, tiny_checkpoint):
    bad = env / "corrupt.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not a jpeg")
    result = runner.invoke(app, ["embed", "--image", str(bad), "--checkpoint", str(tiny_checkpoint)])
    assert result.exit_code == 2
    assert "corrupt.jpg" in result.output
    assert "Traceback" not in result.output


def test_model_fetch_tokenizer_only(env, tokenizer_path, serve):  # noqa: F811
    url = serve(tokenizer_path.read_bytes())
    result = runner.invoke(app, ["model", "fetch", "--no-weights", "--tokenizer-url", url])
    assert result.exit_code == 0, result.output
    assert (env / "home" / "models" / "conch" / TOKENIZER_NAME).read_bytes() == tokenizer_path.read_bytes()


def test_model_fetch_wrong_checksum_exits_2(env, serve):  # noqa: F811
    url = serve(b"tampered")
    result = runner.invoke(app, ["model", "fetch", "--no-weights", "--tokenizer-url", url])
    assert result.exit_code == 2
    assert "sha256" in result.output
