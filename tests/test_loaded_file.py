"""One file, every route: a LoKr file read through any entry point gives the same layers, bit for bit.

A file travels as one `LoadedFile` (tensors, the file's own metadata, layout, source, PEFT config;
docs/architecture.md §Data flow: load a file). Each layout below is loaded by every route that can
carry what it needs, and every LoKr layer's factors, scale, DoRA magnitude and rows must equal
(torch.equal) those the plain `load_lokr_weights(path)` gives. The layouts whose meaning lies beside
the tensors are the point: a PEFT folder (alpha / r and its patterns in adapter_config.json, scale
3.0), our layout with row pieces (the metadata `lokr_shared`), a ComfyUI-rule DoRA (`lokr_dora_rule`).
A bare dict has no metadata and no config: those layouts have no dict route (`NO_DICT`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.dit_files import bare_pipeline, flux_with_row_pieces
from helpers.lycoris_files import VARIANTS, build_lycoris_file
from helpers.sd_adapters import source_pipeline
from helpers.writers import write_adapter
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import lokr_diffusers
from lokr_diffusers import lokr_layers, save_lokr_weights
from lokr_diffusers.io import detect_layout
from lokr_diffusers.loader import pipeline_components, split_adapters
from lokr_diffusers.tiny import make_sd_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one thread (conftest.py)

PEFT_R, PEFT_ALPHA = 2, 6.0  # scale 3.0, with patterns: conv1 r 1 (6.0), to_v alpha 5 (2.5)
PEFT_SCALES = {"conv1": PEFT_ALPHA / 1, "to_v": 5.0 / PEFT_R, None: PEFT_ALPHA / PEFT_R}
LAYOUTS = ("kohya", "lycoris", "simpletuner", "peft", "diffusers", "comfyui", "ours_rows", "comfyui_dora")
ROUTES = ("lokr_path", "lokr_folder", "lokr_dict", "state_dict", "lora_path", "lora_folder", "loaded_file",
          "convert")
NO_DICT = {"peft": "adapter_config.json", "ours_rows": "metadata lokr_shared",
           "comfyui_dora": "metadata lokr_dora_rule"}  # what a bare dict cannot carry


@dataclass(frozen=True)
class Case:
    """A file of one layout on disk: `path` the file, `folder` the folder holding it alone."""

    path: str
    folder: str
    family: str  # "sd" | "flux": the pipeline it loads into


def tiny_pipe(family: str) -> Any:
    return make_sd_pipeline(0) if family == "sd" else bare_pipeline("flux")


def _save(root: Path, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Case:
    folder = root / name
    folder.mkdir()
    save_file(tensors, str(folder / f"{name}.safetensors"), metadata=metadata)
    return Case(str(folder / f"{name}.safetensors"), str(folder), "sd")


def _peft_folder(root: Path) -> Case:
    peft = pytest.importorskip("peft")
    config = peft.LoKrConfig(r=PEFT_R, alpha=PEFT_ALPHA, target_modules=["to_q", "to_v", "conv1", "proj_in"],
                             init_weights=False, use_effective_conv2d=True, rank_pattern={"conv1": 1},
                             alpha_pattern={"to_v": 5})
    torch.manual_seed(3)
    model = peft.get_peft_model(make_sd_pipeline(0).unet, config)
    model.save_pretrained(str(root / "peft"))
    return Case(str(root / "peft" / "adapter_model.safetensors"), str(root / "peft"), "sd")


def _ours_rows(root: Path) -> Case:
    pipe = flux_with_row_pieces(dora=True)
    (root / "ours_rows").mkdir()
    path = pipe.save_lokr_weights(str(root / "ours_rows" / "ours.safetensors"), adapter_name="a",
                                  format="lokr_diffusers")
    return Case(path, str(root / "ours_rows"), "flux")


def _comfyui_dora(root: Path, src: Any) -> Case:
    (root / "comfyui_dora").mkdir()
    path = save_lokr_weights(src, str(root / "comfyui_dora" / "c.safetensors"), adapter_name="src", format="comfyui")
    return Case(path, str(root / "comfyui_dora"), "sd")


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Case]:
    root = tmp_path_factory.mktemp("routes")
    src = source_pipeline(False)
    lycoris = build_lycoris_file(make_sd_pipeline(0), next(v for v in VARIANTS if v.id == "dora_out"),
                                 str(root / "lycoris_build"))
    out = {"kohya": _save(root, "kohya", write_adapter(src, "src", "kohya")),
           "lycoris": _save(root, "lycoris", lycoris.tensors, lycoris.metadata),
           "simpletuner": _save(root, "simpletuner", write_adapter(src, "src", "lycoris")),
           "peft": _peft_folder(root),
           "diffusers": _save(root, "diffusers", write_adapter(src, "src", "diffusers")),
           "comfyui": _save(root, "comfyui", write_adapter(src, "src", "comfyui")),
           "ours_rows": _ours_rows(root),
           "comfyui_dora": _comfyui_dora(root, src)}
    for name in NO_DICT:  # these layouts do carry their meaning beside the tensors
        with safe_open(out[name].path, "pt") as fh:
            meta = fh.metadata() or {}
        assert name == "peft" or NO_DICT[name].split()[-1] in meta, (name, meta)
    return out


# ------------------------------------------------------------------------------------------ routes
def _convert(case: Case, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """convert_lokr_file to our lossless layout, checked against the tiny pipeline's own components (real
    weights, which a ComfyUI-rule DoRA needs) standing in for the full-size base (SD1.x, or FLUX.1's variants)."""
    monkeypatch.setattr("lokr_diffusers.convert.meta_components",
                        lambda base: pipeline_components(tiny_pipe(case.family)))
    return lokr_diffusers.convert_lokr_file(case.path, str(tmp / "converted.safetensors"), to="lokr_diffusers",
                                            base="sd1" if case.family == "sd" else "flux")


def _load(route: str, case: Case, tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    pipe = tiny_pipe(case.family)
    if route == "lokr_path":
        pipe.load_lokr_weights(case.path)
    elif route == "lokr_folder":
        pipe.load_lokr_weights(case.folder)
    elif route == "lokr_dict":
        pipe.load_lokr_weights(load_file(case.path))
    elif route == "state_dict":
        state_dict, metadata, layout = lokr_diffusers.lokr_state_dict(case.path)
        with safe_open(case.path, "pt") as fh:
            assert metadata == (fh.metadata() or {}), "lokr_state_dict gives the file's own metadata"
        assert layout == detect_layout(state_dict)
        pipe.load_lokr_weights(state_dict)
    elif route == "lora_path":
        pipe.load_lora_weights(case.path)
    elif route == "lora_folder":
        pipe.load_lora_weights(case.folder)
    elif route == "loaded_file":
        from lokr_diffusers.io import read_lokr_file

        pipe.load_lokr_weights(read_lokr_file(case.folder))
    else:
        pipe.load_lokr_weights(_convert(case, tmp, monkeypatch))
    return pipe


@dataclass(frozen=True)
class Held:
    """What one LoKr layer holds of its one adapter."""

    factors: dict[str, torch.Tensor]
    scale: float
    dora: torch.Tensor | None
    rows: Any


def _held(pipe: Any) -> dict[str, Held]:
    out: dict[str, Held] = {}
    for component, model in pipeline_components(pipe).items():
        for path, layer in lokr_layers(model):
            (name,) = layer.plans
            dora = layer.dora_scale[name].detach() if name in layer.dora_scale else None
            out[f"{component}.{path}"] = Held({k: v.detach() for k, v in layer.factors(name).items()},
                                              layer.scaling[name], dora, layer.rows.get(name))
    return out


def _assert_same(got: dict[str, Held], want: dict[str, Held]) -> None:
    assert sorted(got) == sorted(want)
    for path, w in want.items():
        g = got[path]
        assert g.scale == w.scale, f"{path}: scale {g.scale} != {w.scale}"
        assert g.rows == w.rows, path
        assert sorted(g.factors) == sorted(w.factors), path
        for k, t in w.factors.items():
            assert g.factors[k].dtype == t.dtype and torch.equal(g.factors[k], t), f"{path}.{k}"
        assert (g.dora is None) == (w.dora is None), f"{path}: dora_scale"
        assert w.dora is None or (g.dora is not None and torch.equal(g.dora, w.dora)), f"{path}.dora_scale"


@pytest.fixture(scope="module")
def references(cases: dict[str, Case]) -> dict[str, dict[str, Held]]:
    """Each layout loaded by `load_lokr_weights(path)`, the route every other one is held to."""
    out = {name: _held(_load("lokr_path", case, Path(), pytest.MonkeyPatch())) for name, case in cases.items()}
    for path, h in out["peft"].items():  # alpha / r from adapter_config.json, with its patterns
        key = next((k for k in PEFT_SCALES if k is not None and path.endswith(k)), None)
        assert h.scale == PEFT_SCALES[key], (path, h.scale)
    assert any(h.rows is not None for h in out["ours_rows"].values())
    assert any(h.dora is not None for h in out["comfyui_dora"].values())
    return out


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_route_gives_the_same_layers(cases: dict[str, Case], references: dict[str, dict[str, Held]],
                                           layout: str, route: str, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    if route in ("lokr_dict", "state_dict") and layout in NO_DICT:
        pytest.skip(f"a bare dict cannot carry {NO_DICT[layout]}")
    case = cases[layout]
    if route == "convert" and layout == "peft":
        case = Case(case.folder, case.folder, case.family)
    _assert_same(_held(_load(route, case, tmp_path, monkeypatch)), references[layout])


# ------------------------------------------------------------------------- what a read gives back
def test_a_read_file_keeps_its_own_metadata_and_says_where_it_came_from(cases: dict[str, Case]) -> None:
    from lokr_diffusers.io import read_lokr_file

    peft = read_lokr_file(cases["peft"].folder)
    with open(os.path.join(cases["peft"].folder, "adapter_config.json"), encoding="utf-8") as fh:
        assert peft.peft_config == json.load(fh)
    assert peft.layout == "peft" and peft.source == cases["peft"].path
    assert peft.config_path == os.path.join(cases["peft"].folder, "adapter_config.json")
    for name in ("peft", "ours_rows", "comfyui_dora"):
        with safe_open(cases[name].path, "pt") as fh:
            own = fh.metadata() or {}
        assert dict(read_lokr_file(cases[name].path).metadata) == own, name
        assert lokr_diffusers.lokr_state_dict(cases[name].path)[1] == own, name
    as_dict = read_lokr_file(load_file(cases["kohya"].path))
    assert as_dict.source == "a state dict" and as_dict.metadata == {} and as_dict.peft_config is None
    assert read_lokr_file(as_dict) is as_dict


def test_inspect_reports_the_scale_the_load_gives(cases: dict[str, Case], monkeypatch: pytest.MonkeyPatch) -> None:
    from lokr_diffusers.cli import inspect_file

    monkeypatch.setattr("lokr_diffusers.convert.meta_components", lambda base: pipeline_components(tiny_pipe("sd")))
    info = inspect_file(cases["peft"].folder, "sd1")
    (adapter,) = info["adapters"].values()
    assert (adapter["scale_min"], adapter["scale_max"]) == (min(PEFT_SCALES.values()), max(PEFT_SCALES.values()))
    assert not any(k.startswith("lokr_diffusers.") for k in info["metadata"])


# ------------------------------------------------------------------ the layout is read off the keys
def test_format_metadata_that_the_keys_contradict_is_ignored(cases: dict[str, Case], tmp_path: Path,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    """A kohya file whose metadata says `format: lokr_diffusers`: the keys decide, with a warning."""
    sd = load_file(cases["kohya"].path)
    assert split_adapters(sd, {"format": "lokr_diffusers"}) == {None: sd}
    path = tmp_path / "claims_ours.safetensors"
    save_file(sd, str(path), metadata={"format": "lokr_diffusers", "format_version": "1"})
    pipe = make_sd_pipeline(0)
    with caplog.at_level(logging.WARNING):
        pipe.load_lokr_weights(str(path), adapter_name="x")
    assert "format" in caplog.text and "lokr_diffusers" in caplog.text and str(path) in caplog.text
    want = _load("lokr_path", cases["kohya"], tmp_path, pytest.MonkeyPatch())
    _assert_same(_held(pipe), _held(want))


def test_a_hub_file_says_which_repo(cases: dict[str, Case], monkeypatch: pytest.MonkeyPatch) -> None:
    from lokr_diffusers.io import read_lokr_file

    monkeypatch.setattr("huggingface_hub.hf_hub_download", lambda repo_id, filename, **kwargs: cases["kohya"].path)
    file = read_lokr_file("org/repo", weight_name="kohya.safetensors")
    assert (file.repo, file.source, file.layout) == ("org/repo", cases["kohya"].path, "kohya")
