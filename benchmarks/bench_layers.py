"""Per-layer LoKr cost as a ratio to the bare layer: lokr_diffusers (auto, merged, bypass) against
PEFT 0.21.2 and LyCORIS 4.1.3 (rebuild and bypass), at SD1.5 / CLIP-L shapes, batch 2 (CFG).

All implementations run interleaved in one process; each number is a median ratio over repeats,
so a noisy shared machine shifts them together. Inference = no_grad forward (in train mode, so W + ΔW
is built each call, except `ours_reuse`, in eval mode, which keeps it across calls as a denoising loop
does); training = forward + backward with a frozen base, trainable factors and an input that requires grad.

    python benchmarks/bench_layers.py [--repeats 7] [--threads 2] [--only attn] [--json out.json] [--dit]

--dit adds FLUX.1's shapes (3072-wide attention and 12288-wide mlp at 4096 tokens, batch 1).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

R, ALPHA = 8, 8.0
SHAPES: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("attn 320 N=8192", lambda: nn.Linear(320, 320), (2, 4096, 320)),
    ("attn 640 N=2048", lambda: nn.Linear(640, 640), (2, 1024, 640)),
    ("attn 1280 N=512", lambda: nn.Linear(1280, 1280), (2, 256, 1280)),
    ("ff 320->2560 N=8192", lambda: nn.Linear(320, 2560), (2, 4096, 320)),
    ("xattn k 768->320 N=154", lambda: nn.Linear(768, 320), (2, 77, 768)),
    ("te mlp 768->3072 N=154", lambda: nn.Linear(768, 3072), (2, 77, 768)),
    ("conv3x3 320 32x32 Tucker", lambda: nn.Conv2d(320, 320, 3, padding=1), (2, 320, 32, 32)),
]
# FLUX.1 at 1024x1024: 4096 image tokens (+ 512 T5 tokens in the joint attention), batch 1 (guidance-
# distilled: no CFG batch); diffusers splits BFL's fused qkv / linear1 into these Linears. --dit adds them
# (seconds per call on a CPU).
DIT_SHAPES: list[tuple[str, Callable[[], nn.Module], tuple[int, ...]]] = [
    ("flux attn 3072 N=4096", lambda: nn.Linear(3072, 3072), (1, 4096, 3072)),
    ("flux mlp 3072->12288 N=4096", lambda: nn.Linear(3072, 12288), (1, 4096, 3072)),
    ("flux txt attn 3072 N=512", lambda: nn.Linear(3072, 3072), (1, 512, 3072)),
]


class Wrap(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def _randomise(module: nn.Module) -> None:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lokr" in name:
                p.copy_(torch.randn_like(p) * 0.05)
                p.requires_grad_(True)


def implementations(make: Callable[[], nn.Module]) -> dict[str, nn.Module]:
    from lokr_diffusers import LoKrConfig, LoKrModel

    base = Wrap(make()).requires_grad_(False)
    out: dict[str, nn.Module] = {"bare": base}
    for mode in ("auto", "merged", "bypass"):
        ours = LoKrModel(copy.deepcopy(base), LoKrConfig(r=R, alpha=ALPHA, target_modules=["layer"],
                                                         init_weights=False, use_effective_conv2d=True))
        ours.set_forward_mode(mode)
        _randomise(ours)
        out[f"ours_{mode}"] = ours
    reused = copy.deepcopy(out["ours_auto"]).eval()  # eval + no_grad: W + ΔW kept across calls (reuse.py)
    out["ours_reuse"] = reused
    try:
        from peft import LoKrConfig as PeftConfig
        from peft import get_peft_model

        out["peft"] = get_peft_model(copy.deepcopy(base), PeftConfig(r=R, alpha=ALPHA, target_modules=["layer"],
                                                                     init_weights=False, use_effective_conv2d=True))
    except ImportError:
        pass
    try:
        from lycoris.modules.lokr import LokrModule

        for bypass in (False, True):
            m = copy.deepcopy(base)
            lyc = LokrModule("x", m.layer, 1.0, R, ALPHA, use_tucker=True, bypass_mode=bypass)
            lyc.apply_to()
            m.lyc = lyc  # registers its parameters on the wrapper
            _randomise(m)
            out["lycoris_bypass" if bypass else "lycoris"] = m
    except ImportError:
        pass
    return out


def measure(models: dict[str, nn.Module], shape: tuple[int, ...], repeats: int) -> dict[str, dict[str, float]]:
    x = torch.randn(*shape)
    xg = x.clone().requires_grad_(True)

    def infer(m: nn.Module) -> None:
        with torch.no_grad():
            m(x)

    def train(m: nn.Module) -> None:
        xg.grad = None
        m(xg).sum().backward()

    times: dict[str, dict[str, list[float]]] = {k: {"inf": [], "train": []} for k in models}
    for m in models.values():  # warm-up
        infer(m)
        train(m)
    for _ in range(repeats):
        for k, m in models.items():
            for phase, fn in (("inf", infer), ("train", train)):
                t0 = time.perf_counter()
                fn(m)
                times[k][phase].append(time.perf_counter() - t0)
    med = {k: {p: statistics.median(v) for p, v in d.items()} for k, d in times.items()}
    return {k: {p: med[k][p] / med["bare"][p] for p in ("inf", "train")} for k in models if k != "bare"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", default="", help="run the shapes whose name contains this")
    parser.add_argument("--json", help="also write the ratios here")
    parser.add_argument("--dit", action="store_true", help="add the FLUX.1 shapes (3072-wide, 4096 tokens)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name, make, shape in SHAPES + (DIT_SHAPES if args.dit else []):
        if args.only and args.only not in name:
            continue
        ratios = measure(implementations(make), shape, args.repeats)
        rows.append({"shape": name, "ratio": ratios})
        cells = "  ".join(f"{k} {v['inf']:.2f}/{v['train']:.2f}" for k, v in ratios.items())
        print(f"{name:26s} (inference/training ratio to bare)  {cells}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
