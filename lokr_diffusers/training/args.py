"""Command-line arguments of the LoKr training scripts: diffusers' names where one exists
(train_text_to_image_lora.py, train_dreambooth_lora*.py), LoKr ones beside them."""

from __future__ import annotations

import argparse
from typing import Any

from .base_precision import base_precision_args
from .errors import TrainingInputError
from .family import training_family
from .targets import TE_TARGETS, TRANSFORMER_PRESETS, UNET_PRESETS, denoiser_targets, unet_targets

__all__ = ["TE_TARGETS", "TRANSFORMER_PRESETS", "UNET_PRESETS", "build_parser", "denoiser_targets", "flow_defaults",
           "parse", "parse_with", "unet_targets"]


def build_parser(description: str, dreambooth: bool, family: str = "sd") -> argparse.ArgumentParser:
    """family: "sd" (SD1.x/2.x/SDXL, the UNet scripts), "flow" (flow matching, a transformer: every family the flow
    script trains, told from the model) or one of those families ("flux", "sd3", "flux2", "zimage", "chroma",
    "qwenimage", "lumina2": that one only)."""
    p = argparse.ArgumentParser(description=description)
    _model_and_data(p.add_argument, dreambooth, family)
    _training(p.add_argument)
    _memory(p.add_argument)
    if family != "sd":
        _flow(p.add_argument, family)
    _lokr(p.add_argument, family)
    p.set_defaults(family=family)
    return p


def _flow(a: Any, family: str) -> None:
    """diffusers' train_dreambooth_lora_flux.py / _sd3.py / _flux2_klein.py / _z_image.py / _qwen_image.py /
    _lumina2.py names and defaults (Chroma, which diffusers has no script for: FLUX.1's). The
    defaults that differ between the families (the records') are filled in once the model tells its family
    (flow_defaults); an option of another family than the model's is not used."""
    from .flow import WEIGHTING_SCHEMES

    d = training_family(family)
    a("--weighting_scheme", default=d.weighting_scheme, choices=list(WEIGHTING_SCHEMES),
      help="timestep density / loss weighting (SD3 paper): none = uniform (default: the family's, as diffusers' "
           "script: none, SD3 logit_normal)")
    a("--logit_mean", type=float, default=0.0, help="for --weighting_scheme logit_normal")
    a("--logit_std", type=float, default=1.0, help="for --weighting_scheme logit_normal")
    a("--mode_scale", type=float, default=1.29, help="for --weighting_scheme mode")
    a("--max_sequence_length", type=int, default=d.max_sequence_length,
      help="text tokens per prompt: T5's (FLUX.1, SD3, Chroma), Qwen3's (FLUX.2 [klein], Z-Image), Qwen2.5-VL's "
           "(Qwen-Image), Gemma-2's (Lumina 2) (default: the family's, as diffusers' script: 512, SD3 77, "
           "Lumina 2 256)")
    a("--guidance_scale", type=float, default=None,
      help="the guidance a guidance-distilled model (FLUX.1-dev, HunyuanVideo) is trained at (default: the family's: "
           "3.5 as diffusers' FLUX.1 script, HunyuanVideo 1.0 as musubi-tuner); unused by a model without a guidance "
           "embedding (FLUX.1-schnell, FLUX.2 [klein], Qwen-Image)")
    a("--precondition_outputs", type=int, default=1, choices=[0, 1],
      help="SD3: 1, the loss compares the denoised latents x_σ - σ·v with x (diffusers' default); 0: v with ε - x")
    a("--pretrained_text_encoder_4_name_or_path", default=None,
      help="HiDream-I1: the Llama-3.1 text encoder (LlamaForCausalLM) when the model folder has none, as diffusers' "
           "script (its tokenizer: --pretrained_tokenizer_4_name_or_path, default the same folder)")
    a("--pretrained_tokenizer_4_name_or_path", default=None, help="HiDream-I1: the Llama-3.1 tokenizer")
    a("--no_t5", action="store_true",
      help="SD3: load the pipeline without T5 (text_encoder_3=None, zeros in its place), as diffusers allows")
    a("--text_encoder_out_layers", type=int, nargs="+", default=[9, 18, 27],
      help="FLUX.2 [klein]: the Qwen3 hidden states stacked into the text states (the pipeline's default)")
    a("--num_frames", type=int, default=None,
      help="Wan / LTX-Video / LTX-2: frames per training clip, 1 + 4k for Wan, 1 + 8k for LTX-Video and LTX-2 (another "
           "count is rounded down, as the pipelines do; default: the pipeline's, 81 / 161 / 121)")
    a("--train_transformer_2", action="store_true",
      help="Wan 2.2 A14B: train the low-noise expert transformer_2 (on its timesteps, t < boundary_ratio * 1000) "
           "instead of the high-noise transformer; the file loads with load_into_transformer_2=True")
    a("--frame_rate", type=float, default=25.0,
      help="LTX-Video / LTX-2: the clips' frames per second, for the transformer's rope (LTX-Video's rope scale, "
           "LTX-2's positions in seconds; default 25, LTX-Video's pipeline default; LTX-2's pipeline says 24)")


def flow_defaults(args: Any, family: Any) -> None:
    """Fill the flow options left to the family (None) from `family` (a one-member TrainingFamily), in place."""
    if getattr(args, "weighting_scheme", "") is None:
        args.weighting_scheme = family.weighting_scheme
    if getattr(args, "max_sequence_length", 0) is None:
        args.max_sequence_length = family.max_sequence_length


def _model_and_data(a: Any, dreambooth: bool, family: str) -> None:
    a("--pretrained_model_name_or_path", required=True, help="diffusers model folder or hub id")
    a("--revision", default=None)
    a("--variant", default=None, help="e.g. fp16, for the model files")
    if family == "sd":
        a("--sdxl", action="store_true", help="force SDXL handling (default: detected from the model)")
    if dreambooth:
        a("--instance_data_dir", required=True, help="folder of images of the subject")
        a("--instance_prompt", required=True, help='e.g. "a photo of sks dog"')
        a("--class_data_dir", default=None, help="folder of class images (prior preservation)")
        a("--class_prompt", default=None, help='e.g. "a photo of dog"')
        a("--with_prior_preservation", action="store_true")
        a("--prior_loss_weight", type=float, default=1.0)
        a("--num_class_images", type=int, default=100,
          help="class images wanted (not generated here: put them in --class_data_dir)")
    else:
        a("--train_data_dir", default=None, help="image folder with metadata.jsonl or .txt captions")
        a("--dataset_name", default=None, help="a `datasets` dataset (needs `pip install datasets`)")
        a("--dataset_config_name", default=None)
        a("--image_column", default="image")
        a("--caption_column", default="text")


def _training(a: Any) -> None:
    a("--resolution", type=int, default=512)
    a("--center_crop", action="store_true")
    a("--random_flip", action="store_true")
    a("--train_batch_size", type=int, default=1)
    a("--num_train_epochs", type=int, default=1)
    a("--max_train_steps", type=int, default=None, help="overrides num_train_epochs")
    a("--gradient_accumulation_steps", type=int, default=1)
    a("--gradient_checkpointing", action="store_true")
    a("--learning_rate", type=float, default=1e-4)
    a("--text_encoder_lr", type=float, default=None, help="default: --learning_rate")
    a("--lr_scheduler", default="constant", help="linear, cosine, constant, constant_with_warmup, ...")
    a("--lr_warmup_steps", type=int, default=0)
    a("--adam_beta1", type=float, default=0.9)
    a("--adam_beta2", type=float, default=0.999)
    a("--adam_weight_decay", type=float, default=1e-2)
    a("--adam_epsilon", type=float, default=1e-8)
    a("--max_grad_norm", type=float, default=1.0)
    a("--snr_gamma", type=float, default=None, help="Min-SNR weighting, 5.0 is a common value")
    a("--noise_offset", type=float, default=0.0)
    a("--mixed_precision", choices=["no", "fp16", "bf16"], default=None)
    base_precision_args(a)
    a("--seed", type=int, default=0)
    a("--output_dir", default="lokr-model")
    a("--logging_dir", default="logs")
    a("--report_to", default=None, help="tensorboard, wandb, ... (none by default)")
    a("--checkpointing_steps", type=int, default=500, help="steps between checkpoints; 0: none")
    a("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints")
    a("--resume_from_checkpoint", default=None, help='a checkpoint folder, or "latest"')
    a("--validation_prompt", default=None)
    a("--num_validation_images", type=int, default=2)
    a("--validation_epochs", type=int, default=1)
    a("--validation_steps", type=int, default=4, help="denoising steps of the validation images")
    a("--train_text_encoder", action="store_true")
    a("--fsdp", action="store_true",
      help="shard the denoiser's blocks across the launched processes with FSDP2 (torch's fully_shard): each "
           "process holds 1/N of the base and of the factors; launch with torchrun or accelerate launch (not with "
           "accelerate's own FSDP plugin, which shards by itself); the files equal an unsharded run's")
    a("--dataloader_num_workers", type=int, default=0)


def _memory(a: Any) -> None:
    """The memory savers (training/caches.py); --gradient_checkpointing is with the training options."""
    a("--cache_latents", action="store_true",
      help="encode every training image once before the first step, keep the VAE posteriors on the CPU and move "
           "the VAE off the device (each step samples the cached posterior with its own generator: the same losses); "
           "needs items that do not change between epochs (no --random_flip; --center_crop or square images)")
    a("--cache_text_embeddings", action="store_true",
      help="encode every batch of captions the run draws once before the first step, keep them on the CPU and move "
           "the text encoders off the device; not with --train_text_encoder")
    a("--offload_text_encoders", action="store_true",
      help="keep the text encoders that do not train on the CPU, moved to the device only to encode")


def _lokr(a: Any, family: str) -> None:
    a("--rank", type=int, default=8)
    a("--alpha", type=float, default=None, help="default: --rank (scale 1)")
    a("--decompose_factor", type=int, default=-1)
    a("--decompose_both", action="store_true")
    a("--use_effective_conv2d", action="store_true", help="Tucker factors on 3x3 convs")
    a("--rank_dropout", type=float, default=0.0)
    a("--module_dropout", type=float, default=0.0)
    a("--init_weights", default="true", choices=["true", "false", "lycoris"])
    if family == "sd":
        a("--unet_target_modules", default="attn-ff",
          help=f"a preset ({', '.join(UNET_PRESETS)}) or a comma-separated list of module names")
    else:
        a("--lora_layers", default="default",
          help=f"the transformer's targets: a preset ({', '.join(TRANSFORMER_PRESETS)}) or a comma-separated list "
               "of module names (diffusers' argument name)")
    a("--te_rank", type=int, default=None, help="default: --rank")
    a("--te_alpha", type=float, default=None, help="default: --te_rank")
    a("--te_target_modules", default=",".join(TE_TARGETS))
    a("--export_format", default="comfyui", choices=["comfyui", "peft", "diffusers", "none"],
      help="the portable file written beside our own layout")


def parse_with(parser: argparse.ArgumentParser, dreambooth: bool,
               argv: list[str] | None = None) -> argparse.Namespace:
    """Parse and check (`checks.check_args`); bad input exits as argparse does: usage, one line
    `error: ...`, exit code 2."""
    from .checks import check_args

    args = parser.parse_args(argv)
    args.dreambooth = dreambooth
    try:
        check_args(args)
    except TrainingInputError as e:
        parser.error(str(e))
    return args


def parse(description: str, dreambooth: bool, argv: list[str] | None = None, family: str = "sd") -> argparse.Namespace:
    return parse_with(build_parser(description, dreambooth, family), dreambooth, argv)
