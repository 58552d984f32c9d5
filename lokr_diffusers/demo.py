"""The offline demo (`lokr-diffusers demo`): a UNet LoKr learns one training image on a tiny pipeline
built in code (random weights, no downloads), and the demo draws what it learned.

The tiny model's VAE and UNet are random, so decoded images are noise whatever the adapter does.
The demo therefore looks where learning is visible, in latent space: it samples a latent through the
pipeline's own scheduler loop (`output_type="latent"`, fixed seed, no guidance) at checkpoints of the
run and compares it with the training image's latent (its VAE encoding, the thing the model is
trained to produce). Two settings make a random UNet learn that within seconds on a CPU, and both are
stated in the outputs: the tiny model predicts the clean latent (`prediction_type="sample"`, where a
real SD model predicts the noise; a `--model` keeps its own), and its VAE scaling factor is set so the
training latent has unit standard deviation (what SD's 0.18215 does for SD's VAE).

Written to `out`: latents_over_training.png (base | LoKr at step k | target, one row per checkpoint),
loss_curve.png, delta_w_kron.png (ΔW = scale·kron(W1, W2) of one adapted Linear), the trained adapter
(ComfyUI file and ours), summary.json and summary.txt. The ComfyUI file is loaded back into a fresh
pipeline with `pipe.load_lokr_weights`, which must sample the same latent as the trained one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

PROMPT = "a photo of sks shape"
ADAPTER = "default"
TINY_EXTRA_TARGETS = ["conv_in", "conv_out"]  # besides the "full" preset: a random UNet learns much faster with them
FILES = {  # name -> what it shows (summary.json and summary.txt name every file written)
    "latents_over_training.png": "sampled latent (channels 0-2 as RGB) of the base pipeline | with the LoKr at "
                                 "each checkpoint | the training image's latent; one row per checkpoint",
    "loss_curve.png": "training loss per step (raw and smoothed)",
    "delta_w_kron.png": "dW = scale * kron(W1, W2) of one adapted Linear (blue < 0 < red), with W1 and W2",
    "training_image.png": "the one training image (pixels) the LoKr learns",
    "lokr_comfyui.safetensors": "the trained LoKr as a ComfyUI / A1111 file (reloaded by the demo)",
    "pytorch_lokr_weights.safetensors": "the trained LoKr in lokr_diffusers' own lossless layout",
    "summary.json": "these numbers and file descriptions, machine-readable",
    "summary.txt": "the same, as text",
}


@dataclass
class DemoSettings:
    """What the demo trains with; the defaults run in well under a minute on 2 CPU cores."""

    steps: int = 100
    resolution: int = 48
    seed: int = 0
    checkpoints: int = 5  # rows of latents_over_training.png (step 0 and the last step included)
    batch: int = 4  # noised copies of the training image per step
    learning_rate: float = 3e-2
    rank: int = 4
    inference_steps: int = 10
    model: str | None = None


# ------------------------------------------------------------------------------------------ data
def training_image(size: int) -> Any:
    """The demo's one training image: a red disc and a yellow bar on blue, slightly blurred (soft
    edges give a smoother latent); shapes big enough to stay visible in a latent 2-8 times smaller."""
    from PIL import Image, ImageDraw, ImageFilter

    image = Image.new("RGB", (size, size), (30, 60, 200))
    draw = ImageDraw.Draw(image)
    s = size / 32
    draw.ellipse([3 * s, 3 * s, 19 * s - 1, 19 * s - 1], fill=(225, 35, 35))
    draw.rectangle([6 * s, 24 * s, 29 * s - 1, 29 * s - 1], fill=(245, 215, 40))
    return image.filter(ImageFilter.GaussianBlur(s))


def _pixels(image: Any) -> Tensor:
    array = np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1)[None].contiguous()


# ------------------------------------------------------------------------------------- pipelines
def load_demo_pipeline(settings: DemoSettings, vae_scale: float | None) -> tuple[Any, str]:
    """The pipeline the demo trains (and, called again, the fresh one it reloads the file into).
    Tiny: the SD1.x-shaped random pipeline, x0-predicting, DDIM, VAE scale `vae_scale`."""
    if settings.model is None:
        from diffusers import DDIMScheduler

        from .tiny import make_sd_pipeline

        pipe: Any = make_sd_pipeline(settings.seed)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="sample")
        if vae_scale is not None:
            pipe.vae.register_to_config(scaling_factor=vae_scale)
        return pipe, "sample"
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(settings.model)
    if getattr(pipe, "unet", None) is None or getattr(pipe, "vae", None) is None:
        raise ValueError(f"--model {settings.model}: the demo needs a UNet pipeline with a VAE (SD1.x/2.x/SDXL), "
                         f"got {type(pipe).__name__}")
    pipe.set_progress_bar_config(disable=True)
    return pipe, pipe.scheduler.config.get("prediction_type", "epsilon")


def _is_sdxl(pipe: Any) -> bool:
    return getattr(pipe, "text_encoder_2", None) is not None


@torch.no_grad()
def _conditioning(pipe: Any, resolution: int) -> dict[str, Any]:
    """The UNet's text conditioning for PROMPT (and SDXL's added conditioning), batch 1."""
    if not _is_sdxl(pipe):
        embeds = pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, False)[0]
        return {"encoder_hidden_states": embeds}
    embeds, _, pooled, _ = pipe.encode_prompt(PROMPT, device=torch.device("cpu"), num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]], dtype=embeds.dtype)
    return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}


def _expand(cond: dict[str, Any], n: int) -> dict[str, Any]:
    def rep(v: Any) -> Any:
        return {k: rep(x) for k, x in v.items()} if isinstance(v, dict) else v.expand(n, *v.shape[1:])

    return {k: rep(v) for k, v in cond.items()}


def sample_latent(pipe: Any, settings: DemoSettings) -> Tensor:
    """The latent the pipeline samples for PROMPT: its scheduler loop from the seed's noise, no
    classifier-free guidance, not decoded (`output_type="latent"`). (C, H, W), float32."""
    was_training = pipe.unet.training
    pipe.unet.eval()
    try:
        out = pipe(PROMPT, height=settings.resolution, width=settings.resolution,
                   num_inference_steps=settings.inference_steps, guidance_scale=1.0, output_type="latent",
                   generator=torch.Generator().manual_seed(settings.seed))
    finally:
        pipe.unet.train(was_training)
    return out.images[0].float().cpu()


def rms(a: Tensor, b: Tensor) -> float:
    """Root-mean-square distance between two latents."""
    return float((a.float() - b.float()).pow(2).mean().sqrt())


# ------------------------------------------------------------------------------------- training
def _loss(pipe: Any, noise_scheduler: Any, target: Tensor, cond: dict[str, Any], kind: str, n: int,
          g: torch.Generator) -> Tensor:
    """The denoising loss on `n` noised copies of the training latent (random timesteps), with the
    regression target the model's prediction type asks for."""
    x0 = target.expand(n, *target.shape[1:])
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (n,), generator=g)
    pred = pipe.unet(noise_scheduler.add_noise(x0, noise, t), t, **_expand(cond, n)).sample
    if kind == "epsilon":
        goal = noise
    elif kind == "v_prediction":
        goal = noise_scheduler.get_velocity(x0, noise, t)
    elif kind == "sample":
        goal = x0
    else:
        raise ValueError(f"prediction_type {kind!r} is not one the demo trains (epsilon, v_prediction, sample)")
    return F.mse_loss(pred.float(), goal.float())


def checkpoint_steps(steps: int, rows: int) -> list[int]:
    """`rows` steps from 0 to `steps`, evenly spaced (fewer when there are fewer steps)."""
    rows = max(2, rows)
    return sorted({round(steps * k / (rows - 1)) for k in range(rows)})


def _train(pipe: Any, kind: str, target: Tensor, settings: DemoSettings, base_latent: Tensor
           ) -> tuple[list[float], list[dict[str, Any]]]:
    """Add the UNet LoKr and train it; (loss per step, [{step, latent, distance}] per checkpoint)."""
    from diffusers import DDPMScheduler
    from tqdm.auto import tqdm

    from .config import LoKrConfig
    from .pipeline import add_lokr
    from .training.args import UNET_PRESETS

    torch.manual_seed(settings.seed)  # the adapters' initialisation
    targets = UNET_PRESETS["full"] + (TINY_EXTRA_TARGETS if settings.model is None else [])
    add_lokr(pipe, {"unet": LoKrConfig(r=settings.rank, alpha=settings.rank, target_modules=targets)}, ADAPTER)
    params = [p for p in pipe.unet.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(  # cosine decay to a tenth: a calm end
        optimizer, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / max(settings.steps, 1), 1.0))))
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    cond = _conditioning(pipe, settings.resolution)
    g = torch.Generator().manual_seed(settings.seed + 1)
    marks = checkpoint_steps(settings.steps, settings.checkpoints)
    checkpoints = [{"step": 0, "latent": base_latent, "distance": rms(base_latent, target[0])}]
    losses: list[float] = []
    pipe.unet.train()
    for step in tqdm(range(1, settings.steps + 1), desc="training the demo LoKr", disable=None):
        loss = _loss(pipe, noise_scheduler, target, cond, kind, settings.batch, g)
        loss.backward()
        nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        if step in marks:
            latent = sample_latent(pipe, settings)
            checkpoints.append({"step": step, "latent": latent, "distance": rms(latent, target[0])})
            logger.info("step %d: loss %.4f, latent distance to target %.3f", step, losses[-1],
                        checkpoints[-1]["distance"])
    pipe.unet.eval()
    return losses, checkpoints


# ------------------------------------------------------------------------------------- pictures
def latents_png(path: str, checkpoints: list[dict[str, Any]], base: Tensor, target: Tensor, image: Any,
                caption: list[str]) -> str:
    """One row per checkpoint: base | LoKr at step k | target, all with the target's colour mapping."""
    from PIL import Image, ImageDraw

    from . import pictures as P

    tgt = target.numpy()
    lo, hi = P.colour_range(tgt)
    zoom = max(1, 128 // max(tgt.shape[1:]))
    tile = tgt.shape[2] * zoom
    label_w, gap = 150, 10
    fnt, small = P.font(14), P.font(12)
    width = label_w + 3 * tile + 4 * gap + 130
    head = Image.new("RGB", (width, 48), P.BACKGROUND)
    d = ImageDraw.Draw(head)
    for k, name in enumerate(("base pipeline", "with the LoKr", "target latent")):
        d.text((label_w + gap + k * (tile + gap), 26), name, fill=P.INK, font=fnt)
    d.text((label_w + 3 * (tile + gap) + gap, 8), "RMS distance", fill=P.INK, font=fnt)
    d.text((label_w + 3 * (tile + gap) + gap, 26), "to the target", fill=P.INK, font=fnt)
    d.text((8, 6), f'Sampled latent for "{PROMPT}"', fill=P.INK, font=fnt)
    d.text((8, 26), "(same seed in every row)", fill=P.GREY, font=small)
    rows = [head]
    base_rgb, tgt_rgb = P.latent_rgb(base.numpy(), lo, hi, zoom), P.latent_rgb(tgt, lo, hi, zoom)
    for c in checkpoints:
        row = Image.new("RGB", (width, tile + gap), P.BACKGROUND)
        d = ImageDraw.Draw(row)
        d.text((8, tile // 2 - 18), f"step {c['step']}", fill=P.INK, font=fnt)
        d.text((8, tile // 2 + 2), "(base: no LoKr yet)" if c["step"] == 0 else "LoKr trained so far",
               fill=P.GREY, font=small)
        for k, tile_img in enumerate((base_rgb, P.latent_rgb(c["latent"].numpy(), lo, hi, zoom), tgt_rgb)):
            row.paste(tile_img, (label_w + gap + k * (tile + gap), 0))
        x = label_w + 3 * (tile + gap) + gap
        d.text((x, tile // 2 - 20), f"base  {checkpoints[0]['distance']:.3f}", fill=P.GREY, font=fnt)
        d.text((x, tile // 2 + 2), f"LoKr  {c['distance']:.3f}", fill=P.INK, font=fnt)
        rows.append(row)
    thumb = P.labelled(image.resize((tile * 3 // 4, tile * 3 // 4), Image.Resampling.NEAREST), "training image")
    body = P.stack([P.stack(rows), thumb], vertical=False, gap=gap)
    sheet = P.stack([body, P.caption_block(caption, body.width, 12)], gap=4)
    sheet.save(path)
    return path


def loss_curve_png(losses: list[float], path: str, title: str = "training loss") -> str:
    """The loss per step, raw and smoothed (EMA), with labelled axes."""
    from . import pictures as P

    smoothed = P.smooth(losses)
    chart = P.line_chart([("loss per step", losses, (235, 160, 160), 1), ("smoothed (EMA 0.8)", smoothed,
                          (200, 30, 40), 3)], f"{title}: {losses[0]:.4f} -> {losses[-1]:.4f} "
                         f"(smoothed {smoothed[0]:.4f} -> {smoothed[-1]:.4f})", "optimizer step",
                         "MSE loss (log scale)", log_y=True)
    chart.save(path)
    return path


def _kron_layer(unet: nn.Module) -> tuple[str, Any]:
    """The adapted Linear to draw: among those of at most 128x128 (a readable heatmap) the square one
    with the largest ΔW (a non-square one if none is square); else the smallest."""
    from .model import lokr_layers

    linears = [(n, layer) for n, layer in lokr_layers(unet)
               if isinstance(layer.base_layer, nn.Linear) and ADAPTER in layer.plans]
    if not linears:
        raise ValueError("no adapted Linear layer to draw")
    small = [(n, layer) for n, layer in linears if max(layer.weight_shape) <= 128]
    if small:
        with torch.no_grad():
            return max(small, key=lambda nl: (nl[1].weight_shape[0] == nl[1].weight_shape[1],
                                              float(nl[1].get_delta_weight(ADAPTER).norm())))
    return min(linears, key=lambda nl: math.prod(nl[1].weight_shape))


def delta_w_png(unet: nn.Module, path: str) -> tuple[str, dict[str, Any]]:
    """ΔW of one adapted Linear as a diverging heatmap with its W1 block grid, W1 and W2 beside it."""
    from . import functional as LF
    from . import pictures as P

    name, layer = _kron_layer(unet)
    with torch.no_grad():
        delta = layer.get_delta_weight(ADAPTER).detach().float().cpu()
        factors = {k: t.detach() for k, t in layer.factors(ADAPTER).items()}
        w1 = LF.rebuild_w1(factors).float().cpu()
        out_k, in_n = delta.shape[0] // w1.shape[0], delta.shape[1] // w1.shape[1]
        w2 = LF.rebuild_w2(factors, out_k, in_n, []).float().cpu()
    shown = delta[:384, :384].numpy()
    cell = max(1, 384 // max(shown.shape))
    vmax = float(np.abs(shown).max()) or 1.0
    big = P.heatmap(shown, vmax, cell, grid=(out_k, in_n))
    scale = layer.effective_scale(ADAPTER)
    side_cell = max(2, 120 // max(max(w1.shape), max(w2.shape)))
    v1, v2 = float(w1.abs().max()) or 1.0, float(w2.abs().max()) or 1.0
    side = P.stack([P.labelled(P.heatmap(w1.numpy(), v1, side_cell), f"W1 {tuple(w1.shape)}  (±{v1:.2g})"),
                    P.labelled(P.heatmap(w2.numpy(), v2, side_cell), f"W2 {tuple(w2.shape)}  (±{v2:.2g})")], gap=16)
    body = P.stack([P.labelled(big, f"dW {tuple(delta.shape)}" + ("" if shown.shape == delta.shape else
                                                                    f" (top-left {shown.shape} shown)"), 13),
                    P.colour_bar(vmax, big.height), side], vertical=False, gap=14)
    caption = [f"unet.{name} (Linear {delta.shape[1]} -> {delta.shape[0]}), after training.",
               f"dW = scale * kron(W1, W2), scale = {scale:.3g}: dW is a {w1.shape[0]} x {w1.shape[1]} grid of "
               f"blocks (black lines), block (i, j) = scale * W1[i, j] * W2, so every block is the same "
               f"{out_k} x {in_n} pattern W2, scaled (and sign-flipped) by one entry of W1.",
               f"dW from the layer's get_delta_weight; W1, W2 from lokr_diffusers.functional. "
               f"{w1.numel() + sum(int(t.numel()) for k, t in factors.items() if 'w2' in k or 't2' in k)} "
               f"adapter numbers for {delta.numel()} weights. Colours: blue < 0 < red, symmetric around 0."]
    sheet = P.stack([body, P.caption_block(caption, max(body.width, 600), 12)], gap=6)
    sheet.save(path)
    info = {"layer": f"unet.{name}", "delta_w_shape": list(delta.shape), "w1_shape": list(w1.shape),
            "w2_shape": list(w2.shape), "scale": scale, "delta_w_max_abs": vmax,
            "kron_check_max_abs_diff": float((scale * torch.kron(w1, w2) - delta).abs().max())}
    return path, info


# ------------------------------------------------------------------------------------- the demo
@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `n` for the block (None: unchanged). The tiny model's ops are
    too small to gain from threads, and on a busy machine waiting threads slow it down many times."""
    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def run_demo(out: str = "outputs/demo", steps: int | None = None, model: str | None = None,
             resolution: int | None = None, seed: int = 0, checkpoints: int = 5) -> dict[str, str]:
    """Train a UNet LoKr on one image, draw what it learned, export the ComfyUI file and reload it.

    steps: default 100; resolution: default 48 for the tiny model, the model's own size with `model`.
    Returns {what: path}; summary.json holds the numbers, summary.txt the text summary."""
    defaults = DemoSettings()
    settings = DemoSettings(steps=steps or defaults.steps, resolution=resolution or defaults.resolution, seed=seed,
                            checkpoints=checkpoints, model=model)
    with _threads(1 if model is None else None):
        return _run(out, settings, resolution is None)


def _run(out: str, settings: DemoSettings, default_resolution: bool) -> dict[str, str]:
    from . import pictures as P
    from .export import save_lokr_weights

    t0 = time.perf_counter()
    model, seed = settings.model, settings.seed
    pipe, kind = load_demo_pipeline(settings, None)
    if model is not None and default_resolution:
        settings.resolution = int(pipe.unet.config.sample_size) * int(getattr(pipe, "vae_scale_factor", 8))
    resolution = settings.resolution
    os.makedirs(out, exist_ok=True)
    image = training_image(resolution)
    with torch.no_grad():
        posterior = pipe.vae.encode(_pixels(image).to(pipe.vae.dtype)).latent_dist.mean.float()
    vae_scale = 1.0 / float(posterior.std()) if model is None else float(pipe.vae.config.scaling_factor)
    if model is None:
        pipe.vae.register_to_config(scaling_factor=vae_scale)
    target = posterior * vae_scale  # (1, C, h, w): what the pipeline's latents are compared with
    base_latent = sample_latent(pipe, settings)
    losses, marks = _train(pipe, kind, target, settings, base_latent)
    t_train = time.perf_counter() - t0

    paths = {"latents": os.path.join(out, "latents_over_training.png"),
             "loss_curve": os.path.join(out, "loss_curve.png"), "delta_w": os.path.join(out, "delta_w_kron.png"),
             "training_image": os.path.join(out, "training_image.png")}
    files = {"comfyui": os.path.join(out, "lokr_comfyui.safetensors"),
             "lokr": os.path.join(out, "pytorch_lokr_weights.safetensors")}
    save_lokr_weights(pipe, files["comfyui"], ADAPTER, format="comfyui", base="sdxl" if _is_sdxl(pipe) else None)
    save_lokr_weights(pipe, files["lokr"], ADAPTER, format="lokr_diffusers")
    fresh, _ = load_demo_pipeline(settings, vae_scale)
    fresh.load_lokr_weights(files["comfyui"], adapter_name="demo")
    reloaded = sample_latent(fresh, settings)
    trained = marks[-1]["latent"]
    reload_diff = float((reloaded - trained).abs().max())
    del fresh

    how = ("the tiny model predicts the clean latent (prediction_type='sample'); its VAE scale is set so the "
           f"training latent has std 1 (scaling_factor {vae_scale:.3g})") if model is None else \
        f"{model}: prediction_type {kind!r}, its own VAE scaling_factor {vae_scale:.4g}"
    caption = [
        f"Each tile: the latent channels 0, 1, 2 as red, green, blue (the target's mean ± 2.5 std per channel), "
        f"one square per latent pixel. Sampled through the pipeline's scheduler loop: {type(pipe.scheduler).__name__}, "
        f"{settings.inference_steps} steps, output_type='latent', guidance_scale 1, seed {seed}.",
        f"The target is the training image's VAE encoding (posterior mean x scaling factor). 'distance' = RMS "
        f"difference to it. LoKr on the UNet only, rank {settings.rank}, {settings.steps} steps; {how}.",
    ]
    image.save(paths["training_image"])
    latents_png(paths["latents"], marks, base_latent, target[0], image, caption)
    loss_curve_png(losses, paths["loss_curve"])
    _, kron = delta_w_png(pipe.unet, paths["delta_w"])

    written = {**paths, **files, "summary": os.path.join(out, "summary.json"),
               "summary_text": os.path.join(out, "summary.txt")}
    smoothed = P.smooth(losses)
    summary: dict[str, Any] = {
        "what": "a UNet LoKr learning one training image on a tiny random pipeline (offline), seen in latent space"
                if model is None else f"a UNet LoKr learning one training image on {model}, seen in latent space",
        "shown_latent": f"full sampling: the pipeline's {settings.inference_steps}-step scheduler loop, "
                        "output_type='latent', guidance_scale 1, same seed for every checkpoint",
        "model": model or "tiny SD1.x-shaped pipeline with random weights (lokr_diffusers.tiny)",
        "prediction_type": kind, "vae_scaling_factor": vae_scale, "prompt": PROMPT,
        "steps": len(losses), "resolution": resolution, "latent_shape": list(target.shape[1:]),
        "batch": settings.batch, "learning_rate": settings.learning_rate, "rank": settings.rank,
        "loss": {"first": losses[0], "last": losses[-1], "first_smoothed": smoothed[0],
                 "last_smoothed": smoothed[-1]},
        "latent_distance": {"metric": "RMS difference of the sampled latent to the training image's latent",
                            "base": marks[0]["distance"], "lokr_final": marks[-1]["distance"],
                            "per_checkpoint": [{"step": c["step"], "base": marks[0]["distance"],
                                                "lokr": c["distance"]} for c in marks]},
        "reloaded_comfyui_max_abs_latent_diff": reload_diff,
        "delta_w": kron,
        "seconds": {"training_and_checkpoints": round(t_train, 1), "total": round(time.perf_counter() - t0, 1)},
        "files": {os.path.basename(p): {"path": p, "shows": FILES[os.path.basename(p)]} for p in written.values()},
    }
    with open(written["summary"], "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=2, ensure_ascii=False)
    with open(written["summary_text"], "w", encoding="utf-8") as fh:
        fh.write(summary_text(summary) + "\n")
    logger.info("demo written to %s in %.1f s", out, summary["seconds"]["total"])
    return written


def summary_text(summary: dict[str, Any]) -> str:
    """The demo's summary.json as a few lines of text (what the CLI prints)."""
    d = summary["latent_distance"]
    loss = summary["loss"]
    lines = [
        f"LoKr demo: {summary['steps']} steps on one image ({summary['model']}), "
        f"{summary['seconds']['total']} s",
        f"  loss {loss['first']:.4f} -> {loss['last']:.4f} (smoothed {loss['first_smoothed']:.4f} -> "
        f"{loss['last_smoothed']:.4f})",
        f"  sampled latent vs the training image's latent, RMS distance: base {d['base']:.3f}, LoKr "
        + ", ".join(f"step {c['step']}: {c['lokr']:.3f}" for c in d["per_checkpoint"]),
        f"  ComfyUI file reloaded with pipe.load_lokr_weights: same latent, max abs diff "
        f"{summary['reloaded_comfyui_max_abs_latent_diff']:.2e}",
        f"  dW drawn: {summary['delta_w']['layer']} {tuple(summary['delta_w']['delta_w_shape'])} = "
        f"scale * kron(W1 {tuple(summary['delta_w']['w1_shape'])}, W2 {tuple(summary['delta_w']['w2_shape'])})",
        "files:",
    ]
    lines += [f"  {info['path']}\n      {info['shows']}" for info in summary["files"].values()]
    return "\n".join(lines)
