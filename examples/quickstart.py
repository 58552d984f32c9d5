"""Quickstart: the LoKr design example on a tiny, fully offline Stable Diffusion pipeline.

Builds a tiny SD1.x-shaped pipeline in code, saves it to disk, loads it back with
`from_pretrained`, wraps the text encoder and the UNet in LoKrModel with separate configs
(Tucker factors on convs), and writes images without and with the adapters.

    python examples/quickstart.py [--out outputs/quickstart]
"""

from __future__ import annotations

import argparse
import os
import tempfile

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import logging as diffusers_logging

from lokr_diffusers import LoKrConfig, LoKrModel, lokr_layers
from lokr_diffusers.tiny import save_tiny_pipeline


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/quickstart", help="folder for the images")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    diffusers_logging.disable_progress_bar()
    os.makedirs(args.out, exist_ok=True)

    with tempfile.TemporaryDirectory() as local_dir:
        save_tiny_pipeline(local_dir)
        pipe = StableDiffusionPipeline.from_pretrained(local_dir)
    pipe.set_progress_bar_config(disable=True)
    prompt = "a photo of a cat"
    before = pipe(prompt, num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]

    config_te = LoKrConfig(r=8, lora_alpha=32, target_modules=["k_proj", "q_proj", "v_proj", "out_proj", "fc1", "fc2"],
                           rank_dropout=0.0, module_dropout=0.0, init_weights=True)
    config_unet = LoKrConfig(r=8, lora_alpha=32, target_modules=["proj_in", "proj_out", "to_k", "to_q", "to_v",
                             "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2"], rank_dropout=0.0,
                             module_dropout=0.0, init_weights=True, use_effective_conv2d=True,
                             rank_pattern={"conv1": 2, "conv2": 2})  # tiny convs: a rank low enough for Tucker
    pipe.text_encoder = LoKrModel(pipe.text_encoder, config_te, "default")
    pipe.unet = LoKrModel(pipe.unet, config_unet, "default")
    pipe.unet.print_trainable_parameters()

    # Fresh adapters are zero (init_weights=True): stand in for training by giving them values.
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in [*lokr_layers(pipe.unet), *lokr_layers(pipe.text_encoder)]:
            for t in layer.factors("default").values():
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
    tucker = sum(layer.plans["default"].tucker for _, layer in lokr_layers(pipe.unet))
    print(f"LoKr layers: unet {len(list(lokr_layers(pipe.unet)))} ({tucker} Tucker convs), "
          f"text encoder {len(list(lokr_layers(pipe.text_encoder)))}")
    after = pipe(prompt, num_inference_steps=4, generator=torch.Generator().manual_seed(0)).images[0]

    diff = np.abs(np.asarray(after, dtype=np.float32) - np.asarray(before, dtype=np.float32))
    print(f"pixels changed by the adapters: mean {diff.mean():.2f}, max {diff.max():.0f} (of 255)")
    for name, image in (("before.png", before), ("after.png", after)):
        image.save(os.path.join(args.out, name))
    print(f"wrote {os.path.join(args.out, 'before.png')} and {os.path.join(args.out, 'after.png')}")


if __name__ == "__main__":
    main()
