"""Loading weights: formats, wrappers, and every bad checkpoint a user can bring."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from conchdb.errors import CheckpointError
from conchdb.model.checkpoint import (
    CONVENTIONAL_PATH,
    fit_state_dict,
    read_checkpoint,
    resolve_checkpoint,
    save_checkpoint,
)
from conchdb.model.conch import ConchModel
from conchdb.model.config import ConchConfig, VisionConfig
from conchdb.model.encoder import Encoder

from .conftest import make_tiny_model


def test_bare_wrapped_prefixed_and_safetensors_load_alike(tmp_path):
    model = make_tiny_model()
    state = model.state_dict()
    torch.save(state, tmp_path / "bare.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "wrapped.bin")
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    for name in ("bare.pt", "wrapped.bin", "w.safetensors"):
        loaded, _ = read_checkpoint(tmp_path / name)
        fitted = fit_state_dict(loaded, ConchModel(ConchConfig.tiny()), name)
        assert set(fitted) == set(state)
        assert all(torch.equal(fitted[k], state[k]) for k in state)


def test_caption_pooler_keys_are_tolerated_and_dropped():
    model = ConchModel(ConchConfig.tiny())
    state = dict(model.state_dict())
    state["visual.attn_pool_caption.query"] = torch.zeros(256, 32)
    state["visual.ln_caption.weight"] = torch.ones(32)
    state["text_decoder.ln_final.weight"] = torch.ones(32)
    assert set(fit_state_dict(state, model, "x")) == set(model.state_dict())


def test_caption_pooler_loads_when_built():
    src = ConchModel(ConchConfig.tiny(), caption_pooler=True)
    dst = ConchModel(ConchConfig.tiny(), caption_pooler=True)
    dst.load_state_dict(fit_state_dict(dict(src.state_dict()), dst, "x"))


def test_missing_unexpected_and_mismatched_keys_are_listed():
    model = ConchModel(ConchConfig.tiny())
    state = dict(model.state_dict())
    del state["text.cls_emb"]
    state["visual.some_new_head.weight"] = torch.zeros(3)
    state["text.text_projection"] = torch.zeros(7, 512)
    with pytest.raises(CheckpointError) as info:
        fit_state_dict(state, model, "ckpt.bin")
    message = str(info.value)
    assert "ckpt.bin" in message
    assert "missing keys: text.cls_emb" in message
    assert "unexpected keys: visual.some_new_head.weight" in message
    assert "text.text_projection (7, 512) != (32, 512)" in message


def test_position_embeddings_resized_for_another_image_size():
    small = ConchModel(ConchConfig(vision=VisionConfig(image_size=224, width=32, layers=1, heads=2),
                                   text=ConchConfig.tiny().text))
    big = ConchModel(ConchConfig.tiny())
    fitted = fit_state_dict(dict(small.state_dict()), big, "x")
    assert fitted["visual.trunk.pos_embed"].shape == big.visual.trunk.pos_embed.shape


def test_truncated_and_foreign_files(tmp_path):
    good = tmp_path / "good.bin"
    torch.save(make_tiny_model().state_dict(), good)
    truncated = tmp_path / "truncated.bin"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated.bin"):
        read_checkpoint(truncated)
    text = tmp_path / "notes.bin"
    text.write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="notes.bin"):
        read_checkpoint(text)
    torch.save({"epoch": 3}, tmp_path / "meta.bin")
    with pytest.raises(CheckpointError, match="no state dict"):
        read_checkpoint(tmp_path / "meta.bin")


def test_resolution_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    home = tmp_path / "home" / "models" / "conch"
    with pytest.raises(CheckpointError, match="no CONCH checkpoint found") as info:
        resolve_checkpoint(None, None, home)
    assert "huggingface.co/MahmoodLab/conch" in info.value.fix
    home.mkdir(parents=True)
    (home / "pytorch_model.bin").write_bytes(b"x")
    assert resolve_checkpoint(None, None, home) == str(home / "pytorch_model.bin")
    CONVENTIONAL_PATH.parent.mkdir(parents=True)
    CONVENTIONAL_PATH.write_bytes(b"x")
    assert resolve_checkpoint(None, None, home) == str(CONVENTIONAL_PATH)
    env = tmp_path / "env.bin"
    env.write_bytes(b"x")
    assert resolve_checkpoint(None, str(env), home) == str(env)
    explicit = tmp_path / "explicit.bin"
    explicit.write_bytes(b"x")
    assert resolve_checkpoint(str(explicit), str(env), home) == str(explicit)
    assert resolve_checkpoint("hf_hub:MahmoodLab/conch", None, home) == "hf_hub:MahmoodLab/conch"
    with pytest.raises(CheckpointError, match="not found: .*nope.bin"):
        resolve_checkpoint(str(tmp_path / "nope.bin"), None, home)


def test_hub_offline_without_cache_is_a_clear_error(tmp_path, monkeypatch, tokenizer_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(CheckpointError) as info:
        Encoder.load("hf_hub:MahmoodLab/conch", tokenizer_path, device="cpu", models_dir=tmp_path)
    assert "MahmoodLab/conch" in str(info.value)


def test_tiny_checkpoint_loads_with_its_config(tiny_checkpoint: Path, tokenizer_path):
    enc = Encoder.load(str(tiny_checkpoint), tokenizer_path, device="cpu", models_dir=tiny_checkpoint.parent)
    assert enc.model.config == ConchConfig.tiny()
    assert enc.fingerprint == Encoder.from_model(make_tiny_model()).fingerprint


@pytest.mark.parametrize("towers", [("text",), ("vision",)])
def test_one_tower_loads_only_that_tower_with_the_whole_fingerprint(tiny_checkpoint: Path, tokenizer_path, towers):
    whole = Encoder.load(str(tiny_checkpoint), tokenizer_path, device="cpu", models_dir=tiny_checkpoint.parent)
    one = Encoder.load(str(tiny_checkpoint), tokenizer_path, device="cpu", models_dir=tiny_checkpoint.parent,
                       towers=towers)
    assert one.towers == set(towers) and one.fingerprint == whole.fingerprint
    assert (one.model.visual is None) == ("vision" not in towers) and (one.model.text is None) == ("text" not in towers)
    assert (one.tokenizer is None) == ("text" not in towers)
    if "text" in towers:
        np.testing.assert_allclose(one.encode_texts(["tumor"]), whole.encode_texts(["tumor"]), atol=1e-6)
    else:
        image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
        np.testing.assert_allclose(one.encode_images([image]), whole.encode_images([image]), atol=1e-6)


def test_the_fingerprint_is_remembered_per_checkpoint_file(tiny_checkpoint: Path, tokenizer_path, tmp_path):
    cache = tmp_path / "cache"
    first = Encoder.load(str(tiny_checkpoint), tokenizer_path, device="cpu", towers=("text",), cache_dir=cache)
    assert (cache / "fingerprints.json").is_file()
    again = Encoder.load(str(tiny_checkpoint), tokenizer_path, device="cpu", towers=("text",), cache_dir=cache)
    assert again.fingerprint == first.fingerprint == Encoder.from_model(make_tiny_model()).fingerprint
    save_checkpoint(make_tiny_model(1), tiny_checkpoint)  # another file at the same path: a new key
    changed = Encoder.load(str(tiny_checkpoint), tokenizer_path, device="cpu", towers=("text",), cache_dir=cache)
    assert changed.fingerprint == Encoder.from_model(make_tiny_model(1)).fingerprint != first.fingerprint


def test_a_fingerprint_remembered_by_an_earlier_version_is_computed_again(tiny_checkpoint: Path, tokenizer_path,
                                                                          tmp_path):
    """Earlier versions remembered the float-sum fingerprint alone; taken as the current one,
    it would bring back the fingerprint that differs between machines."""
    cache = tmp_path / "cache"
    fresh = Encoder.load(str(tiny_checkpoint), tokenizer_path, device="cpu", cache_dir=cache)
    file = cache / "fingerprints.json"
    entries = json.loads(file.read_text())
    file.write_text(json.dumps({key: fresh.aliases[0] for key in entries}))  # the earlier format
    again = Encoder.load(str(tiny_checkpoint), tokenizer_path, device="cpu", towers=("text",), cache_dir=cache)
    assert (again.fingerprint, again.aliases) == (fresh.fingerprint, fresh.aliases)
    assert json.loads(file.read_text()) == entries


def test_a_text_only_load_imports_neither_timm_nor_torchvision(tiny_checkpoint: Path, tokenizer_path, tmp_path):
    """Once the checkpoint's fingerprint is remembered (the first load checks the whole file),
    a text query builds the text tower alone."""
    cache = tmp_path / "cache"
    Encoder.load(str(tiny_checkpoint), tokenizer_path, device="cpu", cache_dir=cache)
    script = (
        "import sys\nfrom conchdb.model.encoder import Encoder\n"
        f"e = Encoder.load({str(tiny_checkpoint)!r}, {str(tokenizer_path)!r}, device='cpu', towers=('text',),"
        f" cache_dir={str(cache)!r})\n"
        "e.encode_texts('tumor')\n"
        "print(sorted(m for m in ('timm', 'torchvision', 'transformers') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
