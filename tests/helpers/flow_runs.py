"""What the flow families' training tests share: clip folders written in code, one denoising step of a pipeline read
back as a velocity, and the exact-resume check of the flow script."""

from __future__ import annotations

import os
from typing import Any

import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

COLOURS = [(220, 30, 30), (30, 200, 60), (30, 60, 200), (240, 240, 20), (250, 250, 250), (0, 0, 0), (120, 0, 200)]


def clip_frames(n: int, size: int = 24, shift: int = 0) -> list[Image.Image]:
    """n frames of a square moving right on a flat background (few flat colours: a GIF keeps them exactly)."""
    out = []
    for k in range(n):
        im = Image.new("RGB", (size + 8, size), COLOURS[(k + shift) % len(COLOURS)])
        ImageDraw.Draw(im).rectangle((2 + k, 4, 10 + k, 12), fill=COLOURS[(k + shift + 3) % len(COLOURS)])
        out.append(im)
    return out


def make_clip_folder(folder: str, clips: int = 2, frames: int = 5, size: int = 24) -> str:
    """`clips` sub-folders of `frames` PNG frames each (frame_000.png, ...), a caption .txt beside each."""
    for c in range(clips):
        sub = os.path.join(folder, f"clip{c}")
        os.makedirs(sub)
        for k, im in enumerate(clip_frames(frames, size, shift=c)):
            im.save(os.path.join(sub, f"frame_{k:03d}.png"))
        with open(sub + ".txt", "w", encoding="utf-8") as fh:
            fh.write(f"clip {c}")
    return folder


def step_velocity(pipe: Any, x: torch.Tensor, k: int, steps: int, **call: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(v, t): the velocity the pipeline's denoising step `k` (of `steps`) applies to latents set to `x` (the
    pipeline's own latent layout) before it, read back through callback_on_step_end as
    v = (x_after − x) / (σ_{k+1} − σ_k), and the step's timestep. `call`: the rest of the pipeline call."""
    seen: dict[str, Any] = {}

    def callback(_pipe: Any, i: int, t: torch.Tensor, tensors: dict[str, Any]) -> dict[str, Any]:
        if i == k - 1:
            return {"latents": x.clone()}
        if i == k:
            seen.update(out=tensors["latents"].clone(), t=t)
        return {}

    with torch.no_grad():
        pipe(num_inference_steps=steps, latents=x.clone(), output_type="latent", callback_on_step_end=callback,
             callback_on_step_end_tensor_inputs=["latents"], **call)
    s = pipe.scheduler.sigmas
    return (seen["out"] - x) / (s[k + 1] - s[k]), seen["t"]


def check_exact_resume(out: str, again: str, argv: list[str]) -> dict[str, torch.Tensor]:
    """The flow script resumed from `out`'s checkpoint-2 in the fresh folder `again` (`argv`: its arguments, with
    --output_dir `again` and --resume_from_checkpoint latest) ends at step 4 with `out`'s final factors, bit for bit.
    Returns them."""
    from lokr_diffusers.training.args import parse
    from lokr_diffusers.training.output import OURS_FILE
    from lokr_diffusers.training.run import train

    os.makedirs(again)
    os.symlink(os.path.join(out, "checkpoint-2"), os.path.join(again, "checkpoint-2"))
    assert train(parse("t", True, argv, "flow")).global_step == 4
    a, b = (load_file(os.path.join(d, OURS_FILE)) for d in (out, again))
    assert a and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    return a
