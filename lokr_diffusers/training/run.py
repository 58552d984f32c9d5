"""`train(args)`: check the data, load the model, add LoKr, train on accelerate, checkpoint, validate,
export. `main()` is the scripts' entry point: bad input exits like argparse (one line, code 2).

Order matters for failures: the arguments are checked at parsing, the data folders are read and every
image decoded before the model loads, the pipeline and a checkpoint to resume from are checked before
the first step; the output folder is created only after all of that, so a run refused for its input
leaves nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from .. import families
from ..sharding import shard_lokr_model
from . import checkpoint, fsdp
from .args import build_parser, flow_defaults, parse_with
from .base_precision import quantize_base
from .caches import MemorySavers, enable_gradient_checkpointing, prepare_memory
from .checks import check_export, check_not_fused, check_pipeline
from .errors import TrainingInputError
from .family import FP32, MOVED, TrainingFamily, member, training_family
from .flow import flow_loss
from .loop import (
    ADAPTER,
    TrainResult,
    batches_for_epoch,
    diffusion_loss,
    lokr_configs,
    loss_log_path,
    step_generator,
    steps_per_epoch,
    total_steps,
    trainable_parameters,
    trim_log,
    write_log,
)
from .output import save_outputs, save_validation_images

logger = logging.getLogger(__name__)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def main(description: str, dreambooth: bool, argv: list[str] | None = None, family: str = "sd") -> TrainResult:
    """Parse, check and train; a TrainingInputError (bad argument, data or checkpoint, all raised
    before the first step) exits as argparse does: `error: ...` and exit code 2, no traceback.
    family: the script, "sd" (SD1.x/2.x/SDXL) or "flow" (every flow-matching family, told from the model), or one
    family of a script ("flux", "sd3", ...: that one only; training/family.py)."""
    parser: argparse.ArgumentParser = build_parser(description, dreambooth, family)
    args = parse_with(parser, dreambooth, argv)
    try:
        return train(args)
    except TrainingInputError as e:
        parser.error(str(e))


FLOW_DESCRIPTION = ("DreamBooth with LoKr for the flow-matching models (FLUX.1, SD3.x, FLUX.2 [klein], Z-Image, "
                    "Qwen-Image, Chroma, Lumina 2, HiDream-I1; the video models Wan, LTX-Video, LTX-2 (video only), "
                    "HunyuanVideo and HunyuanVideo 1.5 on clips; the family told from the model folder), with prior "
                    "preservation")


def flow_cli(argv: list[str] | None = None) -> int:
    """The `lokr-diffusers-train-flow` command (examples/train_dreambooth_lokr_flow.py; the _flux / _sd3 scripts are
    its aliases): train, print where the files went; bad input exits with code 2."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    result = main(FLOW_DESCRIPTION, dreambooth=True, argv=argv, family="flow")
    if result.files:
        logger.info("done: %d steps; files: %s", result.global_step, result.files)
    return 0


def build_dataset(args: Any) -> Any:
    """The training dataset, its folders read and every image decoded (bad ones skipped with a
    warning, an error when none is good); text-to-image data must have captions."""
    from .data import CaptionedImageDataset, DreamBoothDataset, load_hf_dataset
    from .folders import check_images, load_image_folder, require_captions

    video = video_model(args)
    if video is not None:  # the video families: clips (training/clips.py)
        from .clips import build_clip_dataset

        return build_clip_dataset(args, video.frames_factor, video.default_frames, families.get(video.family).title)

    def folder(name: str) -> list[tuple[Any, str]]:
        where = f"--{name} {getattr(args, name)}"
        return check_images(load_image_folder(getattr(args, name), argument=f"--{name}"), where)

    if args.dreambooth:
        cls = folder("class_data_dir") if args.with_prior_preservation else None
        return DreamBoothDataset(folder("instance_data_dir"), args.instance_prompt, cls, args.class_prompt,
                                 args.resolution, center_crop=args.center_crop, random_flip=args.random_flip,
                                 seed=args.seed)
    if args.train_data_dir:
        pairs = folder("train_data_dir")
        require_captions(pairs, f"--train_data_dir {args.train_data_dir}")
    else:
        pairs = load_hf_dataset(args.dataset_name, args.dataset_config_name, "train", args.image_column,
                                args.caption_column, None)
        require_captions(pairs, f"--dataset_name {args.dataset_name}", f"fill its {args.caption_column!r} column "
                                "or name the caption column with --caption_column")
    return CaptionedImageDataset(pairs, args.resolution, center_crop=args.center_crop, random_flip=args.random_flip,
                                 seed=args.seed)


def video_model(args: Any) -> Any:
    """The flow piece of the video family (flow_video.py) the model folder names, None for an image family or a model
    whose model_index.json cannot be read here (_setup then says why)."""
    from diffusers import DiffusionPipeline

    from .flow_models import FLOW_MODELS

    family = training_family(args.family)
    if not family.flow:
        return None
    try:
        found = member(family, dict(DiffusionPipeline.load_config(args.pretrained_model_name_or_path,
                                                                  revision=args.revision)))
    except (OSError, ValueError):
        return None
    piece = FLOW_MODELS.get(found.name) if found is not None else None
    return piece if getattr(piece, "frames_factor", 0) else None


@dataclass
class Session:
    """What the loop works with, once set up."""

    accelerator: Any
    pipe: Any
    family: TrainingFamily
    sdxl: bool
    weight_dtype: torch.dtype
    noise_scheduler: Any
    raw: dict[str, nn.Module]  # the components that train, unwrapped
    models: tuple[Any, ...]  # the same, as accelerate prepared them
    parts: SimpleNamespace  # the pipeline's parts the loss reads, with the prepared models in place
    params: dict[str, list[nn.Parameter]]
    optimizer: Any
    lr_scheduler: Any
    prompts: dict[tuple[str, ...], Any] | None = None  # flow: encoded captions, while no text encoder trains
    memory: MemorySavers | None = None  # --cache_latents, --cache_text_embeddings, --offload_text_encoders
    sharded: bool = False  # FSDP2 (--fsdp or accelerate's plugin): saving and validation are collectives


def _accelerator(args: Any) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    world = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision, log_with=args.report_to,
                              cpu=world > 1 and not torch.cuda.is_available(),  # torchrun on CPUs: gloo
                              project_config=ProjectConfiguration(args.output_dir,
                                                                  os.path.join(args.output_dir, args.logging_dir)))
    if accelerator.num_processes != world:
        raise RuntimeError(f"launched as {world} processes but accelerate runs {accelerator.num_processes}; "
                           "use `accelerate launch` or set up accelerate's config for this machine")
    # as diffusers' training scripts do: the main process tells what it does, the others only errors
    from .. import logs

    (logs.set_verbosity_info if accelerator.is_local_main_process else logs.set_verbosity_error)()
    return accelerator


def _cannot_load(args: Any, e: Exception) -> TrainingInputError:
    return TrainingInputError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: cannot "
                              f"load it ({type(e).__name__}: {str(e).splitlines()[0]})")


def model_family(args: Any) -> tuple[TrainingFamily, dict[str, Any]]:
    """(the family the run trains, the model's model_index.json). The flow script's family is the one the model
    folder names (training/family.py `member`), and the flow options left to the family take its defaults."""
    from diffusers import DiffusionPipeline

    family = training_family(args.family)
    if not family.flow:
        return family, {}
    try:
        index = dict(DiffusionPipeline.load_config(args.pretrained_model_name_or_path, revision=args.revision))
    except (OSError, ValueError) as e:
        raise _cannot_load(args, e) from e
    found = member(family, index)
    if found is None:
        entry = index.get(family.denoiser)
        what = f"with a {entry[-1]}" if isinstance(entry, (list, tuple)) and entry else f"without {family.denoiser}"
        raise TrainingInputError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: a "
                                 f"{index.get('_class_name')} {what}; give {family.label}")
    flow_defaults(args, found)
    args.model_family = found.name  # what the family-dependent options (--lora_layers attn) resolve for
    return found, index


def _load_pipeline(args: Any, device: torch.device, weight_dtype: torch.dtype) -> tuple[Any, bool, TrainingFamily]:
    from diffusers import DiffusionPipeline

    family, index = model_family(args)
    no_t5 = getattr(args, "no_t5", False) and "text_encoder_3" in index
    without_t5 = {"text_encoder_3": None, "tokenizer_3": None} if no_t5 else {}
    piece = None
    if family.flow:
        from .flow_models import FLOW_MODELS

        piece = FLOW_MODELS[family.name]
    supplied = set(without_t5) | (piece.supplies(args) if piece is not None else set())
    absent = [c for c in family.required if c not in supplied and index and not (index.get(c) or [None])[0]]
    if absent:  # a folder saved without them (HiDream-I1's Llama): diffusers refuses it with a long list
        hint = f" ({piece.missing_hint})" if piece is not None and piece.missing_hint else ""
        raise TrainingInputError(f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path}: a "
                                 f"{index.get('_class_name')} without {', '.join(absent)}{hint}; give {family.label}")
    try:
        given = {**without_t5, **(piece.load_components(args) if piece is not None else {})}
    except (OSError, ValueError) as e:
        raise _cannot_load(args, e) from e
    try:
        pipe: Any = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision,
                                                      variant=args.variant, **given)
    except (OSError, ValueError) as e:
        raise _cannot_load(args, e) from e
    check_pipeline(pipe, args, family)
    pipe.set_progress_bar_config(disable=True)
    for c in MOVED:
        if getattr(pipe, c, None) is not None:
            getattr(pipe, c).requires_grad_(False).to(device, torch.float32 if c in FP32 else weight_dtype)
    sdxl = args.family == "sd" and (args.sdxl or getattr(pipe, "text_encoder_2", None) is not None)
    return pipe, sdxl, family


def _setup(args: Any, steps: int) -> Session:
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
    from diffusers.optimization import get_scheduler

    from ..pipeline import add_lokr

    accelerator = _accelerator(args)
    set_seed(args.seed)  # the adapters' random init (and anything else drawing from torch's global RNG)
    weight_dtype = DTYPES.get(accelerator.mixed_precision, torch.float32)
    pipe, sdxl, family = _load_pipeline(args, accelerator.device, weight_dtype)
    denoiser = _denoiser(args, pipe, family)
    names = [denoiser] + ([c for c in family.text_encoders if getattr(pipe, c, None) is not None]
                          if args.train_text_encoder else [])
    # the frozen denoiser, and the frozen text encoders that stay loaded (every one no LoKr trains on)
    for c in [denoiser, *(c for c in family.text_encoders if c not in names and getattr(pipe, c, None) is not None)]:
        quantize_base(getattr(pipe, c), args.base_precision, weight_dtype, accelerator.device, c)
    add_lokr(pipe, lokr_configs(args, names), ADAPTER)
    check_export(pipe, args, family, ADAPTER)
    fsdp.check_fsdp_run(accelerator, names)
    for c in names:
        for p in trainable_parameters(pipe, [c]):
            p.data = p.data.float()  # adapters train in fp32 whatever the base runs in
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(pipe, names)
    if getattr(args, "fsdp", False):  # the blocks, then the root: the factors become this process's rows
        shard_lokr_model(getattr(pipe, denoiser))
    params = {c: trainable_parameters(pipe, [c]) for c in names}
    optimizer = _optimizer(args, params, names)
    procs = accelerator.num_processes
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * procs,
                                 num_training_steps=steps * procs)
    raw = {c: getattr(pipe, c) for c in names}
    if getattr(args, "fsdp", False):  # sharded already: accelerate would wrap it in DDP
        models: tuple[Any, ...] = tuple(raw.values())
    elif fsdp.uses_fsdp(accelerator):  # accelerate's FSDP2 plugin: the model with its optimizer, in one call
        model, optimizer = fsdp.prepare(accelerator, raw[denoiser], optimizer)
        models = (model,)
        params = {denoiser: trainable_parameters(pipe, [denoiser])}  # the sharded Parameters accelerate made
    else:
        prepared = accelerator.prepare(*raw.values())
        models = prepared if isinstance(prepared, tuple) else (prepared,)
    parts = SimpleNamespace(**pipe.components)  # every component a family's piece may call (encoders, processors)
    parts.pipeline = pipe  # and the pipeline's settings (HunyuanVideo 1.5's system message)
    parts.config = pipe.config  # what a family's piece reads off the pipeline (Wan's boundary_ratio, expand_timesteps)
    for c, m in zip(raw, models, strict=True):
        setattr(parts, c, m)
    if denoiser == "transformer_2":
        parts.transformer = parts.transformer_2  # the one the loss calls: Wan 2.2's second expert when it trains
    if fsdp.uses_fsdp(accelerator):
        lr_scheduler = accelerator.prepare(lr_scheduler)
    else:
        optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    scheduler_cls = FlowMatchEulerDiscreteScheduler if family.flow else DDPMScheduler
    return Session(accelerator, pipe, family, sdxl, weight_dtype, scheduler_cls.from_config(pipe.scheduler.config),
                   raw, models, parts, params, optimizer, lr_scheduler, None if len(names) > 1 else {},
                   sharded=fsdp.sharded(args, accelerator))


def _optimizer(args: Any, params: dict[str, list[nn.Parameter]], names: list[str]) -> torch.optim.Optimizer:
    """AdamW over the denoiser's factors (--learning_rate) and each trained text encoder's (--text_encoder_lr)."""
    groups = [{"params": params[names[0]], "lr": args.learning_rate}]
    groups += [{"params": params[c], "lr": args.text_encoder_lr or args.learning_rate} for c in names[1:]]
    return torch.optim.AdamW(groups, betas=(args.adam_beta1, args.adam_beta2), weight_decay=args.adam_weight_decay,
                             eps=args.adam_epsilon)


def _denoiser(args: Any, pipe: Any, family: TrainingFamily) -> str:
    """The component that trains: the family's denoiser, or Wan 2.2 A14B's low-noise expert with
    --train_transformer_2 (TrainingInputError for a pipeline without one)."""
    if not getattr(args, "train_transformer_2", False):
        return family.denoiser
    if getattr(pipe, "transformer_2", None) is None or getattr(pipe.config, "boundary_ratio", None) is None:
        raise TrainingInputError(f"--train_transformer_2: {args.pretrained_model_name_or_path} has no second expert "
                                 "(transformer_2 and boundary_ratio, as Wan 2.2 A14B); leave it out")
    return "transformer_2"


def _resume(args: Any, s: Session) -> int:
    """The step to start from: 0, or the resumed checkpoint's (CheckpointError if it does not fit)."""
    if not args.resume_from_checkpoint:
        return 0
    folder = checkpoint.resolve(args.output_dir, args.resume_from_checkpoint)
    if folder is None:
        logger.warning("no complete checkpoint in %s; starting from scratch", args.output_dir)
        return 0
    step = checkpoint.load(folder, s.raw, ADAPTER, s.optimizer, s.lr_scheduler)
    logger.info("resumed from %s at step %d", folder, step)
    return step


def train(args: Any) -> TrainResult:
    dataset = build_dataset(args)
    procs = int(os.environ.get("WORLD_SIZE", "1"))
    steps = total_steps(len(dataset), args, procs)
    s = _setup(args, steps)
    global_step = _resume(args, s)
    check_not_fused(s.raw, ADAPTER)
    s.memory = prepare_memory(args, s, dataset, steps)  # before the output folder: a refused item leaves nothing
    accelerator = s.accelerator
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        if args.resume_from_checkpoint:
            trim_log(loss_log_path(args.output_dir), global_step)
        accelerator.init_trackers("lokr", config={k: v for k, v in vars(args).items()
                                                  if isinstance(v, (int, float, str, bool))})
    result = TrainResult(args.output_dir, global_step)
    result.global_step = _loop(args, s, dataset, steps, global_step, result)
    accelerator.wait_for_everyone()
    with fsdp.saving(accelerator, s.raw.values(), s.sharded) as writer:  # every process enters: gathers under FSDP
        if writer:
            check_not_fused(s.raw, ADAPTER)
            # a flow script trains one family; the UNet scripts let the pipeline tell (SDXL when trained as one)
            base = "sdxl" if s.sdxl else (s.family.members[0] if len(s.family.members) == 1 else None)
            # Wan 2.2's second expert is written as a transformer, loaded with load_into_transformer_2=True
            source = {"transformer": s.raw["transformer_2"]} if "transformer_2" in s.raw else s.pipe
            result.files = save_outputs(source, args, base, result)
    accelerator.end_training()
    return result


def _loop(args: Any, s: Session, dataset: Any, steps: int, global_step: int, result: TrainResult) -> int:
    """Optimizer steps from `global_step` to `steps`, with logs, checkpoints and validation; the last step."""
    from tqdm.auto import tqdm

    accelerator = s.accelerator
    procs, rank = accelerator.num_processes, accelerator.process_index
    per_epoch = steps_per_epoch(len(dataset), args, procs)
    progress = tqdm(total=steps, initial=global_step, desc="training LoKr",
                    disable=not accelerator.is_local_main_process)
    for m in s.models:
        m.train()
    while global_step < steps:
        epoch, offset = divmod(global_step, per_epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        micro = batches_for_epoch(len(dataset), epoch, args.seed, args.train_batch_size, procs, rank)
        for index in range(offset, per_epoch):
            step_loss = _optimizer_step(args, s, dataset, micro, index, global_step)
            global_step += 1
            result.losses.append(step_loss)
            lr = s.lr_scheduler.get_last_lr()[0]
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            accelerator.log({"loss": step_loss, "lr": lr}, step=global_step)
            if accelerator.is_main_process:
                write_log(loss_log_path(args.output_dir), {"step": global_step, "loss": step_loss, "lr": lr})
            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                _checkpoint(args, s, global_step)
            if global_step >= steps:
                break
        if args.validation_prompt and (epoch + 1) % args.validation_epochs == 0 and (
                s.sharded or accelerator.is_main_process):  # under FSDP every process runs the denoiser
            with s.memory.resident() if s.memory is not None else contextlib.nullcontext():
                save_validation_images(s.pipe, args, global_step, accelerator, next(iter(s.raw)),
                                       write=accelerator.is_main_process)
    progress.close()
    return global_step


def _checkpoint(args: Any, s: Session, step: int) -> None:
    """checkpoint-<step>, written by the main process; under FSDP every process takes part (the adapter's and the
    optimizer's tensors are gathered whole: the files an unsharded run writes)."""
    optimizer_state = fsdp.full_optimizer_state(s.optimizer) if s.sharded else None  # a collective
    with fsdp.saving(s.accelerator, s.raw.values(), s.sharded) as writer:
        if writer:
            check_not_fused(s.raw, ADAPTER)
            checkpoint.save(args.output_dir, step, s.raw, ADAPTER, s.optimizer, s.lr_scheduler,
                            args.checkpoints_total_limit, optimizer_state=optimizer_state)


def _optimizer_step(args: Any, s: Session, dataset: Any, micro: list[list[int]], index: int, step: int) -> float:
    """One optimizer step (its accumulated micro-steps); the mean loss over micro-steps and processes."""
    from .data import collate

    accelerator = s.accelerator
    prior = args.prior_loss_weight if getattr(args, "with_prior_preservation", False) else None
    losses = []
    for k in range(args.gradient_accumulation_steps):
        indices = micro[(index * args.gradient_accumulation_steps + k) % len(micro)]
        batch = s.memory.batch(dataset, indices) if s.memory is not None else collate([dataset[i] for i in indices])
        with accelerator.accumulate(*s.models):
            g = step_generator(args.seed, step, k, accelerator.process_index, accelerator.num_processes)
            if not s.family.flow:
                loss = diffusion_loss(s.parts, s.noise_scheduler, batch, args, s.sdxl, g, s.weight_dtype,
                                      accelerator.device, prior_weight=prior,
                                      prompts=s.memory.prompts if s.memory is not None else None)
            else:
                loss = flow_loss(s.parts, s.noise_scheduler, batch, args, s.family.name, g, s.weight_dtype,
                                 accelerator.device, prior_weight=prior, prompts=s.prompts)
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                accelerator.clip_grad_norm_([p for ps in s.params.values() for p in ps], args.max_grad_norm)
            s.optimizer.step()
            s.lr_scheduler.step()
            s.optimizer.zero_grad()
        losses.append(accelerator.gather(loss.detach().float().reshape(1)).mean().item())  # all ranks
    return sum(losses) / len(losses)
