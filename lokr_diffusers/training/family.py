"""What differs between the model families the training scripts train, read off the families' records
(lokr_diffusers/families/: `ModelFamily.training`): which component denoises, which must be there, which text
encoders --train_text_encoder trains, and the loss (loop.diffusion_loss for the UNet's noise / v prediction,
flow.flow_loss for Flux.1 and SD3.x's flow matching). One script trains several families (the UNet scripts:
SD1.x, SD2.x, SDXL): what they share."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from .. import families


@dataclass(frozen=True)
class TrainingFamily:
    """The families one script (`name`: "sd", "flux", "sd3") trains, as the training run sees them."""

    name: str
    members: tuple[str, ...]  # the model families (families.FAMILIES)
    denoiser: str  # the component that carries the main adapter
    required: tuple[str, ...]  # components the pipeline must have (every member's)
    text_encoders: tuple[str, ...]  # trained with --train_text_encoder (those the pipeline has)
    flow: bool  # flow matching (flow.flow_loss), else noise / v prediction (loop.diffusion_loss)
    label: str  # for messages: what --pretrained_model_name_or_path must be
    weighting_scheme: str | None = None  # flow matching: --weighting_scheme's default
    max_sequence_length: int | None = None  # flow matching: --max_sequence_length's default


@functools.cache
def training_family(name: str) -> TrainingFamily:
    """The script family `name` from the records whose `training.script` it is (ValueError for none)."""
    members = families.training_families(name)
    if not members:
        scripts = sorted({f.training.script for f in families.FAMILIES.values() if f.training is not None})
        raise ValueError(f"no model family trains with the {name!r} scripts; one of {scripts}")
    (denoiser,) = {f.denoiser for f in members}  # one script trains one kind of denoiser
    trainings = [f.training for f in members if f.training is not None]
    required = tuple(c for c in members[0].components if all(c in f.components for f in members))
    text_encoders = tuple(dict.fromkeys(te for t in trainings for te in t.text_encoders))
    pipelines = ", ".join(dict.fromkeys(p for f in members for p in f.pipelines))
    label = f"a pipeline of {' / '.join(f.title for f in members)} ({pipelines})"
    return TrainingFamily(name, tuple(f.name for f in members), denoiser, required, text_encoders,
                          all("flow" in f.prediction for f in members), label, trainings[0].weighting_scheme,
                          trainings[0].max_sequence_length)


# every component a training run may move to its device and dtype: the denoisers, the VAE, the text encoders
MOVED: tuple[str, ...] = tuple(dict.fromkeys([*(f.denoiser for f in families.FAMILIES.values()), "vae",
                                              *(te for f in families.FAMILIES.values() for te in f.text_encoders)]))
