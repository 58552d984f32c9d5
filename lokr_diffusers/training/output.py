"""What a training run leaves behind: validation images, the adapter files and a model card."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from .. import families
from ..export import save_lokr_weights

logger = logging.getLogger(__name__)
OURS_FILE = "pytorch_lokr_weights.safetensors"


def save_validation_images(pipe: Any, args: Any, step: int, accelerator: Any, denoiser: str = "unet",
                           write: bool = True) -> str | None:
    """Generate --num_validation_images for --validation_prompt, save a side-by-side PNG (a video family's: of the
    first frames, and each video as a GIF), log to trackers; the PNG's path. Without `write` only generate (the
    processes other than the main one, under FSDP: each denoiser call gathers from every process), None."""
    from PIL import Image

    g = torch.Generator().manual_seed(args.seed)
    model = getattr(pipe, denoiser)
    was_training = model.training
    model.eval()
    frames = getattr(args, "num_frames", None)  # set for a video family's clips (training/clips.py)
    video = {"num_frames": frames, "output_type": "pil"} if frames is not None else {}
    with torch.no_grad():  # by keyword: Flux2KleinPipeline's first parameter is `image`
        outs = [pipe(prompt=args.validation_prompt, num_inference_steps=args.validation_steps, generator=g,
                     height=args.resolution, width=args.resolution, **video)
                for _ in range(args.num_validation_images)]
    model.train(was_training)
    if not write:
        return None
    clips = [list(out.frames[0]) for out in outs] if video else []  # each a list of PIL frames
    images = [clip[0] for clip in clips] if video else [out.images[0] for out in outs]
    sheet = Image.new("RGB", (sum(i.width for i in images), images[0].height))
    x = 0
    for im in images:
        sheet.paste(im, (x, 0))
        x += im.width
    folder = os.path.join(args.output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step_{step:06d}.png")
    sheet.save(path)  # a video family's: the first frames
    for k, clip in enumerate(clips):  # and each video as an animated GIF beside it
        clip[0].save(os.path.join(folder, f"step_{step:06d}_{k}.gif"), save_all=True, append_images=clip[1:],
                     duration=int(1000 / getattr(args, "frame_rate", 25.0)), loop=0)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images("validation", np.stack([np.asarray(i) for i in images]), step, dataformats="NHWC")
    logger.info("validation images: %s", path)
    return path


def save_outputs(pipe: Any, args: Any, family: str | None, result: Any) -> dict[str, str]:
    """Our lossless file, the portable one (--export_format), and README.md, of a pipeline's adapters (or of
    {component: model}'s, save_lokr_weights' `source`). `family`: the base model, "sd1",
    "sd2", "sdxl" or a DiT family ("flux", "sd3", "flux2", "zimage"; checked against the pipeline's transformer),
    None to read it off the pipeline."""
    files = {"lokr": save_lokr_weights(pipe, os.path.join(args.output_dir, OURS_FILE), format="lokr_diffusers")}
    if args.export_format != "none":
        suffix = "" if args.export_format == "peft" else ".safetensors"
        name = os.path.join(args.output_dir, f"lokr_{args.export_format}{suffix}")
        files[args.export_format] = save_lokr_weights(pipe, name, format=args.export_format, base=family)
    files["model_card"] = write_model_card(args, family, result, files)
    return files


def _tags(family: str | None) -> tuple[str, ...]:
    """The family's model-card tags (its record's), none when the pipeline tells it (family None)."""
    return families.get(family).tags if family is not None else ()


def write_model_card(args: Any, family: str | None, result: Any, files: dict[str, str]) -> str:
    prompt = args.instance_prompt if getattr(args, "dreambooth", False) else args.validation_prompt
    targets = (f"transformer targets `{args.lora_layers}`" if hasattr(args, "lora_layers") else
               f"UNet targets `{args.unet_target_modules}`")
    lines = [
        "---", f"base_model: {args.pretrained_model_name_or_path}", "library_name: diffusers",
        "tags: [" + ", ".join(["lokr", "lycoris", "diffusers", "text-to-image", *_tags(family)]) + "]", "---", "",
        f"# LoKr fine-tune of {args.pretrained_model_name_or_path}", "",
        f"Trained with lokr_diffusers for {result.global_step} steps (rank {args.rank}, alpha "
        f"{args.alpha or args.rank}, {targets}"
        + (f", text encoder rank {args.te_rank or args.rank}" if args.train_text_encoder else "") + ").", "",
        f"Prompt: `{prompt}`" if prompt else "", "",
        "## Use", "", "```python", "import lokr_diffusers",
        f'pipe.load_lokr_weights("{args.output_dir}", weight_name="{OURS_FILE}"'
        + (", load_into_transformer_2=True" if getattr(args, "train_transformer_2", False) else "") + ")", "```", "",
        "Files: " + ", ".join(f"`{os.path.basename(p)}` ({k})" for k, p in files.items()) + ".",
        "The ComfyUI / A1111 file loads there as a LoRA/LyCORIS file, with the same weights as trained.", "",
    ]
    path = os.path.join(args.output_dir, "README.md")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines))
    return path
