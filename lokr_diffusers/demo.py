"""The offline demo (`lokr-diffusers demo`): train a LoKr on a tiny pipeline built in code (or a real
one with --model), export the ComfyUI file, load it back with `pipe.load_lokr_weights`, and write
before/after images and a loss curve. The tiny model has random weights: its images are noise, the
demo shows the mechanics (and the loss curve the learning); with --model the images mean something."""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from typing import Any

import torch

logger = logging.getLogger(__name__)


def loss_curve_png(losses: list[float], path: str, title: str = "training loss") -> str:
    """A small line chart of the loss per step, drawn with PIL (no matplotlib needed)."""
    from PIL import Image, ImageDraw

    w, h, pad = 480, 280, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([pad, pad // 2, w - pad // 2, h - pad], outline="black")
    lo, hi = min(losses), max(losses)
    span = (hi - lo) or 1.0
    pts = [(pad + i * (w - 1.5 * pad) / max(len(losses) - 1, 1), h - pad - (v - lo) / span * (h - 1.5 * pad))
           for i, v in enumerate(losses)]
    if len(pts) > 1:
        d.line(pts, fill=(200, 40, 40), width=2)
    d.text((pad, 2), f"{title}: {losses[0]:.4f} -> {losses[-1]:.4f}", fill="black")
    d.text((2, pad // 2), f"{hi:.3f}", fill="black")
    d.text((2, h - pad - 10), f"{lo:.3f}", fill="black")
    d.text((w // 2 - 20, h - pad + 8), f"step (1..{len(losses)})", fill="black")
    img.save(path)
    return path


def comparison_png(images: dict[str, Any], path: str, size: int = 192) -> str:
    """Labelled images side by side (e.g. a training image, before, after)."""
    from PIL import Image, ImageDraw

    sheet = Image.new("RGB", (len(images) * (size + 8) + 8, size + 30), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, image) in enumerate(images.items()):
        x = 8 + i * (size + 8)
        sheet.paste(image.convert("RGB").resize((size, size)), (x, 22))
        draw.text((x, 5), label, fill="black")
    sheet.save(path)
    return path


def _generate(pipe: Any, prompt: str, resolution: int, seed: int) -> Any:
    return pipe(prompt, num_inference_steps=8, height=resolution, width=resolution,
                generator=torch.Generator().manual_seed(seed)).images[0]


def run_demo(out: str = "outputs/demo", steps: int = 40, model: str | None = None, resolution: int = 64,
             seed: int = 0) -> dict[str, str]:
    """Train, export, reload, generate. Returns {what: path}."""
    from diffusers import DiffusionPipeline

    from .tiny import save_tiny_pipeline
    from .training.args import parse
    from .training.data import make_synthetic_dataset
    from .training.run import train

    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lokr_demo_") as tmp:
        model_dir = model or save_tiny_pipeline(os.path.join(tmp, "tiny-sd"))
        data = make_synthetic_dataset(os.path.join(tmp, "data"), n=8, size=resolution, seed=seed)
        prompt = "a photo of sks shape"
        run_dir = os.path.join(out, "run")
        argv = ["--pretrained_model_name_or_path", model_dir, "--train_data_dir", data, "--resolution",
                str(resolution), "--train_batch_size", "2", "--max_train_steps", str(steps), "--learning_rate", "2e-3",
                "--rank", "4", "--alpha", "4", "--use_effective_conv2d", "--unet_target_modules", "full",
                "--train_text_encoder", "--te_rank", "2", "--seed", str(seed), "--output_dir", run_dir,
                "--checkpointing_steps", "0", "--export_format", "comfyui"]
        result = train(parse("demo", dreambooth=False, argv=argv))
        base: Any = DiffusionPipeline.from_pretrained(model_dir)
        base.set_progress_bar_config(disable=True)
        before = _generate(base, prompt, resolution, seed)
        base.load_lokr_weights(result.files["comfyui"], adapter_name="demo")
        after = _generate(base, prompt, resolution, seed)
        from PIL import Image

        sample = Image.open(os.path.join(data, sorted(f for f in os.listdir(data) if f.endswith(".png"))[0]))
        sample.load()
    paths = {"before": os.path.join(out, "before.png"), "after": os.path.join(out, "after.png"),
             "loss_curve": os.path.join(out, "loss_curve.png"), "comparison": os.path.join(out, "comparison.png"),
             **result.files}
    before.resize((256, 256)).save(paths["before"])
    after.resize((256, 256)).save(paths["after"])
    loss_curve_png(result.losses, paths["loss_curve"])
    comparison_png({"a training image": sample, "before (base)": before, "after (LoKr reloaded)": after},
                   paths["comparison"])
    import numpy as np

    change = float(np.abs(np.asarray(after, dtype=np.float32) - np.asarray(before, dtype=np.float32)).mean())
    with open(os.path.join(out, "summary.json"), "w", encoding="utf-8") as fh:
        json.dump({"steps": result.global_step, "first_loss": result.losses[0], "last_loss": result.losses[-1],
                   "mean_pixel_change_after_vs_before": round(change, 3),
                   "seconds": round(time.perf_counter() - t0, 1), "files": paths}, fh, indent=2)
    return paths
