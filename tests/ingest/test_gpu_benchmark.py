"""benchmarks/gpu.py at its smallest configuration: every stage runs and the JSON has the issue's keys."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KEYS = {"device", "model_tiles_per_s", "caption_pooler_tiles_per_s", "tflops", "end_to_end_tiles_per_s",
        "lockstep_tiles_per_s", "stage_wait_s", "peak_gpu_mb"}


def test_smallest_configuration_runs(assets: Path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "CONCHDB_TEST_ASSETS": str(assets)}
    args = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--small", "--device", "cpu",
            "--batch-sizes", "4", "--readers", "1", "--slide-px", "3072", "--lockstep-tiles", "4", "--json"]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    doc = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(doc) >= KEYS
    assert doc["model_tiles_per_s"]["fp32"]["eager"]["4"] > 0 and doc["caption_pooler_tiles_per_s"]["bf16"]["4"] > 0
    rows = doc["end_to_end"]
    assert set(rows) == {"1 readers", "gpu-jpeg"}
    assert all(row["tiles"] > 0 and row["tiles"] == rows["1 readers"]["tiles"] for row in rows.values())
    assert doc["lockstep_tiles_per_s"] > 0
