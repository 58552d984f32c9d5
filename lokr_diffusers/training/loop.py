"""The LoKr fine-tuning loop on accelerate (the scripts in examples/ call it): SD1.x/2.x and SDXL here,
the flow-matching families (FLUX.1, SD3.x, FLUX.2 [klein], Z-Image) through flow.py.

Determinism, for exact resume: the order of examples in epoch e is a permutation drawn from
(seed, e); the noise, timesteps and VAE sample of a micro-batch come from a generator seeded with
(seed, optimizer step, the micro-batch's place in the step). Each process takes its own slice of every
global batch. So a run resumed from a checkpoint (adapter + optimizer + scheduler + step) continues exactly,
and N processes with A accumulation steps train what one process with N · A accumulation steps trains: the
same micro-batches, the same draws (micro-batch k of process r is the step's micro-batch k · N + r), the
gradients averaged over the same set (tests/test_training_sharded.py).
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LoKrConfig
from ..model import lokr_layers
from .targets import denoiser_targets

logger = logging.getLogger(__name__)
ADAPTER = "default"


@dataclass
class TrainResult:
    output_dir: str
    global_step: int
    losses: list[float] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)


def lokr_configs(args: Any, components: list[str]) -> dict[str, LoKrConfig]:
    """Separate configs for the denoiser (the first component) and the text encoders (the rest),
    from the command line."""
    init = {"true": True, "false": False, "lycoris": "lycoris"}[str(args.init_weights).lower()]
    common = dict(rank_dropout=args.rank_dropout, module_dropout=args.module_dropout, init_weights=init,
                  decompose_factor=args.decompose_factor, decompose_both=args.decompose_both)
    denoiser, *encoders = components
    configs = {denoiser: LoKrConfig(r=args.rank, alpha=args.alpha or args.rank, target_modules=denoiser_targets(
        args), use_effective_conv2d=args.use_effective_conv2d, **common)}
    te_rank = args.te_rank or args.rank
    for c in encoders:
        configs[c] = LoKrConfig(r=te_rank, alpha=args.te_alpha or te_rank,
                                target_modules=[t for t in args.te_target_modules.split(",") if t], **common)
    return configs


def encode_prompts(pipe: Any, captions: list[str], sdxl: bool, device: torch.device) -> tuple[Tensor, Tensor | None]:
    """(prompt embeddings (B, 77, D), SDXL pooled embeddings (B, D2) or None), as the pipelines do."""
    if not sdxl:
        ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        return pipe.text_encoder(ids)[0], None
    embeds, pooled = [], None
    for tok, te in ((pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)):
        ids = tok(captions, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(device)
        out = te(ids, output_hidden_states=True)
        pooled = out[0]  # the last encoder's projected pooled output
        embeds.append(out.hidden_states[-2])
    return torch.cat(embeds, dim=-1), pooled


def _time_ids(batch: dict[str, Any], resolution: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    rows = [list(o) + list(c) + [resolution, resolution] for o, c in zip(batch["original_size"],
                                                                          batch["crop_top_left"], strict=True)]
    return torch.tensor(rows, device=device, dtype=dtype)


def diffusion_loss(pipe: Any, noise_scheduler: Any, batch: dict[str, Any], args: Any, sdxl: bool,
                   g: torch.Generator, weight_dtype: torch.dtype, device: torch.device,
                   prior_weight: float | None = None, prompts: Any = None) -> Tensor:
    """One micro-batch's denoising loss (MSE, Min-SNR weighted when --snr_gamma). With prior_weight
    (DreamBooth prior preservation) the batch's second half is class images: loss + w · class loss. `prompts`:
    the encoded caption batches of --cache_text_embeddings (caches.PromptCache), by the batch's captions."""
    pixels = batch["pixel_values"].to(device=device, dtype=weight_dtype)
    latents = pipe.vae.encode(pixels).latent_dist.sample(generator=g) * pipe.vae.config.scaling_factor
    noise = torch.randn(latents.shape, generator=g, dtype=latents.dtype).to(device)
    if args.noise_offset:
        noise = noise + args.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=g).to(device)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g).to(device)
    noisy = noise_scheduler.add_noise(latents, noise, t)
    if prompts is not None:
        embeds, pooled = prompts.get(tuple(batch["caption"]))
    else:
        embeds, pooled = encode_prompts(pipe, batch["caption"], sdxl, device)
    extra = {}
    if sdxl:
        extra["added_cond_kwargs"] = {"text_embeds": pooled,
                                      "time_ids": _time_ids(batch, args.resolution, device, embeds.dtype)}
    pred = pipe.unet(noisy, t, embeds, **extra).sample
    kind = noise_scheduler.config.prediction_type
    target = noise if kind == "epsilon" else noise_scheduler.get_velocity(latents, noise, t)
    per_example = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if args.snr_gamma is not None:
        from diffusers.training_utils import compute_snr

        snr = compute_snr(noise_scheduler, t)
        per_example = per_example * torch.clamp(snr, max=args.snr_gamma) / (snr if kind == "epsilon" else snr + 1)
    if prior_weight is None:
        return per_example.mean()
    instance, prior = per_example.chunk(2)
    return instance.mean() + prior_weight * prior.mean()


def trainable_parameters(pipe: Any, names: list[str]) -> list[nn.Parameter]:
    out: list[nn.Parameter] = []
    for c in names:
        for _, layer in lokr_layers(getattr(pipe, c)):
            out += [p for p in layer.factors(ADAPTER).values() if isinstance(p, nn.Parameter)]
    return out


def step_generator(seed: int, step: int, micro: int, process: int = 0, processes: int = 1) -> torch.Generator:
    """The random stream of micro-step `micro` of process `process` of `processes`: a function of where it is in
    the optimizer step's global batch (micro-batch micro · processes + process), not of history nor of how the
    step is split over processes."""
    place = micro * processes + process
    return torch.Generator().manual_seed(((seed * 1_000_003 + step) * 1_009 + place) * 101)


def batches_for_epoch(n: int, epoch: int, seed: int, batch: int, processes: int, process: int) -> list[list[int]]:
    """This process's micro-batches of epoch `epoch`: a seeded permutation cut into global batches."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch)).tolist()
    per_global = batch * processes
    out = []
    for start in range(0, n - per_global + 1 if n >= per_global else 1, per_global):
        chunk = order[start:start + per_global] or order
        out.append(chunk[process * batch:(process + 1) * batch] or chunk[:batch])
    return out


def loss_log_path(output_dir: str) -> str:
    return os.path.join(output_dir, "loss.jsonl")


def steps_per_epoch(n: int, args: Any, processes: int) -> int:
    micro = max(1, n // (args.train_batch_size * processes))
    return max(1, micro // args.gradient_accumulation_steps)


def total_steps(n: int, args: Any, processes: int) -> int:
    return args.max_train_steps or args.num_train_epochs * steps_per_epoch(n, args, processes)


def write_log(path: str, record: dict[str, Any]) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")


def trim_log(path: str, step: int) -> None:
    """Keep the loss log's records up to `step` (where a resumed run starts again), dropping the steps
    an interrupted run logged after its last checkpoint and a line a crash cut short; atomic."""
    if not os.path.isfile(path):
        return
    kept = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(kept)
    os.replace(tmp, path)


def epochs_needed(steps: int, per_epoch: int) -> int:
    return math.ceil(steps / per_epoch)

