"""The record of one model family: everything the package knows about it, as data (docs/architecture.md §Adding a
model family). Classes are named by string, never imported: reading a record costs nothing."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

from .tables import OriginalTable

Prediction = Literal["epsilon", "v_prediction", "flow"]


@dataclass(frozen=True)
class Sign:
    """Evidence in a file's keys for the families whose record holds it: a key (or, with `in_width` / `conv`, a
    module holding LoKr factors) matching `pattern` (`re.search`), said in messages as `words` and the name.

    `in_width`: the module's input width read off its factors (in_m · in_n) must be this; `conv`: one of its
    factors is 4-D (a conv). Several families may hold one sign (equal signs are one): it names all of them."""

    pattern: str
    words: str
    in_width: int | None = None
    conv: bool = False

    @property
    def shape(self) -> bool:
        """Read off the factors' shapes (a state dict), not the names alone."""
        return self.in_width is not None or self.conv


@dataclass(frozen=True, eq=False)
class Detection:
    """How a model or a file is told to be of the family (lokr_diffusers/families/detect.py applies the rules).

    `config`: values of the denoiser's config that tell it from the other families of its class (SD1.x / SD2.x /
    SDXL share UNet2DConditionModel and differ in cross_attention_dim); a model none of whose families' values fit
    (a tiny test model) is told by its text encoders. `kind`: module names telling which kind of model a file is
    for, read over every family. `base`: names and factor shapes telling it from the families that share its
    denoiser class."""

    config: Mapping[str, object] = field(default_factory=dict)
    kind: tuple[Sign, ...] = ()
    base: tuple[Sign, ...] = ()


@dataclass(frozen=True)
class Training:
    """How the training scripts (lokr_diffusers/training/) train the family."""

    script: str  # the script that trains it: "sd" (the UNet scripts) or "flow" (flow matching; the family also needs
    #              its piece in lokr_diffusers/training/flow_models.py: latents, prompts, the transformer's call)
    text_encoders: tuple[str, ...]  # what --train_text_encoder trains (those the pipeline has)
    weighting_scheme: str | None = None  # flow matching: --weighting_scheme's default, as diffusers' script
    max_sequence_length: int | None = None  # flow matching: --max_sequence_length's default, as diffusers' script


@dataclass(frozen=True)
class Kohya:
    """How kohya's layout (the files ComfyUI and A1111 load) writes the family."""

    model_version: str  # ss_base_model_version, which A1111 and ComfyUI filter by
    ldm_unet: bool = False  # the UNet under its ldm names (kohya's SDXL scripts), else its diffusers paths
    openclip: tuple[str, ...] = ()  # text encoders A1111 runs as open_clip's (their attention groups completed)
    v2: bool = False  # ss_v2: an SD2.x model


@dataclass(frozen=True, eq=False, kw_only=True)
class ModelFamily:
    """One model family. Every part of the package asks this record (through lokr_diffusers/families/) rather than
    keeping its own table."""

    name: str  # the one spelling: base= / family= arguments, --base, file metadata, test ids
    title: str  # in messages: "SDXL", "FLUX.1"
    pipelines: tuple[str, ...]  # diffusers pipeline classes
    denoiser: str  # the component that denoises: "unet" or "transformer"
    denoiser_class: str  # its diffusers class (subclasses count)
    text_encoders: tuple[str, ...]  # its text-encoder components, in order
    components: tuple[str, ...]  # what its pipelines must hold (optional ones, as SD3's T5, left out)
    variants: tuple[str, ...]  # its full-size models (architectures.VARIANTS), in the order a file is tried
    prediction: tuple[Prediction, ...]  # what its denoiser is trained to predict (the scheduler's prediction_type)
    detect: Detection
    kohya: Kohya
    originals: OriginalTable | None = None  # the original-name table (None: the UNet's ldm names, formats/ldm.py)
    targets: tuple[str, ...] = ()  # the denoiser's default target_modules, PEFT's list form
    roles: Mapping[str, str] = field(default_factory=dict)  # the denoiser's modules by role, full-path regexes
    comfyui_paths: tuple[str, ...] = ()  # the diffusers paths ComfyUI's key map names under `transformer.` (regexes)
    diffusers_lokr: bool = False  # diffusers' own load_lora_weights reads LoKr files of this family
    training: Training | None = None  # None: no training script
    tags: tuple[str, ...] = ()  # model-card tags
    aliases: tuple[str, ...] = ()  # other names the command line takes (--base sd15)
    tiny: str | None = None  # "module:function(seed)" building a tiny pipeline; a `helpers.` module is the tests'
    subsumed: tuple[str, ...] = ()  # full-size models whose files fit one of `variants` too, so never tried
    # keys its files may hold for modules no component we adapt has (LTX-2's text connectors): named in the report
    # of keys that match nothing, so that the reader knows why they were not loaded
    not_adapted: tuple[Sign, ...] = ()
