"""Model fixtures: the full synthetic checkpoint (parity, CLI) and a tiny model (logic)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from conchdb.model.checkpoint import save_checkpoint
from conchdb.model.conch import ConchModel
from conchdb.model.config import ConchConfig
from conchdb.model.encoder import Encoder


def _load_generator(conch_assets: Path):
    spec = importlib.util.spec_from_file_location("synthetic_checkpoint", conch_assets / "synthetic_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def synthetic_state(conch_assets: Path) -> dict[str, torch.Tensor]:
    return _load_generator(conch_assets).synthetic_state_dict()


@pytest.fixture(scope="session")
def synthetic_checkpoint(synthetic_state, tmp_path_factory) -> Path:
    """The synthetic CONCH checkpoint written as the release is: a bare state dict."""
    path = tmp_path_factory.mktemp("conch") / "pytorch_model.bin"
    torch.save(synthetic_state, path)
    return path


@pytest.fixture(scope="session")
def full_encoder(synthetic_checkpoint: Path, tokenizer_path: Path) -> Encoder:
    return Encoder.load(str(synthetic_checkpoint), tokenizer_path, device="cpu", precision="fp32")


def make_tiny_model(seed: int = 0) -> ConchModel:
    """A tiny CONCH with random non-trivial weights."""
    torch.manual_seed(seed)
    model = ConchModel(ConchConfig.tiny())
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn_like(param) * 0.05 + (1.0 if param.ndim == 1 and param.numel() > 1 else 0.0))
        model.logit_scale.fill_(4.0)
    return model


@pytest.fixture
def tiny_model() -> ConchModel:
    return make_tiny_model()


@pytest.fixture
def tiny_checkpoint(tmp_path: Path) -> Path:
    path = tmp_path / "tiny.bin"
    save_checkpoint(make_tiny_model(), path)
    return path
