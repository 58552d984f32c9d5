"""Whole-UNet LoKr cost as a ratio to the bare UNet (issue 10's table): full-size SD1.5 and SDXL UNets
built from their published configs with random weights (no download), on the chosen device.

Rows: inference (no grad, eval mode, as in a denoising loop) and a training step (forward under bf16
autocast + backward, base in bf16 and frozen, factors in fp32, the latent requiring grad in every
column so each does the bare backward's work) for SD1.5 attn+ff, SD1.5 + the resnet blocks' layers
with Tucker convs, and SDXL attn+ff; then torch.compile of the bare UNet against the adapted, unfused
one (inference). Columns: bare (absolute median), lokr_diffusers (forward_mode auto / merged / bypass,
fused, auto with reuse off), PEFT's LoKr and LyCORIS' LycorisNetwork (algo lokr), all with r=8,
alpha=8, factor -1, as ratios of medians to bare. Every implementation runs interleaved in one
process (round-robin repeats after warm-up calls), so a noisy machine moves them together.
Peak memory of each training step: torch.cuda.max_memory_allocated on CUDA; None on CPU.

    python benchmarks/bench_unet.py [--device cuda|cpu] [--tiny] [--only TEXT] [--repeats 15]
        [--warmup 2] [--json out.json] [--no-compile] [--no-peft] [--no-lycoris]

`--tiny`: UNets of the same block structure (the same module counts) at widths 32-64 and a 16x16
latent, 3 repeats: a quick CPU check that every row and column runs, not a speed claim.
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import json
import logging
import math
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

R, ALPHA, FACTOR = 8, 8.0, -1
BATCH, TEXT_TOKENS = 2, 77

# Published UNet2DConditionModel configs. SD1.5's blocks, widths and layer counts are diffusers'
# defaults; SDXL base 1.0's differ. `latent` is the side of the latent the row runs at.
ARCHS: dict[str, dict[str, Any]] = {
    "sd15": dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8),
    "sdxl": dict(sample_size=128, block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
                 attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, use_linear_projection=True),
}
# The same block types and layers per block, narrow (SD1.5: the same 192 / 272 modules). SDXL's
# transformer depths 1 / 2 / 10 are cut to 1 / 1 / 2 (192 modules, not 722), which keeps the tiny run
# quick; tracing 722 adapted layers for the compiled row alone takes minutes on a small CPU.
TINY: dict[str, dict[str, Any]] = {
    "sd15": dict(sample_size=16, block_out_channels=(32, 64, 128, 128), cross_attention_dim=32, attention_head_dim=4),
    "sdxl": dict(ARCHS["sdxl"], sample_size=16, block_out_channels=(32, 64, 128), cross_attention_dim=64,
                 attention_head_dim=(2, 4, 4), transformer_layers_per_block=(1, 1, 2), addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 32),
}
ARCH_NAMES = {"sd15": "SD1.5", "sdxl": "SDXL"}
ATTN_FF = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")

# Column ids (JSON keys) in table order.
COLUMNS = ("bare", "ours_auto", "ours_merged", "ours_bypass", "ours_fused", "ours_no_reuse", "peft", "lycoris")
OURS_MODES = {"ours_auto": "auto", "ours_merged": "merged", "ours_bypass": "bypass", "ours_no_reuse": "auto"}


@dataclass(frozen=True)
class Row:
    name: str
    arch: str  # "sd15" | "sdxl"
    training: bool = False
    convs: bool = False  # + the resnet blocks' conv1 / conv2 / conv_shortcut / time_emb_proj, Tucker convs
    compiled: bool = False

    def columns(self) -> tuple[str, ...]:
        """The columns that mean something on this row (a fused adapter cannot train; reuse is an
        inference mechanism; compiled rows compare the bare UNet with the unfused adapted one)."""
        if self.compiled:
            return ("bare", "ours_auto")
        if self.training:
            return tuple(c for c in COLUMNS if c not in ("ours_fused", "ours_no_reuse"))
        return COLUMNS


ROWS: tuple[Row, ...] = (
    Row("SD1.5 inference, attn+ff", "sd15"),
    Row("SD1.5 inference, + resnet convs Tucker", "sd15", convs=True),
    Row("SDXL inference, attn+ff", "sdxl"),
    Row("SD1.5 training step, attn+ff", "sd15", training=True),
    Row("SD1.5 training step, + resnet convs Tucker", "sd15", training=True, convs=True),
    Row("SDXL training step, attn+ff", "sdxl", training=True),
    Row("SD1.5 inference compiled, attn+ff", "sd15", compiled=True),
    Row("SDXL inference compiled, attn+ff", "sdxl", compiled=True),
)


@dataclass
class Result:
    row: Row
    modules: int
    median_s: dict[str, float | None]
    peak_bytes: dict[str, int | None] | None = None
    compile_s: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    build_s: float = 0.0

    def ratio(self, col: str) -> float | None:
        t, bare = self.median_s.get(col), self.median_s.get("bare")
        return None if t is None or not bare else t / bare

    def label(self) -> str:
        return f"{self.row.name} ({self.modules} modules)"


def version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def column_labels() -> dict[str, str]:
    peft, lyco = version("peft"), version("lycoris-lora")
    return {"bare": "bare", "ours_auto": "ours auto", "ours_merged": "ours merged", "ours_bypass": "ours bypass",
            "ours_fused": "ours fused", "ours_no_reuse": "ours auto, reuse off",
            "peft": f"PEFT {peft}" if peft else "PEFT", "lycoris": f"LyCORIS {lyco}" if lyco else "LyCORIS"}


# ----------------------------------------------------------------------------------------- models
def unet_config(arch: str, tiny: bool) -> dict[str, Any]:
    return dict((TINY if tiny else ARCHS)[arch])


def build_unet(config: dict[str, Any], device: torch.device, dtype: torch.dtype, seed: int = 0) -> nn.Module:
    """A UNet with random weights, made on the meta device and filled on `device` in `dtype`:
    no fp32 CPU copy, so a full-size SDXL takes seconds, not a minute of CPU init. Weights uniform
    in ±1/sqrt(fan_in) (torch's default scale, which keeps fp16 activations finite), biases 0, norms 1."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet: nn.Module = UNet2DConditionModel(**config)
    unet = nn.Module.to(unet, dtype=dtype).to_empty(device=device)  # nn.Module's .to: no diffusers dtype warning
    g = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if p.dim() > 1:
                bound = 1.0 / math.sqrt(p[0].numel())
                p.uniform_(-bound, bound, generator=g)
            else:
                p.fill_(0.0 if name.endswith("bias") else 1.0)
    return unet.eval().requires_grad_(False)


def target_names(unet: nn.Module, convs: bool) -> list[str]:
    """attn+ff: attention q/k/v/out, feed-forward and proj_in/proj_out (the package's UNet default);
    with convs, every Linear / Conv2d child of a ResnetBlock2D too (SD1.5: 192 + 80 = 272)."""
    from diffusers.models.resnet import ResnetBlock2D

    names = [n for n, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
             and any(n == t or n.endswith("." + t) for t in ATTN_FF)]
    if convs:
        names += [f"{n}.{c}" for n, m in unet.named_modules() if isinstance(m, ResnetBlock2D)
                  for c, sub in m.named_children() if isinstance(sub, (nn.Linear, nn.Conv2d))]
    return names


def count_modules(arch: str, convs: bool, tiny: bool = False) -> int:
    """Adapted modules of a row, counted on the meta device (no memory)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return len(target_names(UNet2DConditionModel(**unet_config(arch, tiny)), convs))


def shared_copy(unet: nn.Module) -> nn.Module:
    """A structural copy holding the same parameter tensors: every unfused implementation adapts its
    own module tree over one set of base weights (one UNet's memory, not one per column)."""
    memo: dict[int, Any] = {id(p): p for p in unet.parameters()}
    return copy.deepcopy(unet, memo)


def _factors(model: nn.Module) -> list[nn.Parameter]:
    # ours, PEFT and LyCORIS all name their factors lokr_w1 / lokr_w2[_a|_b] / lokr_t2
    return [p for n, p in model.named_parameters() if "lokr_" in n]


def _prepare_factors(model: nn.Module, dtype: torch.dtype, g: torch.Generator, trainable: bool) -> None:
    """One init for every implementation (N(0, 0.05²): ΔW small but not zero, no denormals, finite
    in fp16) and one dtype: the inference dtype, or fp32 for training (the package's training rule)."""
    with torch.no_grad():
        for p in _factors(model):
            p.data = (torch.randn(p.shape, generator=g, device=p.device) * 0.05).to(dtype)
            p.requires_grad_(trainable)


@contextmanager
def _lycoris_preset(names: list[str]) -> Iterator[Any]:
    """LycorisNetwork with exactly these module names as targets, as one anchored regex: LyCORIS
    re.match-es every target against every module name, and 722 patterns overflow re's cache (a
    minute of regex compiling for SDXL). apply_preset mutates class state, so the old preset is put
    back afterwards."""
    from lycoris import LycorisNetwork

    keys = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP",
            "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
    saved = {k: getattr(LycorisNetwork, k) for k in keys}
    anchored = "(?:" + "|".join(map(re.escape, names)) + ")$"
    LycorisNetwork.apply_preset({"enable_conv": True, "target_module": [], "target_name": [anchored],
                                 "module_algo_map": {}, "name_algo_map": {}, "use_fnmatch": False,
                                 "exclude_name": []})
    try:
        yield LycorisNetwork
    finally:
        for k, v in saved.items():
            setattr(LycorisNetwork, k, v)


class LycorisUNet(nn.Module):
    """The UNet with a LycorisNetwork applied (its modules replace the targets' forward), holding the
    network so that its factors are this module's parameters."""

    def __init__(self, unet: nn.Module, network: nn.Module) -> None:
        super().__init__()
        self.unet = unet
        self.network = network

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.unet(*args, **kwargs)


def build_implementations(row: Row, bare: nn.Module, names: list[str], dtype: torch.dtype, args: argparse.Namespace,
                          notes: list[str]) -> dict[str, nn.Module]:
    """{implementation: model}. ours_auto / merged / bypass / no_reuse are one LoKrModel run in
    different modes; a missing or failing PEFT / LyCORIS becomes a note, not a crash."""
    from lokr_diffusers import LoKrConfig, LoKrModel

    device = next(bare.parameters()).device
    g = torch.Generator(device=device).manual_seed(1)
    factor_dtype = torch.float32 if row.training else dtype
    cfg = LoKrConfig(r=R, alpha=ALPHA, decompose_factor=FACTOR, target_modules=names, init_weights=False,
                     use_effective_conv2d=row.convs)
    ours = LoKrModel(shared_copy(bare), cfg, "default")
    _prepare_factors(ours, factor_dtype, g, row.training)
    models: dict[str, nn.Module] = {"bare": bare, "ours": ours}
    if row.compiled:
        return models
    if not row.training:
        fused = LoKrModel(copy.deepcopy(bare), cfg, "default")  # its own weights: fusing writes into them
        _prepare_factors(fused, factor_dtype, g, False)
        fused.merge_adapter()
        models["ours_fused"] = fused
    if args.no_peft:
        notes.append("PEFT: skipped (--no-peft)")
    else:
        try:
            from peft import LoKrConfig as PeftLoKrConfig
            from peft import inject_adapter_in_model

            pcfg = PeftLoKrConfig(r=R, alpha=ALPHA, decompose_factor=FACTOR, target_modules=names,
                                  init_weights=False, use_effective_conv2d=row.convs)
            peft_model = inject_adapter_in_model(pcfg, shared_copy(bare))  # as diffusers injects its adapters
            _prepare_factors(peft_model, factor_dtype, g, row.training)
            models["peft"] = peft_model
        except ImportError:
            notes.append("PEFT: not installed, column skipped")
        except Exception as err:  # another PEFT version's API: report, keep the other columns
            notes.append(f"PEFT: failed to build ({type(err).__name__}: {err}), column skipped")
    if args.no_lycoris:
        notes.append("LyCORIS: skipped (--no-lycoris)")
    else:
        try:
            unet = shared_copy(bare)
            with _lycoris_preset(names) as network_cls:
                # after lycoris' import, which sets its logger up; its "using full matrix mode" warnings
                # (factors wider than the rank, as ours and PEFT plan them too) are no news here
                logging.getLogger("LyCORIS").setLevel(logging.ERROR)
                network = network_cls(unet, multiplier=1.0, lora_dim=R, conv_lora_dim=R, alpha=ALPHA,
                                      conv_alpha=ALPHA, use_tucker=row.convs, network_module="lokr",
                                      factor=FACTOR, decompose_both=False)
            if len(network.loras) != len(names):
                notes.append(f"LyCORIS: adapted {len(network.loras)} modules, not {len(names)}")
            network.apply_to()
            network.to(device)
            lyco = LycorisUNet(unet, network)
            _prepare_factors(lyco, factor_dtype, g, row.training)
            models["lycoris"] = lyco
        except ImportError:
            notes.append("LyCORIS: not installed, column skipped")
        except Exception as err:
            notes.append(f"LyCORIS: failed to build ({type(err).__name__}: {err}), column skipped")
    return models


# ---------------------------------------------------------------------------------------- timing
def make_inputs(arch: str, config: dict[str, Any], device: torch.device, dtype: torch.dtype,
                training: bool) -> dict[str, Any]:
    g = torch.Generator(device=device).manual_seed(2)
    side = config["sample_size"]
    sample = torch.randn(BATCH, 4, side, side, generator=g, device=device).to(dtype)
    kwargs: dict[str, Any] = {
        "sample": sample.requires_grad_(training),
        "timestep": torch.tensor([999, 500][:BATCH], device=device),
        "encoder_hidden_states": torch.randn(BATCH, TEXT_TOKENS, config["cross_attention_dim"], generator=g,
                                             device=device).to(dtype),
    }
    if arch == "sdxl":
        text_dim = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
        side_px = side * 8
        kwargs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(BATCH, text_dim, generator=g, device=device).to(dtype),
            "time_ids": torch.tensor([[side_px, side_px, 0, 0, side_px, side_px]] * BATCH, device=device,
                                     dtype=dtype),
        }
    return kwargs


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _model_bytes(model: nn.Module) -> int:
    """Bytes of the model's own tensors (each storage once): the peak of a training step is this plus
    what the step allocates, as if the implementation were alone on the device."""
    seen: dict[int, int] = {}
    for t in list(model.parameters()) + list(model.buffers()):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def make_calls(row: Row, models: dict[str, nn.Module], ours: nn.Module, inputs: dict[str, Any], device: torch.device,
               finite: dict[str, bool]) -> tuple[dict[str, Callable[[], None]], dict[str, list[nn.Parameter]]]:
    """{column: one call}: an inference forward, or a training step; and each column's tensors whose
    grads must be cleared between steps. `ours` is the LoKrModel whose forward mode a column sets
    (not on compiled rows, where the mode is traced as it was); `finite` gets, at each column's first
    call, whether its output was finite (random weights must not overflow, or timings mean little)."""
    from lokr_diffusers import reuse

    def call(col: str, model: nn.Module) -> Callable[[], None]:
        mode = None if row.compiled else OURS_MODES.get(col)

        def run() -> None:
            if mode is not None:
                ours.set_forward_mode(mode)  # type: ignore[operator]
            budget = reuse.budget()
            if col == "ours_no_reuse":
                reuse.set_budget(0)
            try:
                if row.training:
                    with torch.autocast(device.type, dtype=torch.bfloat16):
                        out = model(**inputs).sample
                else:
                    with torch.no_grad():
                        out = model(**inputs).sample
            finally:
                reuse.set_budget(budget)
            if col not in finite:
                finite[col] = bool(torch.isfinite(out).all())
            if row.training:
                out.float().square().mean().backward()
        return run

    calls: dict[str, Callable[[], None]] = {}
    grads: dict[str, list[nn.Parameter]] = {}
    for col in row.columns():
        model = models["ours"] if col in OURS_MODES else models.get(col)
        if model is None:
            continue
        calls[col] = call(col, model)
        grads[col] = _factors(model)
    return calls, grads


def measure(row: Row, calls: dict[str, Callable[[], None]], grads: dict[str, list[nn.Parameter]],
            inputs: dict[str, Any], models: dict[str, nn.Module], device: torch.device, repeats: int,
            warmup: int) -> tuple[dict[str, float], dict[str, int] | None, dict[str, float]]:
    """Medians over round-robin repeats; peak bytes per training column on CUDA; first-call seconds
    (the compile time on compiled rows)."""
    cuda = device.type == "cuda"
    memory = cuda and row.training
    sample = inputs["sample"]

    def clear(col: str) -> None:
        sample.grad = None
        for p in grads[col]:
            p.grad = None

    first: dict[str, float] = {}
    for col, fn in calls.items():  # warm-up: the compile, the reuse cache, cuDNN's algorithm search
        for i in range(warmup):
            clear(col)
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if i == 0:
                first[col] = time.perf_counter() - t0
    times: dict[str, list[float]] = {col: [] for col in calls}
    step_peak: dict[str, int] = {col: 0 for col in calls}
    for _ in range(repeats):
        for col, fn in calls.items():
            clear(col)
            _sync(device)
            if memory:
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[col].append(time.perf_counter() - t0)
            if memory:
                step_peak[col] = max(step_peak[col], torch.cuda.max_memory_allocated(device) - before)
        # the grads of the last step are freed before the next column runs
    for col in calls:
        clear(col)
    medians = {col: statistics.median(v) for col, v in times.items()}
    peak = None
    if memory:
        owner = {col: models["ours"] if col in OURS_MODES else models[col] for col in calls}
        peak = {col: _model_bytes(owner[col]) + step_peak[col] for col in calls}
    return medians, peak, first


def _compile(model: nn.Module, backend: str, notes: list[str], col: str,
             run: Callable[[nn.Module], Any]) -> nn.Module:
    """torch.compile with fullgraph=True; a graph break is reported and the model compiled without it."""
    compiled = torch.compile(model, backend=backend, fullgraph=True)
    try:
        run(compiled)
        return compiled
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        notes.append(f"{col}: fullgraph=True failed ({type(err).__name__}: {first[:200]}); compiled with graph breaks")
        torch.compiler.reset()
        return torch.compile(model, backend=backend)


def run_row(row: Row, args: argparse.Namespace, device: torch.device) -> Result:
    config = unet_config(row.arch, args.tiny)
    dtype = torch.bfloat16 if row.training else (torch.float16 if device.type == "cuda" else torch.float32)
    notes: list[str] = []
    t0 = time.perf_counter()
    bare = build_unet(config, device, dtype)
    names = target_names(bare, row.convs)
    models = build_implementations(row, bare, names, dtype, args, notes)
    build_s = time.perf_counter() - t0
    for model in models.values():
        model.train(row.training)  # eval at inference: the denoising loop, where reuse applies
    inputs = make_inputs(row.arch, config, device, dtype, row.training)
    compile_s: dict[str, float] = {}
    ours = models["ours"]  # the LoKrModel itself, also when models["ours"] becomes its compiled wrapper
    if row.compiled:
        def once(m: nn.Module) -> Any:
            with torch.no_grad():
                return m(**inputs).sample
        for key in ("bare", "ours"):
            t0 = time.perf_counter()
            models[key] = _compile(models[key], args.compile_backend, notes, key, once)
            compile_s[key if key == "bare" else "ours_auto"] = time.perf_counter() - t0
    finite: dict[str, bool] = {}
    calls, grads = make_calls(row, models, ours, inputs, device, finite)
    medians, peak, first = measure(row, calls, grads, inputs, models, device, args.repeats, args.warmup)
    notes += [f"{col}: the output is not finite with these random weights" for col, ok in finite.items() if not ok]
    if row.compiled:
        first = {**first, **compile_s}
    median_s: dict[str, float | None] = {col: medians.get(col) for col in COLUMNS}
    peak_bytes: dict[str, int | None] | None = None
    if row.training:
        peak_bytes = {col: (peak or {}).get(col) for col in COLUMNS}
    result = Result(row, len(names), median_s, peak_bytes, first, notes, build_s)
    return result


# ---------------------------------------------------------------------------------------- output
def _cell(result: Result, col: str) -> str:
    if col == "bare":
        t = result.median_s["bare"]
        return f"{t * 1e3:.1f} ms" if t is not None else "—"
    r = result.ratio(col)
    if r is not None:
        return f"{r:.2f}"
    return "—" if col not in result.row.columns() else "n/a"


def markdown(results: list[Result]) -> str:
    labels = column_labels()
    lines = ["| ratio to the bare UNet | " + " | ".join(labels[c] for c in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    lines += [f"| {r.label()} | " + " | ".join(_cell(r, c) for c in COLUMNS) + " |" for r in results]
    training = [r for r in results if r.peak_bytes is not None]
    if training and any(v is not None for r in training for v in (r.peak_bytes or {}).values()):
        lines += ["", "| peak memory of a training step (GiB) | " + " | ".join(labels[c] for c in COLUMNS) + " |",
                  "|---" * (len(COLUMNS) + 1) + "|"]
        for r in training:
            cells = [f"{v / 2**30:.2f}" if v is not None else "—" for v in (r.peak_bytes or {}).values()]
            lines.append(f"| {r.label()} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def settings(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    latent = {a: unet_config(a, args.tiny)["sample_size"] for a in ARCHS}
    return {
        "tiny": args.tiny, "batch": BATCH, "r": R, "alpha": ALPHA, "factor": FACTOR, "text_tokens": TEXT_TOKENS,
        "latent": latent, "repeats": args.repeats, "warmup": args.warmup, "threads": torch.get_num_threads(),
        "inference_dtype": "float16" if cuda else "float32",
        "training": "forward under torch.autocast(bfloat16), base weights bfloat16 and frozen, factors float32, "
                    "loss = mean(out²), backward; the latent requires grad in every column; no optimizer step",
        "factors_init": "N(0, 0.05²) in every implementation",
        "compile": None if args.no_compile else {"backend": args.compile_backend, "fullgraph": True},
        "peak_memory": "torch.cuda.max_memory_allocated during the step minus memory allocated before it, plus "
                       "the implementation's own weights (shared base counted once)" if cuda else
                       "not measured on CPU (None)",
    }


def _cpu_name() -> str:
    try:  # Linux names the CPU model here; platform.processor() is often empty
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def to_json(results: list[Result], args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    return {
        "device": name, "device_type": device.type, "torch": torch.__version__, "python": sys.version.split()[0],
        "versions": {d: version(d) for d in ("lokr-diffusers", "diffusers", "peft", "lycoris-lora")},
        "settings": settings(args, device), "columns": column_labels(),
        "rows": [{"name": r.row.name, "label": r.label(), "arch": r.row.arch, "training": r.row.training,
                  "convs": r.row.convs, "compiled": r.row.compiled, "modules": r.modules,
                  "columns": list(r.row.columns()), "median_s": r.median_s,
                  "ratio": {c: r.ratio(c) for c in COLUMNS}, "peak_memory_bytes": r.peak_bytes,
                  "first_call_s": r.compile_s, "notes": r.notes} for r in results],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny UNets of the same block structure (CPU check)")
    parser.add_argument("--only", default="", help="run the rows whose name contains this (case-insensitive)")
    parser.add_argument("--repeats", type=int, default=None, help="timed calls per implementation (15; --tiny: 3)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed calls per implementation first (2; --tiny: 1)")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled rows")
    parser.add_argument("--compile-backend", default=None,
                        help="torch.compile backend of the compiled rows (inductor; --tiny on the CPU: eager, "
                             "which traces the graph as inductor would but skips its minutes of C++ compiling)")
    parser.add_argument("--no-peft", action="store_true")
    parser.add_argument("--no-lycoris", action="store_true")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's; 1 with --tiny on the CPU)")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 3 if args.tiny else 15
    if args.warmup is None:
        args.warmup = 1 if args.tiny else 2
    if args.compile_backend is None:
        args.compile_backend = "eager" if args.tiny and args.device == "cpu" else "inductor"
    if args.threads is None and args.tiny and args.device == "cpu":
        args.threads = 1  # tiny ops: one thread avoids OpenMP spin costs (10x on a busy 2-core machine)
    if args.threads:
        torch.set_num_threads(args.threads)
    from lokr_diffusers import logs

    logs.disable_progress_bar()  # adding / fusing bars on stderr between the rows' lines
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # what a denoising loop at fixed shapes gets
    rows = [r for r in ROWS if args.only.lower() in r.name.lower() and not (r.compiled and args.no_compile)]
    if not rows:
        parser.error(f"no row matches --only {args.only!r}: {[r.name for r in ROWS]}")
    results: list[Result] = []
    for row in rows:
        t0 = time.perf_counter()
        result = run_row(row, args, device)
        results.append(result)
        gc.collect()  # the row's models are gone with run_row's frame; free them before the next row's
        if row.compiled:
            torch.compiler.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"# {result.label()}: {time.perf_counter() - t0:.1f} s (building the models {result.build_s:.1f} s)",
              file=sys.stderr, flush=True)
    data = to_json(results, args, device)
    s = data["settings"]
    print(f"{data['device']} ({device.type}), torch {data['torch']}, batch {BATCH}, r={R} alpha={ALPHA:g} "
          f"factor {FACTOR}, inference {s['inference_dtype']}, training bf16 autocast with fp32 factors, "
          f"latent {s['latent']}, median of {args.repeats}{', TINY UNets (mechanism check)' if args.tiny else ''}")
    print(markdown(results))
    for r in results:
        for note in r.notes:
            print(f"note ({r.row.name}): {note}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=1)
    return data


if __name__ == "__main__":
    main()
