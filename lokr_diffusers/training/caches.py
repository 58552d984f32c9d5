"""The training scripts' memory savers: --cache_latents, --cache_text_embeddings, --offload_text_encoders and
--gradient_checkpointing (on the denoiser and on the text encoders that train).

Each keeps the run's loss sequence (tests/test_training_memory.py holds them equal to a run without them):

- --cache_latents: before the first step every dataset item (each DreamBooth instance and class entry) is read once
  and encoded by the VAE exactly as the loss would encode it (the family's own `latents`, through a recorder), and
  the posterior's *parameters* (the VAE's moments, (2C, h, w) or (2C, F, h, w)) are kept on the CPU; the VAE then
  leaves the device. In the loss a stand-in VAE (`CachedVAE`) returns the batch's posterior rebuilt from those
  parameters, and the family samples it (or takes its mode) with the step's own generator, so the draws are those of
  an uncached run. diffusers' scripts cache the posterior too (train_dreambooth_lora_flux.py's latents_cache) and
  sample it per step. The cache holds one entry per item: an item that changes between epochs (a random flip, a
  random crop of an image that is not square at --resolution, a random window of a clip longer than --num_frames)
  is refused, naming it (give --center_crop).
- --cache_text_embeddings: the prompt encodings of every batch of captions the run draws (its micro-batches are a
  function of the seed: loop.batches_for_epoch) are computed once before the first step and kept on the CPU; the
  text encoders then leave the device. A batch's captions are encoded together, as the loss would (some families
  pad to the longest caption of the batch), so the values are the uncached run's. Refused with --train_text_encoder.
- --offload_text_encoders: the text encoders that do not train are kept on the CPU and moved to the device only for
  their forward (a forward pre-hook moves them in, a forward hook moves them out).
For validation the components kept off the device come back to it, and leave again after.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import torch
from torch import Tensor, nn

from .errors import TrainingInputError

logger = logging.getLogger(__name__)
OFF = torch.device("cpu")  # where components off the device wait


def check_memory_args(args: Any) -> None:
    """The combinations the memory savers refuse (TrainingInputError), checked at parsing."""
    if getattr(args, "cache_text_embeddings", False) and getattr(args, "train_text_encoder", False):
        raise TrainingInputError("--cache_text_embeddings with --train_text_encoder: a text encoder that trains "
                                 "encodes the prompts anew each step; leave one of them out")
    if getattr(args, "cache_latents", False) and getattr(args, "random_flip", False):
        raise TrainingInputError("--cache_latents with --random_flip: the cache holds one latent per image, the flip "
                                 "changes it each epoch; leave one of them out")


# ------------------------------------------------------------------------------------------------ moving

def _move(value: Any, device: torch.device) -> Any:
    """`value` (tensors in tuples / lists / dicts, None) with its tensors on `device`."""
    if isinstance(value, Tensor):
        return value.to(device)
    if isinstance(value, (tuple, list)):
        return type(value)(_move(v, device) for v in value)
    if isinstance(value, dict):
        return {k: _move(v, device) for k, v in value.items()}
    return value


def text_encoder_names(pipe: Any) -> list[str]:
    """The pipeline's text encoders: its nn.Module components named text_encoder, text_encoder_2, ..."""
    return [c for c, m in pipe.components.items() if c.startswith("text_encoder") and isinstance(m, nn.Module)]


class _Offloaded:
    """A module kept on the CPU and moved to `device` for each forward (hooks), unless `resident`."""

    def __init__(self, module: nn.Module, device: torch.device) -> None:
        self.module, self.device, self.resident = module, device, False
        module.to(OFF)
        module.register_forward_pre_hook(self._in)
        module.register_forward_hook(self._out)

    def _in(self, module: nn.Module, args: Any) -> None:
        module.to(self.device)

    def _out(self, module: nn.Module, args: Any, output: Any) -> None:
        if not self.resident:
            module.to(OFF)


# ------------------------------------------------------------------------------------------------ latents

class _Recorder:
    """The VAE, recording the posterior its `encode` returned (the cache pass)."""

    def __init__(self, vae: Any) -> None:
        self.__dict__["_vae"] = vae
        self.__dict__["posterior"] = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_vae"], name)

    def encode(self, pixels: Tensor, *args: Any, **kwargs: Any) -> Any:
        out = self.__dict__["_vae"].encode(pixels, *args, **kwargs)
        self.__dict__["posterior"] = out.latent_dist
        return out


class CachedVAE:
    """Stands in for the VAE in the loss: `encode(x)` returns the cached posterior of the batch's next x.shape[0]
    items (`current`, the parameters (B, 2C, ...) set before the loss; x's values are ignored: a family may encode
    the batch at once or a clip at a time, as HunyuanVideo 1.5's), on `device`; every other attribute (config,
    dtype, the latents' statistics) is the real VAE's, kept off the device."""

    current: Tensor | None

    def __init__(self, vae: Any, kind: type, device: torch.device) -> None:
        self.__dict__.update(_vae=vae, _kind=kind, _device=device, current=None, _next=0)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.__dict__["_vae"], name)

    def set_batch(self, parameters: Tensor) -> None:
        self.__dict__.update(current=parameters, _next=0)

    def encode(self, pixels: Tensor, *args: Any, **kwargs: Any) -> Any:
        start, n, current = self.__dict__["_next"], pixels.shape[0], self.current
        total = 0 if current is None else current.shape[0]
        if current is None or start + n > total:
            raise RuntimeError(f"CachedVAE: {n} item(s) asked for, {total - start} left of the batch's {total}")
        self.__dict__["_next"] = start + n
        return SimpleNamespace(latent_dist=self._kind(current[start:start + n].to(self._device)))


def _entries(item: dict[str, Any]) -> list[dict[str, Any]]:
    return [item["instance"], *([item["class"]] if "class" in item else [])] if "instance" in item else [item]


def _sources(dataset: Any, i: int) -> list[Any]:
    """The image / clip sources of item i, in its entries' order (data.py / clips.py datasets)."""
    if hasattr(dataset, "pairs"):
        return [dataset.pairs[i][0]]
    found = [dataset.instance_images[i % len(dataset.instance_images)]]
    if dataset.class_images is not None:
        found.append(dataset.class_images[i % len(dataset.class_images)])
    return found


def _varies(dataset: Any, entry: dict[str, Any], source: Any) -> str | None:
    """Why the entry changes between epochs (its random crop or clip window), or None."""
    from .data import resized_size

    transform = dataset.transform
    if transform.center_crop:
        return None
    r = transform.resolution
    h, w = entry["original_size"]
    if resized_size(h, w, r) != (r, r):
        return f"it is not square at --resolution {r}, so each epoch crops it at a random place"
    frames = getattr(dataset, "num_frames", None)
    if frames is not None and isinstance(source, (str, os.PathLike)):
        from .clips import clip_length

        if clip_length(os.fspath(source)) > frames:
            return f"it has more frames than --num_frames {frames}, so each epoch takes a random window"
    return None


class LatentCache:
    """Every dataset item with its pixels replaced by the VAE posterior's parameters (on the CPU)."""

    def __init__(self, items: list[dict[str, Any]], vae: CachedVAE) -> None:
        self.items, self.vae = items, vae

    def batch(self, indices: list[int]) -> dict[str, Any]:
        """The collated batch of these items; the stand-in VAE set to their posterior, pixels a placeholder."""
        from .data import collate

        batch = collate([self.items[i] for i in indices])
        self.vae.set_batch(batch["pixel_values"])
        batch["pixel_values"] = torch.zeros(len(batch["caption"]), 3, 1, 1)
        return batch


def build_latent_cache(dataset: Any, vae: nn.Module, encode: Callable[[Any, Tensor], Any], dtype: torch.dtype,
                       device: torch.device) -> LatentCache:
    """Read every item (epoch 0) and keep its posterior's parameters; TrainingInputError for an item that changes
    between epochs. `encode(vae, pixels (1, 3, ...))`: what the loss does with the VAE (the family's latents)."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(0)
    items, kind = [], None
    with torch.no_grad():
        for i in range(len(dataset)):
            item = dataset[i]
            for entry, source in zip(_entries(item), _sources(dataset, i), strict=True):
                why = _varies(dataset, entry, source)
                if why is not None:
                    raise TrainingInputError(f"--cache_latents: {source}: {why}; give --center_crop (or leave "
                                             "--cache_latents out)")
                recorder = _Recorder(vae)
                encode(recorder, entry["pixel_values"].unsqueeze(0).to(device=device, dtype=dtype))
                kind = type(recorder.posterior)
                entry["pixel_values"] = recorder.posterior.parameters[0].detach().to(OFF)
            items.append(item)
    assert kind is not None
    return LatentCache(items, CachedVAE(vae, kind, device))


# ------------------------------------------------------------------------------------------------ prompts

def _item_captions(dataset: Any, i: int) -> tuple[list[str], list[str]]:
    """(the captions of item i's instance / plain entry, of its class entry) without reading its image."""
    if hasattr(dataset, "pairs"):
        return [dataset.pairs[i][1]], []
    return [dataset.instance_prompt], [dataset.class_prompt] if dataset.class_images is not None else []


def caption_batches(dataset: Any, args: Any, steps: int, processes: int, process: int) -> list[tuple[str, ...]]:
    """The distinct caption batches (in collate's order) this process draws in the run's `steps` optimizer steps."""
    from .loop import batches_for_epoch, epochs_needed, steps_per_epoch

    per_epoch = steps_per_epoch(len(dataset), args, processes)
    accumulation = args.gradient_accumulation_steps
    found: dict[tuple[str, ...], None] = {}
    for epoch in range(epochs_needed(steps, per_epoch)):
        micro = batches_for_epoch(len(dataset), epoch, args.seed, args.train_batch_size, processes, process)
        for index in range(per_epoch):
            for k in range(accumulation):
                pairs = [_item_captions(dataset, i) for i in micro[(index * accumulation + k) % len(micro)]]
                found[tuple(c for first, _ in pairs for c in first) + tuple(c for _, cls in pairs for c in cls)] = None
    return list(found)


class PromptCache(dict):  # type: ignore[type-arg]
    """Encoded caption batches (on the CPU) by their captions; `get` gives one on `device`. Every batch the run draws
    is in it: a missing one is an error (the text encoders are off the device)."""

    def __init__(self, device: torch.device) -> None:
        super().__init__()
        self.device = device

    def get(self, key: Any, default: Any = None) -> Any:
        if key not in self:
            raise RuntimeError(f"--cache_text_embeddings: the captions {key!r} were not cached")
        return _move(self[key], self.device)


# ------------------------------------------------------------------------------------------------ the run

class MemorySavers:
    """What the options set up for one run: the latent cache, the prompt cache, the modules kept off the device."""

    def __init__(self) -> None:
        self.latents: LatentCache | None = None
        self.prompts: PromptCache | None = None
        self.offloaded: list[_Offloaded] = []
        self.away: list[nn.Module] = []  # moved off the device for good (the cached VAE, the cached encoders)
        self.device = OFF

    def batch(self, dataset: Any, indices: list[int]) -> dict[str, Any]:
        from .data import collate

        return self.latents.batch(indices) if self.latents is not None else collate([dataset[i] for i in indices])

    @contextlib.contextmanager
    def resident(self) -> Iterator[None]:
        """Every component kept off the device back on it (validation), moved off again after."""
        for o in self.offloaded:
            o.resident = True
            o.module.to(self.device)
        for m in self.away:
            m.to(self.device)
        try:
            yield
        finally:
            for m in self.away:
                m.to(OFF)
            for o in self.offloaded:
                o.resident = False
                o.module.to(OFF)


def enable_gradient_checkpointing(pipe: Any, names: list[str]) -> None:
    """--gradient_checkpointing: the denoiser (`names[0]`, diffusers' enable_gradient_checkpointing) and the text
    encoders that train (transformers' gradient_checkpointing_enable, non-reentrant: the reentrant kind gives no
    gradient to adapters inside a layer whose input needs none, as a frozen embedding's output)."""
    denoiser, *encoders = names
    getattr(pipe, denoiser).enable_gradient_checkpointing()
    for c in encoders:
        module = getattr(pipe, c)
        if hasattr(module, "activation_checkpointing_enable"):  # transformers 5's name
            module.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        elif hasattr(module, "gradient_checkpointing_enable"):
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def prepare_memory(args: Any, s: Any, dataset: Any, steps: int) -> MemorySavers:
    """Set up --cache_latents / --cache_text_embeddings / --offload_text_encoders on the session `s` (run.Session):
    its `parts.vae` becomes the stand-in, its `prompts` the full prompt cache; components moved off the device."""
    memory = MemorySavers()
    accelerator = s.accelerator
    device = memory.device = accelerator.device
    encoders = text_encoder_names(s.pipe)
    if getattr(args, "cache_text_embeddings", False):
        prompts = memory.prompts = PromptCache(device)
        batches = caption_batches(dataset, args, steps, accelerator.num_processes, accelerator.process_index)
        with torch.no_grad():
            for captions in batches:
                prompts[captions] = _move(_encode(args, s, list(captions), device), OFF)
        logger.info("--cache_text_embeddings: %d caption batch(es) encoded; the text encoders leave the device",
                    len(batches))
        s.prompts = prompts
        for c in encoders:
            memory.away.append(getattr(s.pipe, c).to(OFF))
    elif getattr(args, "offload_text_encoders", False):
        for c in encoders:
            if c not in s.raw:  # an encoder that trains stays (its gradients are on the device)
                memory.offloaded.append(_Offloaded(getattr(s.pipe, c), device))
        logger.info("--offload_text_encoders: %s kept on the CPU, moved to the device to encode",
                    ", ".join(c for c in encoders if c not in s.raw) or "no text encoder (each one trains)")
    if getattr(args, "cache_latents", False):
        vae = s.pipe.vae
        dtype = vae.dtype if s.family.flow else s.weight_dtype  # as flow_loss / diffusion_loss feed the VAE
        memory.latents = build_latent_cache(dataset, vae, _latents_fn(s), dtype, device)
        logger.info("--cache_latents: %d item(s) encoded; the VAE leaves the device", len(memory.latents.items))
        s.parts.vae = memory.latents.vae
        memory.away.append(vae.to(OFF))
    if memory.away and torch.cuda.is_available():
        torch.cuda.empty_cache()
    return memory


def _latents_fn(s: Any) -> Callable[[Any, Tensor], Any]:
    if not s.family.flow:
        return lambda vae, pixels: vae.encode(pixels)  # loop.diffusion_loss's encoding
    from .flow_models import flow_model

    model = flow_model(s.family.name)
    return lambda vae, pixels: model.latents(vae, pixels, torch.Generator())


def _encode(args: Any, s: Any, captions: list[str], device: torch.device) -> Any:
    """The captions' encoding as the loss makes it (loop.encode_prompts, or the family's `encode`)."""
    if not s.family.flow:
        from .loop import encode_prompts

        return encode_prompts(s.parts, captions, s.sdxl, device)
    from .flow_models import flow_model

    return flow_model(s.family.name).encode(s.parts, captions, args, device)
