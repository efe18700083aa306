"""Ingest fixtures shared by the pipeline and DICOMweb tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from conchdb.model.checkpoint import save_checkpoint
from tests.model.conftest import make_tiny_model


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A checkpoint of the tiny model (seed 0), written once per module."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny.bin"
    save_checkpoint(make_tiny_model(0), path)
    return path
