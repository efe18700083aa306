"""Encoder logic on a tiny model: batching, paths, projections, fingerprint."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from conchdb.errors import ConchdbError, ImageInputError
from conchdb.model.device import resolve_device, resolve_precision
from conchdb.model.encoder import Encoder, open_image, state_fingerprints
from conchdb.model.preprocess import PREPROCESSING
from conchdb.model.tokenizer import ConchTokenizer

from .conftest import make_tiny_model


def _images(n: int) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    sizes = [(300, 200), (512, 512), (448, 448), (640, 480), (256, 256)]
    return [Image.fromarray(rng.integers(0, 255, (*sizes[i % 5][::-1], 3), dtype=np.uint8)) for i in range(n)]


def test_batch_equals_one_by_one(tiny_model):
    enc = Encoder.from_model(tiny_model)
    enc.batch_size = 4
    images = _images(7)
    batch = enc.encode_images(images)
    single = np.concatenate([enc.encode_images([img]) for img in images])
    np.testing.assert_allclose(batch, single, atol=1e-5)
    assert batch.shape == (7, 512) and batch.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)


def test_texts_batch_equals_one_by_one(tiny_model, tokenizer_path):
    enc = Encoder.from_model(tiny_model, ConchTokenizer(tokenizer_path))
    enc.batch_size = 2
    texts = ["tumor", "an H&E image of lymphocytes", "", "necrosis with hemorrhage"]
    batch = enc.encode_texts(texts)
    single = np.concatenate([enc.encode_texts([t]) for t in texts])
    np.testing.assert_allclose(batch, single, atol=1e-5)
    assert not np.allclose(batch[0], batch[1])


def test_raw_features_project_to_embeddings(tiny_model):
    enc = Encoder.from_model(tiny_model)
    images = _images(3)
    np.testing.assert_allclose(enc.project(enc.encode_images(images, raw=True)), enc.encode_images(images), atol=1e-5)


def test_tile_path_close_to_pil_path(tiny_model):
    enc = Encoder.from_model(tiny_model)
    rng = np.random.default_rng(1)
    smooth = rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)
    tile = np.asarray(Image.fromarray(smooth).resize((512, 512), Image.BICUBIC))
    a = enc.encode_tiles(tile[None])[0]
    b = enc.encode_images([Image.fromarray(tile)])[0]
    assert float(a @ b) > 0.999


def test_fingerprint_tracks_weights(tiny_model):
    a = Encoder.from_model(make_tiny_model(0)).fingerprint
    assert a == Encoder.from_model(make_tiny_model(0)).fingerprint
    assert a != Encoder.from_model(make_tiny_model(1)).fingerprint
    assert Encoder.from_model(tiny_model).describe()["model_fingerprint"] == a


def _earlier_fingerprint(state: dict, extra: dict) -> str:
    """The fingerprint as conchdb computed it before the integer checksum (values summed as floats)."""
    h = hashlib.sha256(json.dumps(extra, sort_keys=True).encode())
    for name, tensor in sorted(state.items()):
        flat = tensor.detach().reshape(-1).float().cpu()
        step = max(1, flat.numel() // 4096)
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(flat[::step].numpy().tobytes())
        h.update(np.float64(flat.double().sum().item()).tobytes())
    return h.hexdigest()[:16]


def test_the_fingerprint_is_the_same_whatever_the_thread_count():
    """Workers and the machine that built a collection have other core counts; a float sum
    split over threads rounds differently, an integer checksum does not."""
    rng = np.random.default_rng(0)
    state = {f"w{i}": torch.from_numpy(rng.standard_normal(1 << 20).astype(np.float32) * 10.0 ** i) for i in range(4)}
    threads = torch.get_num_threads()
    try:
        seen = set()
        for n in (1, 2, 3, 8):
            torch.set_num_threads(n)
            seen.add(state_fingerprints(state, {"size": 448})[0])
    finally:
        torch.set_num_threads(threads)
    assert len(seen) == 1
    state["w0"][12345] += 1e-3
    assert state_fingerprints(state, {"size": 448})[0] not in seen


def test_an_encoder_answers_to_the_fingerprint_earlier_versions_recorded(tiny_model):
    enc = Encoder.from_model(tiny_model)
    earlier = _earlier_fingerprint(tiny_model.state_dict(), {"preprocessing": PREPROCESSING, "size": enc.image_size})
    assert enc.aliases == (earlier,) and earlier != enc.fingerprint
    assert enc.answers_to(enc.fingerprint) and enc.answers_to(earlier)
    assert not enc.answers_to(Encoder.from_model(make_tiny_model(1)).fingerprint) and not enc.answers_to(None)


def test_corrupt_image_is_named(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    with pytest.raises(ImageInputError, match="broken.png"):
        open_image(bad)
    with pytest.raises(ImageInputError, match="not found"):
        open_image(tmp_path / "missing.png")


def test_device_and_precision_choices():
    assert resolve_device("cpu").type == "cpu"
    assert str(resolve_precision("auto", resolve_device("cpu"))) == "torch.float32"
    with pytest.raises(ConchdbError, match="fp16"):
        resolve_precision("fp16", resolve_device("cpu"))
    with pytest.raises(ConchdbError, match="precision"):
        resolve_precision("int3", resolve_device("cpu"))
    with pytest.raises(ConchdbError):
        resolve_device("tpu")


def test_a_bare_string_is_one_text(tiny_model, tokenizer_path):
    tok = ConchTokenizer(tokenizer_path)
    assert tok("tumor necrosis").shape == (1, 128)
    np.testing.assert_array_equal(tok("tumor necrosis"), tok(["tumor necrosis"]))
    enc = Encoder.from_model(tiny_model, tok)
    one = enc.encode_texts("tumor necrosis")
    assert one.shape == (1, 512)
    np.testing.assert_allclose(one, enc.encode_texts(["tumor necrosis"]), atol=1e-6)


def test_a_decompression_bomb_is_a_clear_image_error(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("RGB", (100, 100)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 10,000 px is then over twice the limit
    with pytest.raises(ImageInputError, match="too large") as caught:
        open_image(path)
    assert caught.value.parameter == "image" and caught.value.exit_code == 2
