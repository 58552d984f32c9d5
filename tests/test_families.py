"""lokr_diffusers/families/: one record per model family, and every "which family" answered from them.

Each record's detection rule recognises its tiny pipeline and its full-size models (built on the meta device);
its classes exist in diffusers; names and aliases are unique; the training scripts' families map onto the records;
and no module outside the registry keeps a table of its own keyed by family or denoiser class."""

from __future__ import annotations

import ast
import functools
import subprocess
import sys
from pathlib import Path
from typing import Any

import diffusers
import pytest
from torch import nn

from lokr_diffusers import families
from lokr_diffusers.architectures import VARIANTS, meta_components
from lokr_diffusers.components import pipeline_components
from lokr_diffusers.families import FAMILIES, ModelFamily
from lokr_diffusers.formats.dit import dit_name_map
from lokr_diffusers.training.family import MOVED, training_family

PACKAGE = Path(__file__).resolve().parents[1] / "lokr_diffusers"
NAMES = list(FAMILIES)
# families without a tiny pipeline, and why
NO_TINY = {"sd2": "its UNet is SD1.x's at other sizes with linear projections: SD1.x's tiny pipeline covers it"}
# DiT families whose diffusers paths ComfyUI's key map takes none of (their files reach ComfyUI by original names)
NO_COMFYUI_PATHS = {"lumina2": "ComfyUI's Lumina2 branch maps Z-Image's diffusers spellings (z_image_to_diffusers)",
                    "hunyuanvideo15": "ComfyUI's HunyuanVideo branch takes Tencent's names, not diffusers paths",
                    "hunyuanvideo": "ComfyUI's HunyuanVideo branch takes Tencent's names, not diffusers paths"}


@functools.cache
def tiny(name: str) -> Any:
    return families.build_tiny(name)


def test_names_are_unique_and_one_spelling() -> None:
    assert len(set(NAMES)) == len(NAMES)
    assert NAMES[:7] == ["sd1", "sd2", "sdxl", "flux", "sd3", "flux2", "zimage"]  # the order files are tried in
    # the order files are tried in (LTX-2 files carry every LTX-Video name but their audio stream's)
    assert NAMES.index("ltxvideo") < NAMES.index("ltx2")
    aliases = [a for f in FAMILIES.values() for a in f.aliases]
    assert len(set(aliases)) == len(aliases) and not set(aliases) & set(NAMES)
    assert families.ALIASES == {**{n: n for n in NAMES}, **{a: f.name for f in FAMILIES.values() for a in f.aliases}}
    assert len({f.title for f in FAMILIES.values()}) == len(NAMES)
    with pytest.raises(ValueError, match="unknown model family 'flux2-klein'"):
        families.get("flux2-klein")


@pytest.mark.parametrize("name", NAMES)
def test_classes_exist_in_diffusers(name: str) -> None:
    f = FAMILIES[name]
    assert isinstance(getattr(diffusers, f.denoiser_class), type)
    assert all(isinstance(getattr(diffusers, p), type) for p in f.pipelines)
    assert f.denoiser in ("unet", "transformer") and f.denoiser in f.components
    assert f.denoiser in MOVED and all(te in MOVED for te in f.text_encoders)
    required_encoders = [c for c in f.components if c.startswith("text_encoder")]
    assert required_encoders == list(f.text_encoders[:len(required_encoders)])  # optional ones last (SD3's T5)


def test_families_of_one_class_share_what_a_model_alone_tells() -> None:
    """of_model gives the first family of a class when the config does not tell (a tiny UNet): whatever is read off
    the model alone must then be the same for all of them."""
    for f in FAMILIES.values():
        for g in FAMILIES.values():
            if f.denoiser_class == g.denoiser_class:
                assert (f.denoiser, f.originals, f.targets, dict(f.roles)) == \
                    (g.denoiser, g.originals, g.targets, dict(g.roles)), (f.name, g.name)
                assert f is g or dict(f.detect.config) != dict(g.detect.config)


@pytest.mark.parametrize("name", NAMES)
def test_the_tiny_pipeline_is_recognised(name: str) -> None:
    f = FAMILIES[name]
    if f.tiny is None:
        assert name in NO_TINY
        return
    pipe = tiny(name)
    comps = pipeline_components(pipe)
    assert f in families.candidates(comps)
    assert families.of_model(comps[f.denoiser]).denoiser_class == f.denoiser_class  # type: ignore[union-attr]
    assert type(pipe).__name__ in f.pipelines
    assert all(getattr(pipe, c, None) is not None for c in f.components)
    scheduler = pipe.scheduler
    if "flow" in f.prediction:
        assert type(scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    else:
        assert scheduler.config.prediction_type in f.prediction


def test_tiny_pipelines_of_one_class_are_told_by_their_text_encoders() -> None:
    assert families.of_components(pipeline_components(tiny("sd1"))) is FAMILIES["sd1"]
    assert families.of_components(pipeline_components(tiny("sdxl"))) is FAMILIES["sdxl"]
    assert [f.name for f in families.candidates(pipeline_components(tiny("sd1")))] == ["sd1", "sd2"]
    assert families.of_components({"text_encoder": nn.Linear(2, 2)}) is None  # no denoiser, no family


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_every_full_size_model_is_its_familys(variant: str) -> None:
    f = families.of_variant(variant)
    comps = meta_components(variant)
    assert families.of_components(comps) is f
    assert families.candidates(comps) == (f,)
    assert families.of_model(comps[f.denoiser]) is f


def test_variants_belong_to_one_family_each() -> None:
    listed = [v for f in FAMILIES.values() for v in (*f.variants, *f.subsumed)]
    assert sorted(listed) == sorted(VARIANTS)
    assert all(f.variants for f in FAMILIES.values())


@pytest.mark.parametrize("name", [n for n in NAMES if FAMILIES[n].tiny is not None])
def test_a_file_of_the_family_is_told_by_its_names(name: str) -> None:
    """A file naming every module of the tiny pipeline's denoiser: in the original layout for a family with an
    original-name table, in diffusers paths for a UNet."""
    f = FAMILIES[name]
    model = pipeline_components(tiny(name))[f.denoiser]
    if f.originals is not None:
        keys = [f"diffusion_model.{o}.lokr_w1" for o in dit_name_map(model).originals]
    else:
        keys = [f"unet.{path}.lokr_w1" for path, m in model.named_modules() if isinstance(m, nn.Linear)]
    found, evidence = families.of_file(keys)
    assert name in found and evidence
    # FLUX.1 / FLUX.2 and LTX-Video / LTX-2 files share most names
    assert all(FAMILIES[g].denoiser_class == f.denoiser_class or {name, g} <= {"flux", "flux2"}
               or {name, g} <= {"ltxvideo", "ltx2"} for g in found)


def test_training_families_come_from_the_records() -> None:
    sd, flux, sd3 = training_family("sd"), training_family("flux"), training_family("sd3")
    assert (sd.members, flux.members, sd3.members) == (("sd1", "sd2", "sdxl"), ("flux",), ("sd3",))
    flow = training_family("flow")  # one script for every flow family; its defaults differ, so are the family's
    assert flow.members == ("flux", "sd3", "flux2", "zimage", "wan", "ltxvideo", "ltx2", "qwenimage", "qwenimage21",
                            "hidream", "chroma", "lumina2", "hunyuanvideo15", "hunyuanvideo")
    assert flow.denoiser == "transformer" and flow.flow
    assert (flow.weighting_scheme, flow.max_sequence_length) == (None, None)
    assert training_family("zimage").text_encoders == training_family("flux2").text_encoders == ()
    assert (sd.denoiser, sd.flow, sd.required) == ("unet", False, ("unet", "vae", "text_encoder", "tokenizer"))
    assert sd.text_encoders == ("text_encoder", "text_encoder_2")
    assert flux.flow and flux.text_encoders == ("text_encoder",)  # diffusers' script never trains T5
    assert (flux.weighting_scheme, flux.max_sequence_length) == ("none", 512)
    assert (sd3.weighting_scheme, sd3.max_sequence_length) == ("logit_normal", 77)
    for f in FAMILIES.values():
        if f.training is not None:
            assert training_family(f.training.script).flow == (f.prediction == ("flow",))
    with pytest.raises(ValueError, match="no model family trains"):
        training_family("no-such-family")


def _string_keys(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Dict):
        return [k.value for k in node.keys if isinstance(k, ast.Constant) and isinstance(k.value, str)]
    return []


def test_no_module_outside_the_registry_keeps_a_family_table() -> None:
    """A dict literal keyed by two or more family names or denoiser classes belongs in a family's record (the
    full-size models of architectures.py are keyed by model, an SD base's named as its family)."""
    keys = set(NAMES) | {f.denoiser_class for f in FAMILIES.values()} | set(families.ALIASES)
    found = []
    for path in PACKAGE.rglob("*.py"):
        if path.parent.name == "families" or path.name == "architectures.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            hits = [k for k in _string_keys(node) if k in keys]
            if len(hits) >= 2:
                found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {hits}")
    assert not found, found


def test_the_registry_is_data() -> None:
    """Reading a record imports neither torch nor diffusers."""
    code = ("import sys, lokr_diffusers.families as f; f.FAMILIES['sdxl'].detect; "
            "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True,
                         cwd=PACKAGE.parent)
    assert out.stdout.strip() == "[]"


def test_every_record_is_complete() -> None:
    for f in FAMILIES.values():
        assert isinstance(f, ModelFamily) and f.title and f.pipelines and f.kohya.model_version and f.prediction
        assert f.detect.kind, f.name  # every family's files can be told by their names
        assert bool(f.targets) != bool(f.roles)  # default targets: a list, or the Linears by role
        assert not f.roles or {"attention", "feed_forward", "norms", "embedders"} == set(f.roles)
        # the ComfyUI writer of a DiT family needs its key map, unless ComfyUI maps none of its diffusers paths, or
        # every original is one whole Linear in its own row order (Wan, LTX: ComfyUI reaches each by its original name)
        assert not (f.comfyui_paths and f.name in NO_COMFYUI_PATHS)
        assert f.originals is None or f.comfyui_paths or f.name in NO_COMFYUI_PATHS or (
            not f.originals.row_names and all(len(r.parts) == 1 and not r.swap for r in f.originals.rules))
