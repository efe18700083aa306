"""Model fixtures: the full synthetic encoder (parity, CLI) and a tiny model (logic)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conchdb.model.checkpoint import save_checkpoint
from conchdb.model.conch import ConchModel
from conchdb.model.config import ConchConfig
from conchdb.model.encoder import Encoder


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
