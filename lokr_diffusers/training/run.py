"""`train(args)`: load the model, add LoKr, train on accelerate, checkpoint, validate, export."""

from __future__ import annotations

import logging
import os
from types import SimpleNamespace
from typing import Any

import torch

from . import checkpoint
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
    write_log,
)
from .output import save_outputs, save_validation_images

logger = logging.getLogger(__name__)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _dataset(args: Any) -> Any:
    from .data import CaptionedImageDataset, DreamBoothDataset, load_hf_dataset, load_image_folder

    if args.dreambooth:
        instance = load_image_folder(args.instance_data_dir)
        cls = load_image_folder(args.class_data_dir) if args.with_prior_preservation else None
        return DreamBoothDataset(instance, args.instance_prompt, cls, args.class_prompt, args.resolution,
                                 center_crop=args.center_crop, random_flip=args.random_flip, seed=args.seed)
    pairs = load_image_folder(args.train_data_dir) if args.train_data_dir else load_hf_dataset(
        args.dataset_name, args.dataset_config_name, "train", args.image_column, args.caption_column, None)
    return CaptionedImageDataset(pairs, args.resolution, center_crop=args.center_crop, random_flip=args.random_flip,
                                 seed=args.seed)


def _batch(dataset: Any, indices: list[int]) -> dict[str, Any]:
    """Collate; DreamBooth items give instance examples, then class examples (the batch's halves)."""
    from .data import collate

    return collate([dataset[i] for i in indices])


def train(args: Any) -> TrainResult:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers import DDPMScheduler, DiffusionPipeline
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from ..pipeline import add_lokr

    world = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(gradient_accumulation_steps=args.gradient_accumulation_steps,
                              mixed_precision=args.mixed_precision, log_with=args.report_to,
                              cpu=world > 1 and not torch.cuda.is_available(),  # torchrun on CPUs: gloo
                              project_config=ProjectConfiguration(args.output_dir,
                                                                  os.path.join(args.output_dir, args.logging_dir)))
    if accelerator.num_processes != world:
        raise RuntimeError(f"launched as {world} processes but accelerate runs {accelerator.num_processes}; "
                           "use `accelerate launch` or set up accelerate's config for this machine")
    set_seed(args.seed)  # the adapters' random init (and anything else drawing from torch's global RNG)
    weight_dtype = DTYPES.get(accelerator.mixed_precision, torch.float32)
    pipe: Any = DiffusionPipeline.from_pretrained(args.pretrained_model_name_or_path, revision=args.revision,
                                                  variant=args.variant)
    pipe.set_progress_bar_config(disable=True)
    sdxl = args.sdxl or getattr(pipe, "text_encoder_2", None) is not None
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    names = ["unet"] + ([c for c in ("text_encoder", "text_encoder_2") if getattr(pipe, c, None) is not None]
                        if args.train_text_encoder else [])
    for c in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if getattr(pipe, c, None) is not None:
            getattr(pipe, c).requires_grad_(False).to(accelerator.device, torch.float32 if c == "vae" else weight_dtype)
    add_lokr(pipe, lokr_configs(args, sdxl), ADAPTER)
    params = {c: trainable_parameters(pipe, [c]) for c in names}
    for ps in params.values():
        for p in ps:
            p.data = p.data.float()  # adapters train in fp32 whatever the base runs in
    if args.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    groups = [{"params": params["unet"], "lr": args.learning_rate}]
    groups += [{"params": params[c], "lr": args.text_encoder_lr or args.learning_rate} for c in names[1:]]
    optimizer = torch.optim.AdamW(groups, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    dataset = _dataset(args)
    procs, rank = accelerator.num_processes, accelerator.process_index
    steps = total_steps(len(dataset), args, procs)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps * procs,
                                 num_training_steps=steps * procs)
    raw = {c: getattr(pipe, c) for c in names}
    models = accelerator.prepare(*raw.values())
    models = models if isinstance(models, tuple) else (models,)
    parts = SimpleNamespace(**{c: getattr(pipe, c) for c in ("vae", "tokenizer", "tokenizer_2", "text_encoder",
                                                              "text_encoder_2") if hasattr(pipe, c)})
    for c, m in zip(raw, models, strict=True):
        setattr(parts, c, m)
    optimizer, lr_scheduler = accelerator.prepare(optimizer, lr_scheduler)
    global_step = 0
    if args.resume_from_checkpoint:
        folder = checkpoint.resolve(args.output_dir, args.resume_from_checkpoint)
        if folder is None:
            logger.warning("no checkpoint in %s; starting from scratch", args.output_dir)
        else:
            global_step = checkpoint.load(folder, raw, ADAPTER, optimizer, lr_scheduler)
            logger.info("resumed from %s at step %d", folder, global_step)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        accelerator.init_trackers("lokr", config={k: v for k, v in vars(args).items()
                                                  if isinstance(v, (int, float, str, bool))})
    result = TrainResult(args.output_dir, global_step)
    per_epoch = steps_per_epoch(len(dataset), args, procs)
    prior = bool(getattr(args, "with_prior_preservation", False))
    progress = tqdm(total=steps, initial=global_step, desc="training LoKr",
                    disable=not accelerator.is_local_main_process)
    for m in models:
        m.train()
    while global_step < steps:
        epoch, offset = divmod(global_step, per_epoch)
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        micro = batches_for_epoch(len(dataset), epoch, args.seed, args.train_batch_size, procs, rank)
        for s in range(offset, per_epoch):
            losses = []
            for k in range(args.gradient_accumulation_steps):
                batch = _batch(dataset, micro[(s * args.gradient_accumulation_steps + k) % len(micro)])
                with accelerator.accumulate(*models):
                    g = step_generator(args.seed, global_step, k, rank)
                    loss = diffusion_loss(parts, noise_scheduler, batch, args, sdxl, g, weight_dtype,
                                          accelerator.device, prior_weight=args.prior_loss_weight if prior else None)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_([p for ps in params.values() for p in ps], args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
                losses.append(accelerator.gather(loss.detach().float().reshape(1)).mean().item())  # all ranks
            global_step += 1
            step_loss = sum(losses) / len(losses)
            result.losses.append(step_loss)
            lr = lr_scheduler.get_last_lr()[0]
            progress.update(1)
            progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}")
            accelerator.log({"loss": step_loss, "lr": lr}, step=global_step)
            if accelerator.is_main_process:
                write_log(loss_log_path(args.output_dir), {"step": global_step, "loss": step_loss, "lr": lr})
                if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
                    checkpoint.save(args.output_dir, global_step, raw, ADAPTER, optimizer, lr_scheduler,
                                    args.checkpoints_total_limit)
            if global_step >= steps:
                break
        if args.validation_prompt and (epoch + 1) % args.validation_epochs == 0 and accelerator.is_main_process:
            save_validation_images(pipe, args, global_step, accelerator)
    progress.close()
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        result.files = save_outputs(pipe, args, sdxl, result)
    result.global_step = global_step
    accelerator.end_training()
    return result
