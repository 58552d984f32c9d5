"""Training scripts launched as a user launches them on N processes: `torchrun --standalone --nproc_per_node N`
(gloo on the CPU), for tests/test_training_sharded.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor

ROOT = Path(__file__).resolve().parents[2]


def torchrun(script: str, argv: list[str], processes: int = 2, timeout: int = 300) -> str:
    """Run examples/`script` with `argv` on `processes` processes; its output (stdout and stderr). A failed run
    fails the test with the output's tail."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
           str(ROOT / "examples" / script), *argv]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))
    out = done.stdout + done.stderr
    assert done.returncode == 0, f"{' '.join(cmd)} exited {done.returncode}:\n{out[-4000:]}"
    return out


def losses(output_dir: str) -> dict[int, float]:
    """The run's loss log (loss.jsonl): step -> loss, each step once."""
    with open(os.path.join(output_dir, "loss.jsonl"), encoding="utf-8") as fh:
        records = [json.loads(line) for line in fh]
    steps = [r["step"] for r in records]
    assert steps and len(set(steps)) == len(steps)
    return {r["step"]: r["loss"] for r in records}


def file_diff(a: str, b: str) -> float:
    """The largest difference between two safetensors files' tensors (which must have the same keys)."""
    x, y = load_file(a), load_file(b)
    assert x.keys() == y.keys() and x
    return max((x[k].float() - y[k].float()).abs().max().item() for k in x)


def optimizer_diff(a: str, b: str) -> float:
    """The largest difference between two checkpoints' optimizer states (torch's layout: the same parameter
    groups, the same parameters by index)."""
    x, y = (torch.load(p, weights_only=True) for p in (a, b))
    assert x["param_groups"] == y["param_groups"] and x["state"].keys() == y["state"].keys()

    def tensors(st: dict) -> dict[str, Tensor]:
        return {k: v for k, v in st.items() if isinstance(v, Tensor)}

    return max((tensors(x["state"][i])[k].float() - v.float()).abs().max().item()
               for i in y["state"] for k, v in tensors(y["state"][i]).items())
