"""This checkout's lokr_diffusers against an earlier commit's, in one process, interleaved: the
launch-bound proxy of bench_proxy.py (N x Linear(64, 64) on a (1, 16, 64) input, where per-call Python
overhead decides) and three of bench_layers.py's SD1.5 shapes. For refactors that must not be slower.

    python benchmarks/bench_versions.py REF [--repeats 31] [--layers 200]

REF's package is exported with `git archive` into a temporary folder and imported as `lokr_ref` (the
package imports itself relatively, so the copy is independent). Ratios are medians over repeats, each
repeat running bare / REF / this checkout in a rotated order, so a noisy machine shifts them together.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

import torch
from bench_proxy import _time  # this folder is on sys.path when run as a script
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def load_ref(ref: str, into: Path) -> ModuleType:
    """REF's lokr_diffusers as the package `lokr_ref`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "lokr_diffusers"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    (into / "lokr_diffusers").rename(into / "lokr_ref")
    sys.path.insert(0, str(into))
    return importlib.import_module("lokr_ref")


def compare(models: dict[str, nn.Module], x: torch.Tensor, repeats: int, inner: int,
            eval_inference: bool) -> dict[str, dict[str, float]]:
    """Median seconds per call: inference (no grad; eval mode if eval_inference, else train mode, which
    builds W + ΔW each call) and a training step (forward + backward, MSE-like loss)."""
    xg = x.clone().requires_grad_(True)
    times: dict[str, dict[str, list[float]]] = {n: {"inference": [], "training": []} for n in models}
    names = list(models)
    for rep in range(repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            m = models[name]
            m.train(not eval_inference)

            def infer(m: nn.Module = m) -> object:
                with torch.no_grad():
                    return m(x)

            def step(m: nn.Module = m) -> None:
                m(xg).square().mean().backward()

            times[name]["inference"].append(_time(infer, inner))
            m.train()
            times[name]["training"].append(_time(step, inner))
    return {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}


def adapted(pkg: ModuleType, base: nn.Module, targets: list[str]) -> nn.Module:
    cfg = pkg.LoKrConfig(r=8, alpha=8, target_modules=targets, init_weights=False, use_effective_conv2d=True,
                         decompose_both=True)
    return pkg.LoKrModel(copy.deepcopy(base), cfg, "a")  # type: ignore[no-any-return]


def report(title: str, med: dict[str, dict[str, float]]) -> None:
    cells = []
    for kind in ("inference", "training"):
        bare = med["bare"][kind]
        cells.append(f"{kind} ref {med['ref'][kind] / bare:.2f} now {med['now'][kind] / bare:.2f} "
                     f"(now/ref {med['now'][kind] / med['ref'][kind]:.3f})")
    print(f"{title:28s} " + "; ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ref", help="the commit to compare with (e.g. HEAD~1, a tag)")
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--layers", type=int, default=200)
    args = ap.parse_args()
    import lokr_diffusers as now

    with tempfile.TemporaryDirectory() as tmp:
        ref = load_ref(args.ref, Path(tmp))
        print(f"ratios to the bare model, medians of {args.repeats}; ref = {args.ref}, now = this checkout")
        torch.set_num_threads(1)
        torch.manual_seed(0)
        base = nn.Sequential(*[nn.Linear(64, 64) for _ in range(args.layers)])
        targets = [str(i) for i in range(args.layers)]
        models = {"bare": base, "ref": adapted(ref, base, targets), "now": adapted(now, base, targets)}
        report(f"proxy {args.layers} x Linear(64,64)", compare(models, torch.randn(1, 16, 64), args.repeats, 5,
                                                                eval_inference=True))
        torch.set_num_threads(2)
        shapes: list[tuple[str, nn.Module, tuple[int, ...]]] = [
            ("attn 320 N=8192", nn.Linear(320, 320), (2, 4096, 320)),
            ("xattn k 768->320 N=154", nn.Linear(768, 320), (2, 77, 768)),
            ("conv3x3 320 32x32 Tucker", nn.Conv2d(320, 320, 3, padding=1), (2, 320, 32, 32)),
        ]
        for title, layer, shape in shapes:
            one = nn.Sequential(layer)
            models = {"bare": one, "ref": adapted(ref, one, ["0"]), "now": adapted(now, one, ["0"])}
            report(title, compare(models, torch.randn(*shape), max(args.repeats // 3, 5), 4, eval_inference=False))


if __name__ == "__main__":
    main()
