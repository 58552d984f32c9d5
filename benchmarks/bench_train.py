"""One training step of every flow family, LoKr against the bare frozen model, at each base precision.

The step is the training scripts' own (lokr_diffusers.training.flow.flow_loss: the family's latents, its prompt
encoding, its transformer's call) on a tiny pipeline (tests/helpers, the families' `tiny` builders) with the
prompts encoded once, as a run whose text encoders do not train keeps them. The bare step is the same forward with
the gradient taken back to the noisy latents through every layer (what a LoKr step must at least do to reach the
first adapter); the LoKr step adds the factors' gradients. Per family and --base_precision (the frozen transformer
quantized as the scripts do: training/base_precision.py): medians of --repeats interleaved runs, LoKr / bare, and
PEFT's LoKr on the same modules where PEFT can hold it (`none` only: PEFT does not wrap a quantized Linear the same
way), and LyCORIS' LokrModule on each of the same Linears (`none` only). On CUDA the peak memory of each step is
given too. --compile adds the same rows with the transformer compiled as diffusers users compile it for training
(`compile_repeated_blocks(fullgraph=True)`: each repeated block one graph), each against the compiled bare model.

    python benchmarks/bench_train.py [--families flux wan ...] [--precisions none fp8 int8 nf4] [--repeats 9]
        [--device cpu|cuda] [--compile] [--json out.json]
    python benchmarks/bench_train.py --full flux1-dev --device cuda [--tokens 1024] [--full-blocks N]

--full: the transformer alone at full size from its published config (lokr_diffusers.architectures) with random
weights, bf16 and frozen, a training step under bf16 autocast on random inputs of the family's shapes (`--tokens`
image tokens: 1024 is 512 px; 512 text tokens), the gradient taken back to the latents: bare, ours, PEFT's and
LyCORIS' LoKr on the same modules, one model at a time (a 12B model does not fit twice), each step's median and
peak memory. `--full-blocks N` keeps N blocks of each kind: a dry run of the same code on a small machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))

from lokr_diffusers import LoKrConfig, add_lokr, families
from lokr_diffusers.training.base_precision import BASE_PRECISIONS, quantize_base
from lokr_diffusers.training.flow import flow_loss
from lokr_diffusers.training.flow_models import FLOW_MODELS

IMAGE = 32  # pixels a side; clips: 5 frames of 16 px (9 of 32 for the LTX families)
CLIPS = {"wan": (5, 16), "hunyuanvideo": (5, 16), "hunyuanvideo15": (5, 16), "ltxvideo": (9, 32), "ltx2": (9, 32)}
LENGTH = {"lumina2": 256, "qwenimage21": 64, "ltx2": 16}


def _args(family: str) -> argparse.Namespace:
    return argparse.Namespace(weighting_scheme="none", logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                              max_sequence_length=LENGTH.get(family, 16), guidance_scale=None, precondition_outputs=1,
                              text_encoder_out_layers=(9, 18, 27), frame_rate=24.0)


def _batch(family: str, device: torch.device) -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    frames, size = CLIPS.get(family, (None, IMAGE))
    shape = (2, 3, frames, size, size) if frames else (2, 3, size, size)
    return {"pixel_values": (torch.rand(shape, generator=g) * 2 - 1).to(device), "caption": ["a photo of sks dog"] * 2}


class _InputGrad:
    """Takes the gradient back to the transformer's input: its first positional / hidden_states input times a
    scalar that requires grad (the bare step's backward through every layer)."""

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.scale = torch.ones((), requires_grad=True)
        transformer.register_forward_pre_hook(self._hook, with_kwargs=True)

    def _hook(self, _module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = _scaled(kwargs["hidden_states"], self.scale)
        elif args:
            args = (_scaled(args[0], self.scale), *args[1:])
        return args, kwargs


def _scaled(x: Any, s: torch.Tensor) -> Any:
    if isinstance(x, list):  # Z-Image: a list of latents
        return [t * s.to(t) for t in x]
    return x * s.to(x)


def _step(pipe: Any, family: str, scheduler: Any, batch: dict[str, Any], prompts: dict, device: torch.device,
          params: list[torch.Tensor]) -> Callable[[], None]:
    args = _args(family)

    def run() -> None:
        loss = flow_loss(pipe, scheduler, batch, args, family, torch.Generator().manual_seed(0), torch.float32,
                         device, prompts=prompts)
        loss.backward()
        for p in params:
            p.grad = None

    return run


def _time(fn: Callable[[], None], device: torch.device) -> tuple[float, int]:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    return time.perf_counter() - t0, peak


def _lycoris(transformer: torch.nn.Module, targets: list[str]) -> list[torch.Tensor]:
    """LyCORIS' LokrModule (r 8, alpha 8, its default factorization) over every Linear `targets` name, kept in a
    ModuleList on the transformer; the factors' parameters."""
    from lycoris.modules.lokr import LokrModule

    wrapped = []
    for name, module in list(transformer.named_modules()):
        if type(module) is torch.nn.Linear and any(name == t or name.endswith("." + t) for t in targets):
            lyc = LokrModule(name.replace(".", "_"), module, 1.0, 8, 8)
            lyc.apply_to()
            with torch.no_grad():  # w2 starts at zero: any values cost the same, as ours (init_weights=False)
                for p in lyc.parameters():
                    p.normal_(0, 0.02)
            wrapped.append(lyc)
    transformer._bench_lycoris = torch.nn.ModuleList(wrapped)  # registers the factors
    return [p for m in wrapped for p in m.parameters() if p.requires_grad]


def _setup(family: str, precision: str, kind: str, device: torch.device) -> tuple[Any, list[torch.Tensor]]:
    """The tiny pipeline with its transformer at `precision` and (kind) no adapter, ours, PEFT's or LyCORIS'."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe = families.build_tiny(family).to(device)
    pipe.set_progress_bar_config(disable=True)
    quantize_base(pipe.transformer, precision, torch.float32, device)
    pipe.transformer.requires_grad_(False).train()
    params: list[torch.Tensor] = []
    if kind == "ours":
        add_lokr(pipe, {"transformer": LoKrConfig(r=8, alpha=8, init_weights=False)})
        params = [p for n, p in pipe.transformer.named_parameters() if "lokr_" in n]
        for p in params:
            p.data = p.data.float()
    elif kind == "peft":
        from peft import LoKrConfig as PeftLoKrConfig
        from peft import inject_adapter_in_model

        from lokr_diffusers.targeting import default_target_modules

        targets = default_target_modules(pipe.transformer)
        inject_adapter_in_model(PeftLoKrConfig(r=8, alpha=8, target_modules=targets, init_weights=False),
                                pipe.transformer)
        params = [p for n, p in pipe.transformer.named_parameters() if "lokr_" in n]
    elif kind == "lycoris":
        from lokr_diffusers.targeting import default_target_modules

        params = _lycoris(pipe.transformer, list(default_target_modules(pipe.transformer)))
        pipe.transformer.to(device)
    grad = _InputGrad(pipe.transformer)
    params.append(grad.scale)
    pipe._bench_scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe, params


FULL = {"flux1-dev": "FluxTransformer2DModel"}  # the families with a full-size step here


def _full_inputs(config: dict[str, Any], tokens: int, device: torch.device) -> dict[str, Any]:
    """FLUX.1's transformer inputs, batch 1: packed latents (1, tokens, in_channels) requiring grad, T5 states
    (1, 512, joint_attention_dim), CLIP pooled, ids, timestep, guidance."""
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    return dict(hidden_states=r(1, tokens, config["in_channels"]).requires_grad_(True),
                encoder_hidden_states=r(1, 512, config["joint_attention_dim"]),
                pooled_projections=r(1, config["pooled_projection_dim"]), timestep=torch.tensor([0.5], device=device),
                img_ids=torch.zeros(tokens, 3, device=device), txt_ids=torch.zeros(512, 3, device=device),
                guidance=torch.tensor([3.5], device=device))


def _full_model(name: str, kind: str, blocks: int | None, device: torch.device) -> tuple[torch.nn.Module, list]:
    """The full-size transformer `name` with random weights (bf16, frozen) and (kind) no adapter, ours, PEFT's or
    LyCORIS' (r 8, alpha 8, init_weights=False, the factors fp32) on the default targets; its trainable tensors."""
    import diffusers

    from lokr_diffusers import LoKrModel
    from lokr_diffusers.architectures import DIT_VARIANTS
    from lokr_diffusers.targeting import default_target_modules

    config = dict(DIT_VARIANTS[name].config)
    if blocks is not None:
        config.update(num_layers=blocks, num_single_layers=blocks)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # built in bf16 on the device: a 12B model never exists in fp32
    try:
        with torch.device(device):
            model: torch.nn.Module = getattr(diffusers, FULL[name])(**config)
    finally:
        torch.set_default_dtype(previous)
    model.requires_grad_(False).train()
    targets = list(default_target_modules(model))
    if kind == "ours":
        model = LoKrModel(model, LoKrConfig(r=8, alpha=8, target_modules=targets, init_weights=False), "default")
    elif kind == "peft":
        from peft import LoKrConfig as PeftLoKrConfig
        from peft import inject_adapter_in_model

        inject_adapter_in_model(PeftLoKrConfig(r=8, alpha=8, target_modules=targets, init_weights=False), model)
    elif kind == "lycoris":
        _lycoris(model, targets)
        model.to(device)
    params = [p for n, p in model.named_parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()  # the factors train in fp32 beside the bf16 base, as the scripts do
    return model, params


def _full_rows(args: argparse.Namespace, device: torch.device) -> list[dict[str, Any]]:
    """The --full table: each kind built, warmed up, timed, freed in turn; ratios to the bare step."""
    from lokr_diffusers.architectures import DIT_VARIANTS

    inputs = _full_inputs(DIT_VARIANTS[args.full].config, args.tokens, device)
    med: dict[str, float] = {}
    peaks: dict[str, int] = {}
    adapted: dict[str, int] = {}
    for kind in ("bare", "ours", "peft", "lycoris"):
        try:
            model, params = _full_model(args.full, kind, args.full_blocks, device)
            adapted[kind] = sum(1 for m in model.modules() if hasattr(m, "lokr_w1"))  # the same modules each
        except Exception as e:  # PEFT or LyCORIS missing or refusing: reported, not fatal
            print(f"| {args.full} | {kind}: {type(e).__name__}: {str(e).splitlines()[0][:60]} |")
            continue

        def step(model: torch.nn.Module = model, params: list = params) -> None:
            with torch.autocast(device.type, dtype=torch.bfloat16):
                out = model(**inputs).sample
            out.float().square().mean().backward()
            for p in [*params, inputs["hidden_states"]]:
                p.grad = None

        step()  # warm up
        runs = [_time(step, device) for _ in range(args.repeats)]
        med[kind] = statistics.median(t for t, _ in runs)
        peaks[kind] = max(p for _, p in runs)
        del model, params, step
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "bare" not in med:
        return []
    cells = [f"{med[k] / med['bare']:.2f}" if k in med else "-" for k in ("ours", "peft", "lycoris")]
    mem = " / ".join(f"{peaks[k] / 2**30:.1f}" if k in peaks else "-" for k in ("bare", "ours", "peft", "lycoris"))
    blocks = "" if args.full_blocks is None else f" ({args.full_blocks} + {args.full_blocks} blocks)"
    print(f"full-size {args.full}{blocks}, {args.tokens} image tokens, {device}, median of {args.repeats}")
    print("| model | bare ms | LoKr / bare | PEFT / bare | LyCORIS / bare | peak GiB bare / LoKr / PEFT / LyCORIS |")
    print("|---|---|---|---|---|---|")
    print(f"| {args.full} | {med['bare'] * 1e3:.1f} | {' | '.join(cells)} | "
          f"{mem if device.type == 'cuda' else '-'} |", flush=True)
    return [{"family": args.full, "full_size": True, "bare_s": med["bare"],
             **{f"{k}_ratio": med[k] / med["bare"] for k in med if k != "bare"}, "peak_bytes": peaks,
             "adapted_modules": adapted}]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    flow = [f for f in FLOW_MODELS if families.get(f).tiny]
    ap.add_argument("--families", nargs="+", default=flow, choices=flow)
    ap.add_argument("--precisions", nargs="+", default=list(BASE_PRECISIONS), choices=BASE_PRECISIONS)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compile", action="store_true", help="also each row with compile_repeated_blocks(fullgraph=True)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--full", choices=list(FULL), default=None, help="the full-size step instead (module docstring)")
    ap.add_argument("--full-blocks", type=int, default=None, help="keep N blocks of each kind (a dry run)")
    ap.add_argument("--tokens", type=int, default=1024, help="image tokens of the full-size step")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows: list[dict[str, Any]] = []
    if args.full:
        rows = _full_rows(args, device)
        if args.json:
            with open(args.json, "w", encoding="utf-8") as fh:
                json.dump(rows, fh, indent=1)
        return
    print(f"one training step of each tiny pipeline ({device}), median of {args.repeats} interleaved runs")
    print("| family | base | compiled | bare ms | LoKr / bare | PEFT / bare | LyCORIS / bare | peak MB bare / LoKr / "
          "PEFT / LyCORIS |")
    print("|---|---|---|---|---|---|---|---|")
    for family in args.families:
        for precision in args.precisions:
            for compiled in [False, True] if args.compile else [False]:
                row = _row(family, precision, compiled, device, args.repeats)
                if row is not None:
                    rows.append(row)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(rows, fh, indent=1)


def _row(family: str, precision: str, compiled: bool, device: torch.device, repeats: int) -> dict[str, Any] | None:
    """One table row: each kind's step built, warmed up (compiled there), then timed interleaved."""
    kinds = ["bare", "ours"] + (["peft", "lycoris"] if precision == "none" else [])
    runs, adapted = {}, {}
    for kind in kinds:
        try:
            pipe, params = _setup(family, precision, kind, device)
            adapted[kind] = sum(1 for m in pipe.transformer.modules() if hasattr(m, "lokr_w1"))  # the same modules
            if compiled:
                pipe.transformer.compile_repeated_blocks(fullgraph=True)
            runs[kind] = _step(pipe, family, pipe._bench_scheduler, _batch(family, device), {}, device, params)
            runs[kind]()  # warm up (compiles); encodes the prompts once
        except Exception as e:  # a quantizer, PEFT or LyCORIS that cannot hold this model: reported, not fatal
            runs.pop(kind, None)
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:50]}"
            print(f"| {family} | {precision} | {'yes' if compiled else 'no'} | {kind}: {why} |")
    times: dict[str, list[float]] = {k: [] for k in runs}
    peaks: dict[str, int] = dict.fromkeys(runs, 0)
    for rep in range(repeats):
        order = list(runs)[rep % len(runs):] + list(runs)[:rep % len(runs)]
        for kind in order:
            t, peak = _time(runs[kind], device)
            times[kind].append(t)
            peaks[kind] = max(peaks[kind], peak)
    med = {k: statistics.median(v) for k, v in times.items()}
    if "bare" not in med or "ours" not in med:
        return None
    ratio = {k: med[k] / med["bare"] for k in med}
    row = {"family": family, "precision": precision, "compiled": compiled, "bare_s": med["bare"],
           "ours_ratio": ratio["ours"], "peft_ratio": ratio.get("peft"), "lycoris_ratio": ratio.get("lycoris"),
           "peak_bytes": peaks, "adapted_modules": adapted}
    cells = [f"{ratio[k]:.2f}" if k in ratio else "-" for k in ("ours", "peft", "lycoris")]
    peak = " / ".join(f"{peaks[k] / 2**20:.0f}" if k in peaks else "-" for k in ("bare", "ours", "peft", "lycoris")) \
        if device.type == "cuda" else "-"
    print(f"| {family} | {precision} | {'yes' if compiled else 'no'} | {med['bare'] * 1e3:.1f} | {' | '.join(cells)} | "
          f"{peak} |", flush=True)
    return row


if __name__ == "__main__":
    main()
