"""`extract_lokr` / `lokr-diffusers extract` on tiny pipelines: a known LoKr fused into BASE comes back exactly, a
dense change gets the optimum error (tests/helpers/kron_oracle.py), the file loads back onto BASE as TUNED, the
report is in the file and beside it, and bad inputs write nothing."""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import DiffusionPipeline
from helpers.extract_runs import base_and_tuned, component_weights
from helpers.kron_oracle import optimum_error
from safetensors import safe_open
from safetensors.torch import save_file

import lokr_diffusers
from lokr_diffusers import LoKrConfig, families
from lokr_diffusers.tools.extract import EXTRACT_METADATA_KEY, extract_lokr, report_path

KNOWN = LoKrConfig(r=4, alpha=2, init_weights=False, decompose_factor=4)


def _reloaded(base: str, path: str, component: str) -> dict[str, torch.Tensor]:
    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.load_lokr_weights(path)
    pipe.fuse_lokr()
    return {k.replace(".base_layer", ""): v.detach().clone() for k, v in getattr(pipe, component).state_dict().items()
            if "lokr_" not in k}


@pytest.mark.parametrize("family,fmt,factor", [
    ("sd1", "comfyui", 4), ("flux", "comfyui", 4), ("sdxl", "peft", -1),
    pytest.param("wan", "comfyui", 4, marks=pytest.mark.slow),
    pytest.param("sd3", "diffusers", -1, marks=pytest.mark.slow)])
def test_a_fused_lokr_comes_back_exactly_and_loads_as_the_tuned_model(tmp_path: str, family: str, fmt: str,
                                                                      factor: int) -> None:
    """PEFT (and diffusers' layout, read by PEFT) plans the split by LyCORIS' default factor only: those files' LoKr is
    made and extracted with it."""
    known = LoKrConfig(r=4, alpha=2, init_weights=False, decompose_factor=factor)
    base, tuned = base_and_tuned(str(tmp_path), family, known)
    out = os.path.join(tmp_path, "x" if fmt == "peft" else "x.safetensors")
    report = extract_lokr(base, tuned, out, format=fmt, factor=factor, rank=4)
    denoiser = families.get(family).denoiser
    assert report.modules and {m.component for m in report.modules} == {denoiser}
    assert max(m.error for m in report.modules) < 1e-5
    assert report.error < 1e-5
    want, got = component_weights(tuned, denoiser), _reloaded(base, out, denoiser)
    for k, w in want.items():
        torch.testing.assert_close(got[k], w, rtol=1e-5, atol=1e-6, msg=k)
    with open(report_path(out), encoding="utf-8") as fh:
        full = json.load(fh)
    assert len(full["per_module"]) == len(report.modules) and full["error"] == pytest.approx(report.error)
    if fmt != "peft":
        with safe_open(out, framework="pt") as fh:
            meta = json.loads(fh.metadata()[EXTRACT_METADATA_KEY])
        assert meta["modules"] == len(report.modules) and meta["parameters"] == report.parameters


def test_a_dense_change_gets_the_optimum_error_and_the_budget_finds_the_exact_split(tmp_path: str) -> None:
    """One Linear changed by noise: the reported error is the optimum of its split (the oracle's SVD); a LoKr fused
    with W1 4x4 is found by a budget among LyCORIS' usual splits, without being told the factor."""
    target = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    noise: dict[str, torch.Tensor] = {}

    def change(pipe: DiffusionPipeline) -> None:
        w = pipe.unet.get_submodule(target).weight
        noise["delta"] = torch.randn(w.shape, generator=torch.Generator().manual_seed(3))
        w.add_(noise["delta"])

    base, tuned = base_and_tuned(os.path.join(tmp_path, "dense"), "sd1", change=change)
    report = extract_lokr(base, tuned, os.path.join(tmp_path, "dense.safetensors"), components=["unet"])
    (m,) = report.modules
    assert m.path == target and m.rank == 0
    assert m.error == pytest.approx(optimum_error(noise["delta"], m.split[0], m.split[2]), rel=1e-2)
    assert m.split[:3:2] == tuple(lokr_diffusers.functional.factorization(d)[0] for d in noise["delta"].shape)

    base, tuned = base_and_tuned(os.path.join(tmp_path, "known"), "sd1", KNOWN)
    report = extract_lokr(base, tuned, os.path.join(tmp_path, "known.safetensors"), budget_per_module=100_000)
    assert all((m.split[0], m.split[2]) == (4, 4) for m in report.modules)
    assert report.error < 1e-5


def test_min_rel_norm_components_and_target_modules_choose_what_is_extracted(tmp_path: str) -> None:
    base, tuned = base_and_tuned(str(tmp_path), "sd1", KNOWN)
    every = extract_lokr(base, tuned, os.path.join(tmp_path, "a.safetensors"), factor=4)
    attn = extract_lokr(base, tuned, os.path.join(tmp_path, "b.safetensors"), factor=4, target_modules=["to_q"])
    assert attn.modules and all(m.path.endswith("to_q") for m in attn.modules)
    assert len(attn.modules) < len(every.modules)
    cut = sorted(m.relative_change for m in every.modules)[len(every.modules) // 2]
    some = extract_lokr(base, tuned, os.path.join(tmp_path, "c.safetensors"), factor=4, min_rel_norm=cut)
    assert all(m.relative_change > cut for m in some.modules)
    assert some.skipped_unchanged == every.skipped_unchanged + len(every.modules) - len(some.modules)
    with pytest.raises(ValueError, match="components"):
        extract_lokr(base, tuned, os.path.join(tmp_path, "d.safetensors"), components=["vae2"])


def test_bad_inputs_are_refused_and_nothing_is_written(tmp_path: str) -> None:
    base, tuned = base_and_tuned(os.path.join(tmp_path, "sd"), "sd1", KNOWN)
    out = os.path.join(tmp_path, "out.safetensors")
    other, _ = base_and_tuned(os.path.join(tmp_path, "flux"), "flux")
    with pytest.raises(ValueError, match="differ in their components"):
        extract_lokr(base, other, out)

    def poison(pipe: DiffusionPipeline) -> None:
        pipe.unet.conv_in.weight[0, 0, 0, 0] = float("nan")

    _, bad = base_and_tuned(os.path.join(tmp_path, "nan"), "sd1", change=poison)
    with pytest.raises(ValueError, match=r"unet\.conv_in.*NaN"):
        extract_lokr(base, bad, out)
    with pytest.raises(ValueError, match="nothing to extract"):
        extract_lokr(base, base, out)
    with pytest.raises(ValueError, match="do not fit the model of"):
        single = os.path.join(tmp_path, "model.safetensors")
        save_file({"x.weight": torch.zeros(2, 2)}, single)
        extract_lokr(single, tuned, out)
    assert not os.path.exists(out) and not os.path.exists(report_path(out))


def test_the_command_extracts_prints_the_table_and_refuses_two_budgets(tmp_path: str,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from lokr_diffusers.cli import main

    base, tuned = base_and_tuned(str(tmp_path), "sd1", KNOWN)
    out = os.path.join(tmp_path, "x.safetensors")
    assert main(["extract", "--base", base, "--tuned", tuned, "--out", out, "--factor", "4", "--rank", "4"]) == 0
    printed = capsys.readouterr().out
    assert "total relative error" in printed and f"wrote {out}" in printed
    with open(report_path(out), encoding="utf-8") as fh:
        assert json.load(fh)["error"] < 1e-5
    assert main(["extract", "--base", base, "--tuned", tuned, "--out", out, "--budget", "5",
                 "--budget_per_module", "5"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert main(["extract", "--base", base, "--tuned", os.path.join(tmp_path, "nope"), "--out", out]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_sd_single_file_checkpoints_are_read_as_their_folders(tmp_path: str) -> None:
    """BASE and TUNED as single-file checkpoints in the original layout (checked here against diffusers' own
    converters: from_single_file for the UNet, its CLIP converter for the text encoder): the extracted LoKr is the
    one extracted from the folders; a folder against a single file works too."""
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from helpers.extract_runs import ldm_checkpoint
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    known = LoKrConfig(r=4, alpha=2, init_weights=False, decompose_factor=4)
    base, tuned = base_and_tuned(str(tmp_path), "sd1", known)
    files = [ldm_checkpoint(f, os.path.join(tmp_path, f"{n}.safetensors")) for f, n in ((base, "b"), (tuned, "t"))]
    want = component_weights(tuned, "unet")
    unet = UNet2DConditionModel.from_single_file(files[1], config=tuned, subfolder="unet", local_files_only=True)
    te = create_diffusers_clip_model_from_ldm(CLIPTextModel, load_file(files[1]), subfolder="text_encoder",
                                              config=tuned, local_files_only=True)
    for k, v in unet.state_dict().items():
        assert torch.equal(v, want[k]), k
    for k, v in component_weights(tuned, "text_encoder").items():
        assert torch.equal(te.state_dict()[k], v), k

    folders = extract_lokr(base, tuned, os.path.join(tmp_path, "f.safetensors"), factor=4, rank=4)
    single = extract_lokr(files[0], files[1], os.path.join(tmp_path, "s.safetensors"), factor=4, rank=4, config=base)
    mixed = extract_lokr(base, files[1], os.path.join(tmp_path, "m.safetensors"), factor=4, rank=4)
    assert [(m.component, m.path) for m in single.modules] == [(m.component, m.path) for m in folders.modules]
    assert [(m.component, m.path) for m in mixed.modules] == [(m.component, m.path) for m in folders.modules]
    assert single.error < 1e-5 and mixed.error < 1e-5
    got = _reloaded(base, os.path.join(tmp_path, "s.safetensors"), "unet")
    for k, w in want.items():
        torch.testing.assert_close(got[k], w, rtol=1e-5, atol=1e-6, msg=k)


def test_a_single_file_that_fits_no_model_is_refused(tmp_path: str) -> None:
    from safetensors.torch import save_file

    base, tuned = base_and_tuned(str(tmp_path), "sd1", KNOWN)
    path = os.path.join(tmp_path, "flux.safetensors")
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(6, 2)}, path)
    with pytest.raises(ValueError, match="do not fit the model of"):
        extract_lokr(path, tuned, os.path.join(tmp_path, "x.safetensors"))
    with pytest.raises(ValueError, match="fit no full-size model of a family with original names"):
        extract_lokr(path, path, os.path.join(tmp_path, "z.safetensors"))
    save_file({"x.weight": torch.zeros(6, 2)}, path)
    with pytest.raises(ValueError, match="of no SD UNet nor of a family with original names"):
        extract_lokr(path, path, os.path.join(tmp_path, "z.safetensors"))
    with pytest.raises(ValueError, match="no full-size SD model"):
        from helpers.extract_runs import ldm_checkpoint

        one = ldm_checkpoint(base, os.path.join(tmp_path, "b.safetensors"))
        extract_lokr(one, one, os.path.join(tmp_path, "y.safetensors"))  # no folder to take configs from


@pytest.mark.parametrize("family", ["flux", pytest.param("wan", marks=pytest.mark.slow)])
def test_dit_single_files_in_original_names_are_read_as_their_folders(tmp_path: str, family: str) -> None:
    """A transformer's weights under their original names (fused `qkv` rows and all): the LoKr extracted from two
    such files is the one extracted from the folders, and loads onto BASE as TUNED."""
    from helpers.extract_runs import original_linears

    known = LoKrConfig(r=4, alpha=2, init_weights=False, decompose_factor=4)
    base, tuned = base_and_tuned(str(tmp_path), family, known)
    files = [original_linears(f, os.path.join(tmp_path, f"{n}.safetensors"), "model.diffusion_model.")
             for f, n in ((base, "b"), (tuned, "t"))]
    folders = extract_lokr(base, tuned, os.path.join(tmp_path, "f.safetensors"), factor=4, rank=4)
    out = os.path.join(tmp_path, "s.safetensors")
    single = extract_lokr(files[0], files[1], out, factor=4, rank=4, config=base)
    assert sorted((m.component, m.path) for m in single.modules) == \
        sorted((m.component, m.path) for m in folders.modules)
    assert single.error < 1e-5
    want, got = component_weights(tuned, "transformer"), _reloaded(base, out, "transformer")
    for k, w in want.items():
        torch.testing.assert_close(got[k], w, rtol=1e-5, atol=1e-6, msg=k)


def test_a_global_budget_is_shared_by_weight_size_and_kept(tmp_path: str) -> None:
    """`budget`: the modules together keep at most that many parameters, each its share by weight size."""
    base, tuned = base_and_tuned(str(tmp_path), "sd1", KNOWN)
    free = extract_lokr(base, tuned, os.path.join(tmp_path, "a.safetensors"), factor=4)
    budget = free.parameters // 3
    tight = extract_lokr(base, tuned, os.path.join(tmp_path, "b.safetensors"), budget=budget)
    assert tight.parameters <= budget < free.parameters
    kept = {m.path for m in tight.modules}
    assert kept and kept | {p.removeprefix("unet.") for p in tight.skipped_budget} == {m.path for m in free.modules}
    assert tight.skipped_budget  # the smallest modules' shares hold no split: left out, named in the report


def test_sdxl_single_files_read_the_openclip_encoder(tmp_path: str) -> None:
    """SDXL's second text encoder in open_clip's layout (q, k, v rows of in_proj): a Kronecker change to its k_proj
    and out_proj is extracted from two single files as from the folders, and the module's weight comes back."""
    from helpers.extract_runs import ldm_checkpoint

    torch.manual_seed(3)
    kron = {}

    def change(pipe: DiffusionPipeline) -> None:
        layer = pipe.text_encoder_2.text_model.encoder.layers[0]
        for name, w in (("self_attn.k_proj", layer.self_attn.k_proj.weight),
                        ("self_attn.out_proj", layer.self_attn.out_proj.weight)):
            d = torch.kron(torch.randn(4, 4), torch.randn(w.shape[0] // 4, w.shape[1] // 4)) * 0.1
            w += d
            kron[f"text_model.encoder.layers.0.{name}.weight"] = d

    base, tuned = base_and_tuned(str(tmp_path), "sdxl", change=change)
    files = [ldm_checkpoint(f, os.path.join(tmp_path, f"{n}.safetensors")) for f, n in ((base, "b"), (tuned, "t"))]
    folders = extract_lokr(base, tuned, os.path.join(tmp_path, "f.safetensors"), factor=4)
    single = extract_lokr(files[0], files[1], os.path.join(tmp_path, "s.safetensors"), factor=4, config=base)
    found = sorted((m.component, m.path) for m in single.modules)
    assert found == sorted((m.component, m.path) for m in folders.modules)
    assert found == sorted(("text_encoder_2", k.removesuffix(".weight")) for k in kron)
    assert single.error < 1e-5
    got = _reloaded(base, os.path.join(tmp_path, "s.safetensors"), "text_encoder_2")
    bare = component_weights(base, "text_encoder_2")
    for k, d in kron.items():
        torch.testing.assert_close(got[k] - bare[k], d, rtol=1e-4, atol=1e-5, msg=k)
