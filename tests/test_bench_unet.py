"""benchmarks/bench_unet.py (issue 10's whole-UNet table) runs end to end on tiny UNets: every row and
column is there, and every ratio that means something is a positive finite number. A mechanism check,
not a speed check: the timings of one call on a shared CPU say nothing."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_unet.py"
ALL_COLUMNS = ["bare", "ours_auto", "ours_merged", "ours_bypass", "ours_fused", "ours_no_reuse", "peft", "lycoris"]
EAGER_ROWS = {  # row name -> (modules in the tiny UNet, columns with a number)
    "SD1.5 inference, attn+ff": (192, ALL_COLUMNS),
    "SD1.5 inference, + resnet convs Tucker": (272, ALL_COLUMNS),
    "SDXL inference, attn+ff": (192, ALL_COLUMNS),
    "SD1.5 training step, attn+ff": (192, [c for c in ALL_COLUMNS if c not in ("ours_fused", "ours_no_reuse")]),
    "SD1.5 training step, + resnet convs Tucker": (272, [c for c in ALL_COLUMNS
                                                         if c not in ("ours_fused", "ours_no_reuse")]),
    "SDXL training step, attn+ff": (192, [c for c in ALL_COLUMNS if c not in ("ours_fused", "ours_no_reuse")]),
}
COMPILED_ROWS = {
    "SD1.5 inference compiled, attn+ff": (192, ["bare", "ours_auto"]),
    "SDXL inference compiled, attn+ff": (192, ["bare", "ours_auto"]),
}


def _bench_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_unet", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _run(tmp_path: Path, *extra: str) -> tuple[dict[str, Any], str]:
    out = tmp_path / "bench.json"
    # its own process: the script sets torch's thread count, the reuse budget and dynamo state
    proc = subprocess.run([sys.executable, str(BENCH), "--tiny", "--device", "cpu", "--repeats", "1",
                           "--json", str(out), *extra], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text(encoding="utf-8")), proc.stdout


def _check(data: dict[str, Any], stdout: str, expected: dict[str, tuple[int, list[str]]]) -> None:
    assert data["device_type"] == "cpu" and data["settings"]["tiny"] is True
    assert list(data["columns"]) == ALL_COLUMNS
    assert [r["name"] for r in data["rows"]] == list(expected)
    for row in data["rows"]:
        modules, numbered = expected[row["name"]]
        assert row["modules"] == modules, row["name"]
        assert row["notes"] == [], (row["name"], row["notes"])  # no skipped library, no graph break, finite
        assert list(row["ratio"]) == ALL_COLUMNS and list(row["median_s"]) == ALL_COLUMNS
        assert row["columns"] == numbered
        for col in ALL_COLUMNS:
            ratio = row["ratio"][col]
            if col in numbered:
                assert isinstance(ratio, float) and math.isfinite(ratio) and ratio > 0, (row["name"], col, ratio)
            else:
                assert ratio is None, (row["name"], col, ratio)
        assert row["ratio"]["bare"] == 1.0
        if row["training"]:  # peak memory is a CUDA measurement: None on the CPU, for every column
            assert row["peak_memory_bytes"] == dict.fromkeys(ALL_COLUMNS)
        assert f"| {row['label']} |" in stdout
    header = stdout.splitlines()[1]
    assert header.startswith("| ratio to the bare UNet | bare | ours auto |")
    assert "PEFT" in header and "LyCORIS" in header


def test_full_size_configs_have_the_issue_module_counts() -> None:
    """The full-size configs (counted on the meta device) are the issue's SD1.5 / SDXL UNets."""
    bench = _bench_module()
    assert bench.count_modules("sd15", convs=False) == 192
    assert bench.count_modules("sd15", convs=True) == 272
    assert bench.count_modules("sdxl", convs=False) == 722


def test_tiny_eager_rows(tmp_path: Path) -> None:
    """Every eager row and column, one timed call each and no warm-up (about 30 s on 2 cores)."""
    data, stdout = _run(tmp_path, "--no-compile", "--warmup", "0")
    _check(data, stdout, EAGER_ROWS)


@pytest.mark.slow
def test_tiny_every_row(tmp_path: Path) -> None:
    """The whole --tiny run, compiled rows included (fullgraph=True, the eager backend): about 2 minutes,
    most of it dynamo tracing the adapted UNet."""
    data, stdout = _run(tmp_path)
    _check(data, stdout, EAGER_ROWS | COMPILED_ROWS)
