"""benchmarks/bench_extract.py runs its steps on the tiny SDXL UNet: BASE and TUNED written, the extraction run in a
child process, its time, peak memory and report in the JSON row."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow  # 15-20 s: `make test-tools` runs it in CI
def test_the_extraction_benchmark_runs_on_the_tiny_unet(tmp_path: str) -> None:
    out = os.path.join(tmp_path, "row.json")
    done = subprocess.run([sys.executable, os.path.join(REPO, "benchmarks", "bench_extract.py"), "--tiny", "--keep",
                           str(tmp_path), "--json", out], capture_output=True, text=True, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    with open(out, encoding="utf-8") as fh:
        row = json.load(fh)
    assert row["model"] == "tiny sdxl" and row["modules"] > 0 and row["skipped_unchanged"] > 0
    assert 0 < row["error"] < 0.2  # fp16 weights: the change is rounded where it is stored
    assert row["peak_rss_bytes"] > 0 and row["extract_seconds"] > 0
    assert os.path.exists(os.path.join(tmp_path, "lokr.safetensors"))
