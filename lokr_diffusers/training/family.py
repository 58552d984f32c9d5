"""What differs between the model families the training scripts train, read off the families' records
(lokr_diffusers/families/: `ModelFamily.training`): which component denoises, which must be there, which text
encoders --train_text_encoder trains, and the loss (loop.diffusion_loss for the UNet's noise / v prediction,
flow.flow_loss for flow matching). A script trains several families (the UNet scripts: SD1.x, SD2.x, SDXL; the flow
script: FLUX.1, SD3.x, FLUX.2 [klein], Z-Image, Qwen-Image, Qwen-Image 2.1, Chroma, Lumina 2): what they share;
`member` narrows it to the one a model is of."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import families


@dataclass(frozen=True)
class TrainingFamily:
    """The families one script (`name`: "sd", "flow") or one family (`name`: "flux", "zimage", ...) trains, as the
    training run sees them."""

    name: str
    members: tuple[str, ...]  # the model families (families.FAMILIES)
    denoiser: str  # the component that carries the main adapter
    required: tuple[str, ...]  # components the pipeline must have (every member's)
    text_encoders: tuple[str, ...]  # trained with --train_text_encoder (those the pipeline has)
    flow: bool  # flow matching (flow.flow_loss), else noise / v prediction (loop.diffusion_loss)
    label: str  # for messages: what --pretrained_model_name_or_path must be
    weighting_scheme: str | None = None  # flow matching: --weighting_scheme's default (None: the members differ)
    max_sequence_length: int | None = None  # flow matching: --max_sequence_length's default (None: they differ)


@functools.cache
def training_family(name: str) -> TrainingFamily:
    """The script `name` from the records whose `training.script` it is, or the one family `name` that a script
    trains (ValueError for neither)."""
    members = families.training_families(name)
    if not members and name in families.FAMILIES and families.get(name).training is not None:
        members = (families.get(name),)
    if not members:
        scripts = sorted({f.training.script for f in families.FAMILIES.values() if f.training is not None})
        raise ValueError(f"no model family trains with the {name!r} scripts; one of {scripts}")
    (denoiser,) = {f.denoiser for f in members}  # one script trains one kind of denoiser
    trainings = [f.training for f in members if f.training is not None]
    required = tuple(c for c in members[0].components if all(c in f.components for f in members))
    text_encoders = tuple(dict.fromkeys(te for t in trainings for te in t.text_encoders))
    pipelines = ", ".join(dict.fromkeys(p for f in members for p in f.pipelines))
    label = f"a pipeline of {' / '.join(f.title for f in members)} ({pipelines})"
    schemes = {t.weighting_scheme for t in trainings}
    lengths = {t.max_sequence_length for t in trainings}
    return TrainingFamily(name, tuple(f.name for f in members), denoiser, required, text_encoders,
                          all("flow" in f.prediction for f in members), label,
                          schemes.pop() if len(schemes) == 1 else None, lengths.pop() if len(lengths) == 1 else None)


def member(family: TrainingFamily, model_index: Mapping[str, Any]) -> TrainingFamily | None:
    """The one family of `family` a model is of, read off its model_index.json (`model_index`): the pipeline class
    (`_class_name`) one of the family's pipelines, else its denoiser's class the family's (a pipeline variant such as
    FluxImg2ImgPipeline). `family` itself when it has one member; None when none fits."""
    if len(family.members) == 1:
        return family
    records = [families.get(m) for m in family.members]
    pipeline = model_index.get("_class_name")
    entry = model_index.get(family.denoiser)
    denoiser = entry[-1] if isinstance(entry, (list, tuple)) and entry else None
    found = [f for f in records if pipeline in f.pipelines] or [f for f in records if denoiser == f.denoiser_class]
    return training_family(found[0].name) if len(found) == 1 else None


# every component a training run may move to its device and dtype: the denoisers, the VAE, the text encoders, and
# LTX-2's text `connectors` (part of its prompt encoding), audio VAE and vocoder (its validation videos' sound)
MOVED: tuple[str, ...] = tuple(dict.fromkeys([*(f.denoiser for f in families.FAMILIES.values()), "vae",
                                              *(te for f in families.FAMILIES.values() for te in f.text_encoders),
                                              "connectors", "audio_vae", "vocoder"]))
FP32: tuple[str, ...] = ("vae", "audio_vae", "vocoder")  # decoders kept in fp32 whatever the run's precision
