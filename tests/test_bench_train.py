"""benchmarks/bench_train.py runs end to end: a row per family and base precision, with LoKr's (and PEFT's and
LyCORIS', on the unquantized base) ratio to the bare step a positive finite number, and the LoKr step training the
factors. A mechanism check, not a speed check: one step's timing on a shared CPU says nothing."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train.py"


def test_bench_train_gives_a_row_per_family_and_precision(tmp_path) -> None:
    out = tmp_path / "rows.json"
    result = subprocess.run([sys.executable, str(BENCH), "--families", "zimage", "--precisions", "none", "fp8",
                             "--repeats", "1", "--threads", "1", "--json", str(out)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [(r["family"], r["precision"]) for r in rows] == [("zimage", "none"), ("zimage", "fp8")]
    for r in rows:
        assert math.isfinite(r["ours_ratio"]) and r["ours_ratio"] > 0 and r["bare_s"] > 0
    assert rows[0]["peft_ratio"] > 0 and rows[1]["peft_ratio"] is None
    assert rows[0]["lycoris_ratio"] > 0 and rows[1]["lycoris_ratio"] is None
    adapted = rows[0]["adapted_modules"]  # PEFT and LyCORIS hold an adapter on each module ours does
    assert adapted["bare"] == 0 and adapted["ours"] > 0 and adapted["peft"] == adapted["lycoris"] == adapted["ours"]
    assert "| zimage | fp8 | no |" in result.stdout


@pytest.mark.slow
def test_bench_train_full_size_row_runs_on_one_block_of_each_kind(tmp_path) -> None:
    """--full flux1-dev at full width with one double and one single block (the CUDA row's code on the CPU, about
    90 s): a ratio for each kind, every kind adapting the same modules."""
    out = tmp_path / "full.json"
    result = subprocess.run([sys.executable, str(BENCH), "--full", "flux1-dev", "--full-blocks", "1", "--tokens", "16",
                             "--repeats", "1", "--threads", "2", "--json", str(out)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    row, = json.loads(out.read_text())
    assert row["full_size"] and row["bare_s"] > 0
    assert all(math.isfinite(row[f"{k}_ratio"]) and row[f"{k}_ratio"] > 0 for k in ("ours", "peft", "lycoris"))
    adapted = row["adapted_modules"]
    assert adapted["bare"] == 0 and adapted["ours"] > 0 and adapted["peft"] == adapted["lycoris"] == adapted["ours"]
