"""`conchdb tiles`: the printed plan, --json, --qc, and exit 2 naming the file for bad slides."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from conchdb.cli import app

runner = CliRunner()


def _run(*args: str):
    return runner.invoke(app, ["tiles", *args])


def test_text_output(cmu: Path, cmu_plan):
    _, grid = cmu_plan
    result = _run(str(cmu))
    assert result.exit_code == 0, result.output
    out = result.stdout
    for expected in ("2220 × 2967 px", "0.499 µm/px", "openslide.mpp", "read level  0",
                     f"{len(grid)} with tissue", "aperio", "513 level-0 px"):
        assert expected in out


def test_json_output(cmu: Path, cmu_plan):
    _, grid = cmu_plan
    result = _run(str(cmu), "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert list(doc) == ["slide", "slide_id", "mpp", "mpp_source", "target_mpp", "tile_px", "tile_size_level0",
                         "read_level", "tiles"]
    assert doc["slide"] == str(cmu) and doc["slide_id"] == "cmu_small_region.svs"
    assert (doc["mpp"], doc["mpp_source"], doc["target_mpp"], doc["tile_px"]) == (0.499, "openslide.mpp", 0.5, 512)
    assert (doc["tile_size_level0"], doc["read_level"]) == (513, 0)
    assert doc["tiles"] == [{"x": t.x, "y": t.y, "tissue": t.tissue} for t in grid.tiles]
    assert all(isinstance(v, int) for t in doc["tiles"] for v in (t["x"], t["y"]))


def test_options_change_the_grid(cmu: Path):
    doc = json.loads(_run(str(cmu), "--json", "--tile-px", "256", "--target-mpp", "1.0", "--stride-px", "128",
                          "--min-tissue", "0.5").stdout)
    assert doc["tile_size_level0"] == 513 and doc["target_mpp"] == 1.0
    steps = {t["x"] for t in doc["tiles"]}
    assert all(x % 257 == 0 for x in steps) and all(t["tissue"] >= 0.5 for t in doc["tiles"])


def test_qc_picture(cmu: Path, tmp_path: Path):
    out = tmp_path / "qc" / "cmu.png"
    result = _run(str(cmu), "--qc", str(out))
    assert result.exit_code == 0, result.output
    with Image.open(out) as image:
        assert image.format == "PNG" and max(image.size) >= 800
        rgb = np.asarray(image.convert("RGB")).astype(int)
    blue = ((rgb[..., 2] > 200) & (rgb[..., 0] < 60) & (rgb[..., 1] < 100)).sum()
    assert blue > 1000  # tile outlines were drawn


def test_slide_mpp_rescues_a_72_dpi_tiff(slides_dir: Path):
    result = _run(str(slides_dir / "boxes.tiff"), "--slide-mpp", "10", "--json", "--tile-px", "64")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert (doc["mpp"], doc["mpp_source"]) == (10.0, "--slide-mpp") and doc["tiles"]


def test_plain_image_is_one_tile(slides_dir: Path):
    result = _run(str(slides_dir / "boxes.png"), "--json")
    assert result.exit_code == 0
    doc = json.loads(result.stdout)
    assert doc["mpp"] is None and doc["tiles"] == [{"x": 25, "y": 0, "tissue": doc["tiles"][0]["tissue"]}]
    assert "embedded whole" in result.stderr


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("boxes.tiff", "no usable pixel size"),
        ("unreadable.svs", "cannot read pixels"),
        ("unopenable.tiff", "cannot open"),
        ("missing.svs", "no such file"),
    ],
)
def test_bad_slides_exit_2_naming_the_file(slides_dir: Path, name: str, reason: str):
    path = slides_dir / name
    result = _run(str(path))
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert str(path) in result.stderr and reason in result.stderr and "fix:" in result.stderr
    assert "Traceback" not in result.output


def test_bad_option_exits_2(cmu: Path):
    result = _run(str(cmu), "--min-tissue", "2")
    assert result.exit_code == 2 and "--min-tissue" in result.stderr


def test_installed_command_prints_no_traceback(slides_dir: Path):
    """The console script, as a user runs it: one message and its fix on stderr, exit 2."""
    path = slides_dir / "unreadable.svs"
    done = subprocess.run([sys.executable, "-m", "conchdb.cli", "tiles", str(path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith(f"error: {path}") and "Traceback" not in done.stderr
