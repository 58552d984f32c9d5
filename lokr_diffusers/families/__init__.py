"""The model families, one record each, in one registry: SD1.x, SD2.x, SDXL, FLUX.1, SD3.x, FLUX.2 / Klein, Z-Image.

A record (`ModelFamily`, record.py) names the family's pipelines, denoiser and text encoders, its full-size models,
its original-name table (tables.py), default targets, training, how it is detected and its tiny pipeline. The data
of each family is a module of its own (sd.py for the three UNets, flux.py, sd3.py, flux2.py, zimage.py); the
registry (registry.py) lists them; detect.py answers "which family" for a model, a pipeline's components or a
file's names. Every part of the package asks here (docs/architecture.md §Adding a model family).

Data only: importing it imports neither torch nor diffusers (classes are named by string).
"""

from __future__ import annotations

from .detect import candidates, closest, of_components, of_file, of_model, signs
from .record import Detection, Kohya, ModelFamily, Sign, Training
from .registry import ALIASES, FAMILIES, build_tiny, get, of_variant, training_families
from .tables import OriginalTable, RowName, Rule

__all__ = ["ALIASES", "FAMILIES", "Detection", "Kohya", "ModelFamily", "OriginalTable", "RowName", "Rule", "Sign",
           "Training", "build_tiny", "candidates", "closest", "get", "of_components", "of_file", "of_model",
           "of_variant", "signs", "training_families"]
