"""Parity with the reference CONCH implementation, through the goldens in ../shared/conch."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conchdb.model.preprocess import preprocess_batch, preprocess_pil


@pytest.fixture(scope="module")
def golden(conch_assets: Path):
    return np.load(conch_assets / "golden" / "golden.npz")


@pytest.fixture(scope="module")
def golden_images(conch_assets: Path, golden) -> list[Path]:
    return [conch_assets / "golden" / "images" / str(name) for name in golden["image_names"]]


@pytest.fixture(scope="module")
def golden_texts(conch_assets: Path) -> list[str]:
    return json.loads((conch_assets / "golden" / "texts.json").read_text())


def _assert_close(ours: np.ndarray, ref: np.ndarray) -> None:
    cos = (ours * ref).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(ref, axis=1)
    assert cos.min() >= 0.99999, cos
    assert np.abs(ours - ref).max() <= 1e-4


def test_pixel_values_match_reference(golden, golden_images):
    ours = torch.stack([preprocess_pil(Image.open(p)) for p in golden_images]).numpy()
    assert ours.shape == golden["pixel_values"].shape
    assert np.abs(ours - golden["pixel_values"]).max() <= 1e-5


def test_token_ids_identical(full_encoder, golden, golden_texts):
    np.testing.assert_array_equal(full_encoder.tokenize(golden_texts), golden["token_ids"])


def test_text_projections(full_encoder, golden, golden_texts):
    _assert_close(full_encoder.encode_texts(golden_texts), golden["text_proj"])


def test_image_projections_and_features(full_encoder, golden, golden_images):
    _assert_close(full_encoder.encode_images(golden_images), golden["image_proj"])
    raw = full_encoder.encode_images(golden_images, raw=True)
    _assert_close(raw, golden["image_unproj"])
    # Features stored by TRIDENT/CLAM project into the same space.
    _assert_close(full_encoder.project(golden["image_unproj"]), golden["image_proj"])


def test_logit_scale(full_encoder, golden):
    assert full_encoder.logit_scale == pytest.approx(float(np.exp(golden["logit_scale"])), rel=1e-6)


def test_batched_tile_path_matches_reference(full_encoder, golden, golden_images):
    index = [p.name for p in golden_images].index("cmu_512.png")
    tile = np.asarray(Image.open(golden_images[index]).convert("RGB"))
    pixels = preprocess_batch(tile[None]).numpy()[0].ravel().astype(np.float64)
    ref_pixels = golden["pixel_values"][index].ravel().astype(np.float64)
    assert pixels @ ref_pixels / np.linalg.norm(pixels) / np.linalg.norm(ref_pixels) >= 0.9999
    vec = full_encoder.encode_tiles(tile[None])[0]
    assert float(vec @ golden["image_proj"][index]) >= 0.9999
