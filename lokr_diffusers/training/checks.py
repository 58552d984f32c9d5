"""Checks of a training run's input, made before any training work: the arguments (`check_args`, at
parsing), the loaded pipeline (`check_pipeline`) and the adapter's state (`check_not_fused`).
Each failure is a TrainingInputError (AdapterFusedError for the adapter) whose one-line message names
the argument or file and says what to give instead."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from . import checkpoint
from .errors import AdapterFusedError, InputNotFoundError, TrainingInputError

Rule = tuple[str, Callable[[float], bool], str]


def _positive(v: float) -> bool:
    return v > 0


def _non_negative(v: float) -> bool:
    return v >= 0


def _probability(v: float) -> bool:
    return 0 <= v < 1


def _finite(v: float) -> bool:
    return True


# (argument, test of a given value, what it must be). Options left out (None) are not tested; a
# float must also be finite (argparse's float() accepts "nan" and "inf").
RULES: tuple[Rule, ...] = (
    ("max_train_steps", _positive, "a positive number of optimizer steps (leave it out to train "
                                   "--num_train_epochs epochs)"),
    ("num_train_epochs", _positive, "at least 1"),
    ("train_batch_size", _positive, "at least 1 (images per process and micro-step)"),
    ("gradient_accumulation_steps", _positive, "at least 1 (1 = no accumulation)"),
    ("learning_rate", _positive, "a positive number such as 1e-4"),
    ("text_encoder_lr", _positive, "a positive number such as 5e-5 (leave it out to use --learning_rate)"),
    ("lr_warmup_steps", _non_negative, "0 or more"),
    ("adam_beta1", _probability, "in [0, 1), e.g. 0.9"),
    ("adam_beta2", _probability, "in [0, 1), e.g. 0.999"),
    ("adam_weight_decay", _non_negative, "0 or more, e.g. 1e-2"),
    ("adam_epsilon", _positive, "a positive number such as 1e-8"),
    ("max_grad_norm", _positive, "a positive number such as 1.0"),
    ("snr_gamma", _positive, "a positive number such as 5.0 (leave it out for no Min-SNR weighting)"),
    ("noise_offset", _non_negative, "0 or more, e.g. 0.05"),
    ("prior_loss_weight", _non_negative, "0 or more, e.g. 1.0"),
    ("num_class_images", _non_negative, "0 or more"),
    ("checkpointing_steps", _non_negative, "a positive number of steps between checkpoints, or 0 for none"),
    ("checkpoints_total_limit", _positive, "at least 1 (leave it out to keep every checkpoint)"),
    ("num_validation_images", _positive, "at least 1"),
    ("validation_epochs", _positive, "at least 1"),
    ("validation_steps", _positive, "at least 1 denoising step"),
    ("dataloader_num_workers", _non_negative, "0 or more"),
    ("num_frames", _positive, "a positive number of frames per clip, e.g. 49 (Wan: 1 + 4k, LTX-Video: 1 + 8k)"),
    ("frame_rate", _positive, "a positive number of frames per second, e.g. 25"),
    ("rank", _positive, "a positive integer such as 8"),
    ("te_rank", _positive, "a positive integer such as 4 (leave it out to use --rank)"),
    ("alpha", _finite, "a finite number (leave it out for alpha = rank)"),
    ("te_alpha", _finite, "a finite number (leave it out for alpha = --te_rank)"),
    ("rank_dropout", _probability, "in [0, 1): the chance to drop a rank of the update in a step"),
    ("module_dropout", _probability, "in [0, 1): the chance to skip a layer's adapter in a step"),
)


def _fail(message: str) -> TrainingInputError:
    return TrainingInputError(message)


def check_numbers(args: Any, rules: Iterable[Rule] = RULES) -> None:
    for name, ok, need in rules:
        value = getattr(args, name, None)
        if value is None:
            continue
        if (isinstance(value, float) and not math.isfinite(value)) or not ok(value):
            raise _fail(f"--{name} {value}: must be {need}")
    if args.decompose_factor == 0 or args.decompose_factor < -1:
        raise _fail(f"--decompose_factor {args.decompose_factor}: must be -1 (split near the square root) "
                    "or a positive integer")
    if args.resolution <= 0 or args.resolution % 8:
        raise _fail(f"--resolution {args.resolution}: must be a positive multiple of 8 (e.g. 512 for SD1.x, "
                    "768 for SD2.x, 1024 for SDXL)")


def check_names(args: Any) -> None:
    from diffusers.optimization import SchedulerType

    from .targets import denoiser_targets

    schedules = [s.value for s in SchedulerType]
    if args.lr_scheduler not in schedules:
        raise _fail(f"--lr_scheduler {args.lr_scheduler!r}: unknown; choose one of {', '.join(schedules)}")
    if denoiser_targets(args) == []:
        raise _fail("--unet_target_modules is empty; give a preset (attn, attn-ff, full) or module names"
                    if getattr(args, "family", "sd") == "sd" else
                    "--lora_layers is empty; give a preset (default, attn) or module names")
    if args.train_text_encoder and not [t for t in args.te_target_modules.split(",") if t.strip()]:
        raise _fail("--te_target_modules is empty; give module names such as q_proj,k_proj,v_proj,out_proj")
    if getattr(args, "dreambooth", False) and not args.instance_prompt.strip():
        raise _fail('--instance_prompt is empty; give the prompt of the subject, e.g. "a photo of sks dog"')


def _folder_argument(name: str, path: str | None) -> None:
    if path is None:
        return
    if not os.path.exists(path):
        raise InputNotFoundError(f"--{name} {path}: no such folder")
    if not os.path.isdir(path):
        raise _fail(f"--{name} {path}: is a file; give the folder that holds the images")


def check_paths(args: Any) -> None:
    """The model, data and output folders (before anything is loaded or written)."""
    model = args.pretrained_model_name_or_path
    looks_local = model.startswith((".", "/", "~", "\\")) or model.count("/") > 1 or os.path.exists(model)
    if looks_local and not os.path.isdir(model):
        raise (InputNotFoundError if not os.path.exists(model) else TrainingInputError)(
            f"--pretrained_model_name_or_path {model}: {'is a file' if os.path.exists(model) else 'no such folder'}"
            "; give a diffusers pipeline folder (with model_index.json) or a hub id such as org/name")
    if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "model_index.json")):
        raise _fail(f"--pretrained_model_name_or_path {model}: no model_index.json, so not a diffusers pipeline "
                    "folder; give the folder that `save_pretrained` wrote (or a hub id)")
    for name in ("train_data_dir", "instance_data_dir"):
        _folder_argument(name, getattr(args, name, None))
    if getattr(args, "with_prior_preservation", False):
        _folder_argument("class_data_dir", args.class_data_dir)
    out = os.path.abspath(args.output_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        raise _fail(f"--output_dir {args.output_dir}: is a file; give a folder (it is created if missing)")
    parent = out
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise _fail(f"--output_dir {args.output_dir}: {parent} is a file, so the folder cannot be created")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise _fail(f"--output_dir {args.output_dir}: {parent} is not writable; choose another folder")


def check_sources(args: Any) -> None:
    if getattr(args, "dreambooth", False):
        if args.with_prior_preservation and not (args.class_data_dir and args.class_prompt):
            raise _fail("--with_prior_preservation needs --class_data_dir (a folder of class images) and "
                        '--class_prompt (e.g. "a photo of dog")')
        return
    if not args.train_data_dir and not args.dataset_name:
        raise _fail("give --train_data_dir (an image folder) or --dataset_name (a `datasets` dataset)")
    if args.train_data_dir and args.dataset_name:
        raise _fail("give one of --train_data_dir and --dataset_name, not both")


def check_args(args: Any) -> None:
    """Every check that needs no model: numbers, names, folders, the checkpoint to resume from."""
    from .base_precision import check_base_precision

    check_base_precision(getattr(args, "base_precision", "none"))  # its quantizer installed, before the data
    from .caches import check_memory_args
    from .fsdp import check_fsdp_args

    check_fsdp_args(args)  # how it was launched, before the folders are read
    check_sources(args)
    check_numbers(args)
    check_names(args)
    check_paths(args)
    check_memory_args(args)
    if args.resume_from_checkpoint and args.resume_from_checkpoint != "latest":
        checkpoint.resolve(args.output_dir, args.resume_from_checkpoint)


def min_resolution(pipe: Any) -> tuple[int, int]:
    """(the step resolutions come in, the least resolution) for this pipeline: the VAE shrinks images by
    2^(VAE levels - 1) (8 for SD and SDXL) and the UNet its latents by 2^(UNet levels - 1), which must
    leave at least one latent pixel at the UNet's lowest level (64 px for SD1.x/2.x, 32 px for SDXL);
    a transformer patchifies 2x2 latent pixels (Flux.1 / Flux.2 pack them, SD3's patch_size and Z-Image's are 2),
    so its images come in multiples of 2 · the VAE's factor (16 px for all); the pipelines take multiples of 8.
    Qwen-Image's video VAE (no block_out_channels) halves the image once per entry of its temperal_downsample."""
    video = _video_step(pipe)
    if video is not None:
        return video, video
    config = pipe.vae.config
    blocks = getattr(config, "block_out_channels", None)
    vae_factor = 2 ** (len(blocks) - 1) if blocks is not None else 2 ** len(config.temperal_downsample)
    if getattr(pipe, "unet", None) is None:
        step = max(8, vae_factor * 2)
        return step, step
    unet_factor = 2 ** (len(pipe.unet.config.down_block_types) - 1)
    step = max(8, vae_factor)
    return step, max(step, vae_factor * unet_factor)


def _video_step(pipe: Any) -> int | None:
    """The video pipelines' step: the VAE's spatial factor (Wan's config `scale_factor_spatial`, LTX's
    `spatial_compression_ratio`) times the transformer's spatial patch; None for another pipeline."""
    vae = pipe.vae
    factor = getattr(vae.config, "scale_factor_spatial", None) or getattr(vae, "spatial_compression_ratio", None)
    if not isinstance(factor, int) or getattr(pipe, "unet", None) is not None:
        return None
    patch = pipe.transformer.config.patch_size
    patch = patch[-1] if isinstance(patch, (list, tuple)) else patch
    return max(8, factor * int(patch))


def check_pipeline(pipe: Any, args: Any, family: Any = None) -> None:
    """The loaded pipeline is one of the family's (`family`, a TrainingFamily; default the script's) that can
    train at --resolution, with the text encoders --train_text_encoder asks for."""
    from .. import families
    from .family import training_family

    family = family or training_family(getattr(args, "family", "sd"))
    name = args.pretrained_model_name_or_path
    missing = [c for c in family.required if getattr(pipe, c, None) is None]
    denoiser = getattr(pipe, family.denoiser, None)
    own = families.of_model(denoiser) if denoiser is not None else None
    # a flow script needs the transformer its loss is written for; the UNet scripts take any UNet of the components
    wrong = own.name not in family.members if own is not None else family.flow
    if missing or wrong:
        what = f"without {', '.join(missing)}" if missing else f"with a {type(denoiser).__name__}"
        raise _fail(f"--pretrained_model_name_or_path {name}: a {type(pipe).__name__} {what}; give {family.label}")
    title = " / ".join(families.get(m).title for m in family.members)
    if family.flow and len(family.members) == 1:
        from .flow_models import flow_model

        piece = flow_model(family.name)
        if piece.pipelines and type(pipe).__name__ not in piece.pipelines:
            raise _fail(f"--pretrained_model_name_or_path {name}: a {type(pipe).__name__}; the flow script encodes "
                        f"{title} prompts as "
                        f"{' / '.join(piece.pipelines)} does: give one of those")
    if getattr(args, "train_text_encoder", False) and not family.text_encoders:
        raise _fail(f"--train_text_encoder: {title} trains its "
                    f"{family.denoiser} only (as diffusers' script); leave --train_text_encoder out")
    if family.name == "sd" and args.sdxl and getattr(pipe, "text_encoder_2", None) is None:
        raise _fail(f"--sdxl: {name} has no text_encoder_2, so it is not an SDXL pipeline; leave --sdxl out")
    step, least = min_resolution(pipe)
    if family.flow and len(family.members) == 1:  # Qwen-Image 2.1: 2x2 latent tokens to an image slot
        from .flow_models import FLOW_MODELS

        multiple = getattr(FLOW_MODELS.get(family.name), "latent_multiple", 1)
        step, least = step * multiple, least * multiple
    if args.resolution % step or args.resolution < least:
        raise _fail(f"--resolution {args.resolution}: {name} needs a multiple of {step} of at least {least} "
                    f"(its VAE and {family.denoiser} halve the image {int(math.log2(least))} times)")
    registers = _registers(pipe)
    length = getattr(args, "max_sequence_length", None)
    if registers and length and length % registers:
        raise _fail(f"--max_sequence_length {length}: {name}'s text connectors take a multiple of {registers} tokens "
                    f"(their learnable registers replace the padding in blocks of {registers}), e.g. "
                    f"{-(-length // registers) * registers}")


def _registers(pipe: Any) -> int:
    """The caption length LTX-2's text connectors need a multiple of (LTX2TextConnectors' learnable registers, read,
    never copied, from diffusers 0.42.1's pipelines/ltx2/connectors.py); 0 for a pipeline without them."""
    config = getattr(getattr(pipe, "connectors", None), "config", None)
    counts = [getattr(config, f"{s}_connector_num_learnable_registers", None) for s in ("video", "audio")]
    return math.lcm(*[c for c in counts if c]) if any(counts) else 0


def check_export(pipe: Any, args: Any, family: Any, adapter: str) -> None:
    """--export_format comfyui can write every module of the new adapter on a DiT (Lumina 2's and HunyuanVideo's
    to_q / to_k / to_v one by one have no ComfyUI name): checked before the first step, not after the last."""
    if getattr(args, "export_format", "none") != "comfyui" or family.denoiser != "transformer":
        return
    from ..components import pipeline_components
    from ..export.comfyui import comfyui_unwritable
    from ..families import of_model

    own = of_model(pipe.transformer)
    if own is None:
        return
    missing = comfyui_unwritable(pipeline_components(pipe), adapter, own.name)
    if missing:
        raise _fail(f"--export_format comfyui: {len(missing)} of the adapter's modules have no name ComfyUI loads for "
                    f"{own.title} ({missing[0]}); pass --export_format peft or diffusers, or --lora_layers that leave "
                    "them out")


def check_not_fused(components: dict[str, nn.Module], adapter: str) -> None:
    """AdapterFusedError when `adapter` is fused into any layer: its factors would train against a base
    weight that already holds them, and an unfuse would subtract the wrong update."""
    from ..model import lokr_layers

    fused = [f"{c}.{path}" for c, m in components.items() for path, layer in lokr_layers(m)
             if adapter in getattr(layer, "merged_adapters", ())]
    if fused:
        raise AdapterFusedError(f"adapter {adapter!r} is fused into {len(fused)} layer(s) (first: {fused[0]}); "
                                "unfuse it before training (pipe.unfuse_lokr() or LoKrModel.unmerge_adapter())")
