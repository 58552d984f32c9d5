"""`lokr_to_lora` / `lokr-diffusers convert --to lora`: a LoKr file as a LoRA, through diffusers' own
`load_lora_weights` (the consumer, not our loader): at full rank it gives the LoKr's weights and outputs, at rank R
or an energy its error is the truncated-SVD optimum of ΔW (singular values computed here), with ranks that differ
between modules read right."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

import lokr_diffusers
from lokr_diffusers import LoKrConfig, families
from lokr_diffusers.model import lokr_layers
from lokr_diffusers.pipeline import add_lokr
from lokr_diffusers.tools.lora import lokr_to_lora


def _lokr_file(root: str, family: str, encoders: bool = True, dora: bool = False) -> tuple[str, str, list[str]]:
    """(base folder, LoKr file, adapted components) of the family's tiny pipeline, random factors (r 4)."""
    pipe = families.build_tiny(family)
    base = os.path.join(root, "base")
    pipe.save_pretrained(base)
    f = families.get(family)
    torch.manual_seed(0)
    cfg = LoKrConfig(r=4, alpha=2, init_weights=False)
    comps = [f.denoiser] + ([te for te in f.text_encoders if getattr(pipe, te, None) is not None] if encoders else [])
    add_lokr(pipe, dict.fromkeys(comps, cfg), "k")
    for _, layer in lokr_layers(getattr(pipe, f.denoiser)) if dora else ():  # DoRA on the input axis, as LyCORIS'
        layer.dora_scale["k"] = torch.nn.Parameter(layer.weight.detach().flatten(1).norm(dim=0, keepdim=True) * 1.1)
        layer.commit(layer.state)
    path = os.path.join(root, "k.safetensors")
    pipe.save_lokr_weights(path, adapter_name="k", format="comfyui")
    return base, path, comps


def _weights(pipe: DiffusionPipeline, component: str) -> dict[str, torch.Tensor]:
    """The component's weights after fusing, keyed by the bare model's names."""
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in getattr(pipe, component).state_dict().items()
            if ".lora_" not in k and ".lokr_" not in k and "dora" not in k}


def _deltas(base: str, lokr: str, comps: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Each component's ΔW per weight: the LoKr fused (our loader) minus the base."""
    bare, ref = DiffusionPipeline.from_pretrained(base), DiffusionPipeline.from_pretrained(base)
    ref.load_lokr_weights(lokr)
    ref.fuse_lokr()
    out = {}
    for c in comps:
        w0, w1 = _weights(bare, c), _weights(ref, c)
        out[c] = {k: w1[k] - w0[k] for k in w0 if not torch.equal(w1[k], w0[k])}
    return out


def _through_diffusers(base: str, lora: str, comps: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Each component's ΔW per weight as diffusers' load_lora_weights + fuse_lora gives it."""
    bare, pipe = DiffusionPipeline.from_pretrained(base), DiffusionPipeline.from_pretrained(base)
    pipe.load_lora_weights(lora)
    pipe.fuse_lora(components=comps)
    out = {}
    for c in comps:
        w0, w1 = _weights(bare, c), _weights(pipe, c)
        out[c] = {k: w1[k] - w0[k] for k in w0}
    return out


@pytest.mark.parametrize("family", ["sd1", "flux", pytest.param("sdxl", marks=pytest.mark.slow),
                                    pytest.param("wan", marks=pytest.mark.slow)])
def test_at_full_rank_diffusers_loads_the_lora_as_the_lokr(tmp_path: str, family: str) -> None:
    """Every adapted weight of every component (denoiser and text encoders) within 1e-5 of the LoKr's."""
    has_te_lora = families.get(family).originals is None  # diffusers' LoRA loaders of the DiT families: denoiser
    base, lokr, comps = _lokr_file(str(tmp_path), family, encoders=has_te_lora)
    out = os.path.join(tmp_path, "lora.safetensors")
    report = lokr_to_lora(lokr, out, model=base)
    assert report.error < 1e-5 and max(m.error for m in report.modules) < 1e-5
    want, got = _deltas(base, lokr, comps), _through_diffusers(base, out, comps)
    for c in comps:
        assert want[c], c
        for k, d in got[c].items():
            torch.testing.assert_close(d, want[c].get(k, torch.zeros_like(d)), rtol=0,
                                       atol=1e-5 * max(float(want[c].get(k, d).abs().max()), 1e-3), msg=f"{c}.{k}")


def test_the_outputs_of_the_converted_pipeline_are_the_lokr_ones(tmp_path: str) -> None:
    """SD1: the UNet's and the text encoder's outputs through diffusers' LoRA equal those through the LoKr file."""
    base, lokr, _ = _lokr_file(str(tmp_path), "sd1")
    out = os.path.join(tmp_path, "lora.safetensors")
    lokr_to_lora(lokr, out, model=base)
    ref, pipe = DiffusionPipeline.from_pretrained(base), DiffusionPipeline.from_pretrained(base)
    ref.load_lokr_weights(lokr)
    pipe.load_lora_weights(out)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 100, (1, 8), generator=g)
    x, e = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 8, ref.unet.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        torch.testing.assert_close(pipe.text_encoder(ids)[0], ref.text_encoder(ids)[0], rtol=1e-5, atol=1e-5)
        t = torch.tensor([10])
        torch.testing.assert_close(pipe.unet(x, t, e).sample, ref.unet(x, t, e).sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("how", [{"rank": 3}, {"energy": 0.8}], ids=["rank", "energy"])
def test_a_truncated_lora_has_the_svd_optimum_error_and_diffusers_reads_each_rank_right(tmp_path: str,
                                                                                       how: dict) -> None:
    """Per module the reported error is ‖ΔW − ΔW_r‖ / ‖ΔW‖ of the best rank r (its singular values after r,
    computed here); with an energy the ranks differ between modules, and diffusers' loader applies each module's
    own up · down (the alpha / rank rule read right for every module, text encoders' attention included)."""
    base, lokr, comps = _lokr_file(str(tmp_path), "sdxl")
    out = os.path.join(tmp_path, "lora.safetensors")
    report = lokr_to_lora(lokr, out, model=base, **how)
    deltas = _deltas(base, lokr, comps)
    ranks = {m.rank for m in report.modules}
    assert len(ranks) > 1 if "energy" in how else ranks == {3}
    for m in report.modules:
        d = deltas[m.component][m.path + ".weight"].double()
        s = torch.linalg.svdvals(d.reshape(d.shape[0], -1))
        optimum = math.sqrt(float((s[m.rank:] ** 2).sum())) / float(d.norm())
        assert m.error == pytest.approx(optimum, rel=1e-3, abs=1e-6), m.path
        if "energy" in how:  # the smallest rank that keeps the energy
            kept = torch.cumsum(s ** 2, 0) / (s ** 2).sum()
            assert kept[m.rank - 1] >= 0.8 - 1e-9 and (m.rank == 1 or kept[m.rank - 2] < 0.8)
    sd = load_file(out)
    assert len({float(v) for k, v in sd.items() if k.endswith(".alpha")}) == 1  # one alpha for every module
    got = _through_diffusers(base, out, comps)
    for m in report.modules:
        d = deltas[m.component][m.path + ".weight"]
        err = float((got[m.component][m.path + ".weight"] - d).norm() / d.norm())
        assert err == pytest.approx(m.error, rel=1e-3, abs=1e-5), f"{m.component}.{m.path}"


def test_dora_two_adapters_and_bad_arguments_are_refused_and_nothing_is_written(tmp_path: str) -> None:
    base, lokr, _ = _lokr_file(os.path.join(tmp_path, "d"), "sd1", encoders=False, dora=True)
    out = os.path.join(tmp_path, "lora.safetensors")
    with pytest.raises(ValueError, match="DoRA"):
        lokr_to_lora(lokr, out, model=base)
    with pytest.raises(ValueError, match="rank or energy"):
        lokr_to_lora(lokr, out, model=base, rank=2, energy=0.5)
    with pytest.raises(ValueError, match="energy"):
        lokr_to_lora(lokr, out, model=base, energy=1.5)
    assert not os.path.exists(out)


def test_the_convert_command_writes_a_lora_with_its_report(tmp_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    from lokr_diffusers.cli import main

    base, lokr, _ = _lokr_file(str(tmp_path), "sd1", encoders=False)
    out = os.path.join(tmp_path, "lora.safetensors")
    assert main(["convert", lokr, out, "--to", "lora", "--rank", "2", "--model", base]) == 0
    assert "total relative error" in capsys.readouterr().out
    sd = load_file(out)
    assert sd and all(v.shape[0] == 2 for k, v in sd.items() if k.endswith("lora_down.weight"))
    with open(out[:-len(".safetensors")] + ".json", encoding="utf-8") as fh:
        assert json.load(fh)["tool"] == "lora"
    assert main(["convert", lokr, out, "--to", "comfyui", "--rank", "2"]) == 2
    assert "--rank" in capsys.readouterr().err
    assert lokr_diffusers is not None


@pytest.mark.parametrize("how", [pytest.param({}, marks=pytest.mark.slow), {"energy": 0.8}], ids=["full", "energy"])
def test_a_peft_lora_folder_loads_in_peft_as_the_lora_file_in_diffusers(tmp_path: str, how: dict) -> None:
    """`to="lora_peft"`: one folder per component; PEFT's own PeftModel.from_pretrained + merge_and_unload gives the
    module weights of the kohya file's (full rank: the LoKr's), ranks that differ read by rank_pattern."""
    from peft import PeftModel

    base, lokr, comps = _lokr_file(str(tmp_path), "sd1")
    folder = os.path.join(tmp_path, "peft")
    report = lokr_to_lora(lokr, folder, to="lora_peft", model=base, **how)
    assert sorted(os.listdir(folder)) == sorted(comps)
    deltas = _deltas(base, lokr, comps)
    bare = DiffusionPipeline.from_pretrained(base)
    errors = {(m.component, m.path): m.error for m in report.modules}
    for c in comps:
        w0 = _weights(bare, c)
        merged = PeftModel.from_pretrained(getattr(DiffusionPipeline.from_pretrained(base), c),
                                           os.path.join(folder, c)).merge_and_unload()
        w1 = {k: v.detach() for k, v in merged.state_dict().items()}
        for k, d in deltas[c].items():
            err = float((w1[k] - w0[k] - d).norm() / d.norm())
            assert err == pytest.approx(errors[(c, k.removesuffix(".weight"))], rel=1e-3, abs=1e-5), f"{c}.{k}"


@pytest.mark.parametrize("family", [pytest.param("sd1", marks=pytest.mark.slow), "sdxl"])
def test_the_consumers_rule_reads_each_module_of_the_lora_file(tmp_path: str, family: str) -> None:
    """ComfyUI's and A1111's reading of a kohya LoRA (an independent reference: names from tests/helpers/sd_export.py,
    ΔW = alpha / rank · up @ down), with ranks that differ between modules: every module's ΔW within the reported
    error of the LoKr's."""
    from helpers.references import lora_delta
    from helpers.sd_export import name_map

    base, lokr, comps = _lokr_file(str(tmp_path), family)
    out = os.path.join(tmp_path, "lora.safetensors")
    report = lokr_to_lora(lokr, out, model=base, energy=0.8)
    assert len({m.rank for m in report.modules}) > 1
    pipe = DiffusionPipeline.from_pretrained(base)
    names = name_map({c: getattr(pipe, c) for c in comps}, family)
    sd = load_file(out)
    deltas = _deltas(base, lokr, comps)
    errors = {(m.component, m.path): m.error for m in report.modules}
    seen = 0
    for key in sd:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key.removesuffix(".lora_down.weight")
        component, path = names[name]
        down, up = sd[key], sd[f"{name}.lora_up.weight"]
        d = deltas[component][path + ".weight"]
        got = lora_delta(down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1), float(sd[f"{name}.alpha"]))
        err = float((got.reshape(d.shape) - d).norm() / d.norm())
        assert err == pytest.approx(errors[(component, path)], rel=1e-3, abs=1e-5), name
        seen += 1
    assert seen == len(report.modules)


@pytest.mark.parametrize("family", ["flux", pytest.param("wan", marks=pytest.mark.slow)])
def test_comfyui_reads_each_module_of_a_dit_lora_file(tmp_path: str, family: str) -> None:
    """ComfyUI's reading of a LoRA in diffusers' layout (an independent reference, tests/helpers/comfyui_dit.py: its
    key map onto the original-layout weights, ΔW = up @ down with no alpha key, scale 1) and diffusers' own loader
    (the LoraConfig's alpha_pattern), with ranks that differ between modules: every module's ΔW within the reported
    error of the LoKr's in both."""
    from helpers.comfyui_dit import comfyui_transformer

    base, lokr, comps = _lokr_file(str(tmp_path), family, encoders=False)
    out = os.path.join(tmp_path, "lora.safetensors")
    report = lokr_to_lora(lokr, out, model=base, energy=0.8)
    assert len({m.rank for m in report.modules}) > 1
    bare = DiffusionPipeline.from_pretrained(base).transformer
    w0 = {k: v.detach() for k, v in bare.state_dict().items()}
    w1 = {k: v.detach() for k, v in comfyui_transformer(bare, family, load_file(out)).state_dict().items()}
    deltas = _deltas(base, lokr, comps)["transformer"]
    diffusers_read = _through_diffusers(base, out, comps)["transformer"]
    for m in report.modules:
        d = deltas[m.path + ".weight"]
        err = float((w1[m.path + ".weight"] - w0[m.path + ".weight"] - d).norm() / d.norm())
        assert err == pytest.approx(m.error, rel=1e-3, abs=1e-5), m.path
        err = float((diffusers_read[m.path + ".weight"] - d).norm() / d.norm())
        assert err == pytest.approx(m.error, rel=1e-3, abs=1e-5), f"diffusers: {m.path}"
