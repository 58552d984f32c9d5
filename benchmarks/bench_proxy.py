"""The launch-bound proxy of a GPU denoising loop, on a CPU: 200 tiny Linear(64, 64) layers on a
(1, 16, 64) input, where per-call overhead, not arithmetic, decides. Per layer and call, in one
process, interleaved, medians of --repeats: the bare model, LoKr unfused (W + ΔW reused across calls,
and rebuilt each call with reuse off), LoKr fused, and PEFT's LoKr; inference (no grad, eval) and a
training step (forward + backward; the bare model trains its weights, the adapters their factors).

    python benchmarks/bench_proxy.py [--layers 200] [--repeats 30] [--threads 1] [--json out.json]
        [--compile [--compile-layers 50]] [--paths]

--compile adds inference under torch.compile(fullgraph=True) (inductor): the bare model against LoKr
unfused with frozen adapters (W + ΔW kept inside the graph, docs/performance.md §torch.compile), on
--compile-layers layers (compiling 200 takes minutes on a small CPU).

--paths adds a training step as a fine-tuning loop runs it: frozen base, input requiring grad, grads
set to None before each step over the trainable parameters (as optimizer.zero_grad does), MSE loss against a
fixed target; the bare model (frozen) against ours in
each forward mode (auto, merged, bypass) and PEFT's LoKr, interleaved, medians of --repeats. With --compile
too, the same step with every model compiled (fullgraph, inductor) on --compile-layers layers.
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

from lokr_diffusers import LoKrConfig, LoKrModel, reuse


def _time(fn: Callable[[], object], inner: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--inner", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--compile-layers", type=int, default=50)
    ap.add_argument("--paths", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(64, 64) for _ in range(args.layers)])
    x = torch.randn(1, 16, 64)
    cfg = LoKrConfig(r=8, alpha=8, target_modules=[str(i) for i in range(args.layers)], init_weights=False)
    ours = LoKrModel(copy.deepcopy(base), cfg, "a")
    fused = LoKrModel(copy.deepcopy(base), cfg, "a")
    fused.merge_adapter()
    models: dict[str, nn.Module] = {"bare": base, "ours (reuse)": ours, "ours (no reuse)": ours, "ours fused": fused}
    try:
        from peft import LoKrConfig as PeftLoKrConfig
        from peft import get_peft_model

        peft_cfg = PeftLoKrConfig(r=8, alpha=8, target_modules=[str(i) for i in range(args.layers)],
                                  init_weights=False)
        models["PEFT 0.21 LoKr"] = get_peft_model(copy.deepcopy(base), peft_cfg)
    except ImportError:
        pass

    def infer(name: str, m: nn.Module) -> Callable[[], object]:
        def run() -> object:
            reuse.set_budget(0 if name == "ours (no reuse)" else reuse.DEFAULT_BUDGET)
            with torch.no_grad():
                return m(x)
        return run

    def train(m: nn.Module) -> Callable[[], object]:
        def run() -> object:
            m(x).square().mean().backward()
            return None
        return run

    for m in models.values():
        m.eval()
    results: dict[str, dict[str, list[float]]] = {n: {"inference": [], "training": []} for n in models}
    names = list(models)
    for rep in range(args.repeats):  # interleaved: each implementation sees the same machine state,
        # in an order rotated each repeat, so that none always runs right after the same other one
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            m = models[name]
            m.eval()
            results[name]["inference"].append(_time(infer(name, m), args.inner))
            if name in ("ours (no reuse)", "ours fused"):
                continue  # a training step has no reuse; a fused adapter cannot train
            m.train()
            results[name]["training"].append(_time(train(m), args.inner))
    reuse.set_budget(reuse.DEFAULT_BUDGET)
    med = {n: {k: statistics.median(v) for k, v in r.items() if v} for n, r in results.items()}
    per_layer = 1e6 / args.layers
    print(f"{args.layers} x Linear(64, 64), input (1, 16, 64), {args.threads} thread(s), median of {args.repeats}")
    print(f"{'':18s} {'inference µs/layer':>20s} {'ratio':>7s} {'training µs/layer':>19s} {'ratio':>7s}")
    for name, r in med.items():
        inf = r["inference"] * per_layer
        line = f"{name:18s} {inf:20.1f} {r['inference'] / med['bare']['inference']:7.2f}"
        if "training" in r:
            line += f" {r['training'] * per_layer:19.1f} {r['training'] / med['bare']['training']:7.2f}"
        print(line)
    out: dict[str, object] = {"layers": args.layers, "threads": args.threads, "median_s": med}
    if args.paths:
        out["paths"] = _paths(args, x, args.layers, compiled=False)
    if args.paths and args.compile:
        out["paths_compiled"] = _paths(args, x, args.compile_layers, compiled=True)
    if args.compile:
        out["compiled"] = _compiled(args, x)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(out, fh, indent=1)


def _paths(args: argparse.Namespace, x: torch.Tensor, n: int, compiled: bool) -> dict[str, float]:
    """Training steps (frozen base, x requiring grad, MSE) per forward mode on n layers, eager or each model
    compiled (fullgraph, inductor; against the compiled bare model); medians per layer and step."""
    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(64, 64) for _ in range(n)]).requires_grad_(False)
    cfg = LoKrConfig(r=8, alpha=8, target_modules=[str(i) for i in range(n)], init_weights=False)
    models: dict[str, nn.Module] = {"bare (frozen)": base}
    for mode in ("auto", "merged", "bypass"):
        m = LoKrModel(copy.deepcopy(base), cfg, "a")
        m.set_forward_mode(mode)
        models[f"ours {mode}"] = m
    try:
        from peft import LoKrConfig as PeftLoKrConfig
        from peft import get_peft_model

        models["PEFT LoKr"] = get_peft_model(copy.deepcopy(base), PeftLoKrConfig(
            r=8, alpha=8, target_modules=[str(i) for i in range(n)], init_weights=False))
    except ImportError:
        pass
    xs = x.clone().requires_grad_(True)
    target = torch.randn_like(x)

    def step(m: nn.Module) -> Callable[[], object]:
        params = [p for p in m.parameters() if p.requires_grad]  # what an optimizer's zero_grad walks

        def run() -> object:
            xs.grad = None
            for p in params:  # as optimizer.zero_grad(set_to_none=True): not a walk over the module tree
                p.grad = None
            nn.functional.mse_loss(m(xs), target).backward()
            return None
        return run

    for m in models.values():
        m.train()
    if compiled:
        models = {k: torch.compile(m, fullgraph=True) for k, m in models.items()}
        for name, m in list(models.items()):
            try:
                for _ in range(3):  # compiles the forward and the backward
                    step(m)()
            except Exception as e:  # PEFT's LoKr breaks the graph: reported, left out
                print(f"{name}: not compiled ({type(e).__name__})")
                del models[name]
    times: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    for rep in range(args.repeats):
        for name in names[rep % len(names):] + names[:rep % len(names)]:
            times[name].append(_time(step(models[name]), args.inner))
    med = {k: statistics.median(v) for k, v in times.items()}
    bare = med["bare (frozen)"]
    how = "compiled (inductor, fullgraph), " if compiled else ""
    print(f"training step, {how}frozen base, x requires grad, MSE, {n} x Linear(64, 64), median of {args.repeats}")
    for name, t in med.items():
        print(f"{name:18s} {t * 1e6 / n:8.1f} µs/layer {t / bare:7.2f}")
    return med


def _compiled(args: argparse.Namespace, x: torch.Tensor) -> dict[str, float]:
    """Compiled inference, bare against LoKr with frozen adapters; medians per layer and call."""
    n = args.compile_layers
    torch.manual_seed(0)
    base = nn.Sequential(*[nn.Linear(64, 64) for _ in range(n)])
    cfg = LoKrConfig(r=8, alpha=8, target_modules=[str(i) for i in range(n)], init_weights=False)
    ours = LoKrModel(copy.deepcopy(base), cfg, "a")
    for name, p in ours.named_parameters():
        p.requires_grad_("lokr_" not in name)  # frozen adapters, as loaded for inference
    models = {"compiled bare": torch.compile(base.eval(), fullgraph=True),
              "compiled ours (frozen, kept in the graph)": torch.compile(ours.eval(), fullgraph=True)}
    times: dict[str, list[float]] = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            for _ in range(3):  # compile, then the build graph, then the reuse graph
                m(x)
        for _ in range(args.repeats):
            for name, m in models.items():
                times[name].append(_time(lambda m=m: m(x), args.inner))
    med = {k: statistics.median(v) for k, v in times.items()}
    bare = med["compiled bare"]
    print(f"torch.compile (inductor), {n} x Linear(64, 64), inference, median of {args.repeats}")
    for name, t in med.items():
        print(f"{name:42s} {t * 1e6 / n:8.1f} µs/layer {t / bare:7.2f}")
    return med


if __name__ == "__main__":
    main()
