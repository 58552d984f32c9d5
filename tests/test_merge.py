"""`merge_lokr` / `lokr-diffusers merge`: several adapters (LoKr and LoRA) at their strengths baked into a model of
any family, the folder loaded back by diffusers' `from_pretrained` equal to the pipeline with the same adapters fused
by `fuse_lokr`; quantized models refused unless requantize; nothing written on failure."""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import DiffusionPipeline

from lokr_diffusers import LoKrConfig, families
from lokr_diffusers.cli import main
from lokr_diffusers.pipeline import add_lokr
from lokr_diffusers.tools.lora import lokr_to_lora
from lokr_diffusers.tools.merge import merge_lokr


def _files(root: str, family: str, n: int = 2) -> tuple[str, list[str]]:
    """(base folder, n LoKr files with other random factors and targets) for the family's tiny pipeline."""
    pipe = families.build_tiny(family)
    base = os.path.join(root, "base")
    pipe.save_pretrained(base)
    f = families.get(family)
    files = []
    for i in range(n):
        torch.manual_seed(i)
        cfg = LoKrConfig(r=2 + i, alpha=1 + i, init_weights=False)
        p = DiffusionPipeline.from_pretrained(base)
        comps = {f.denoiser: cfg}
        if i == 1 and f.originals is None:
            comps["text_encoder"] = cfg
        add_lokr(p, comps, "a")
        path = os.path.join(root, f"a{i}.safetensors")
        p.save_lokr_weights(path, adapter_name="a", format="comfyui")
        files.append(path)
    return base, files


def _state(pipe: DiffusionPipeline) -> dict[str, torch.Tensor]:
    out = {}
    for c in ("unet", "transformer", "text_encoder", "text_encoder_2"):
        m = getattr(pipe, c, None)
        if isinstance(m, torch.nn.Module):
            out.update({f"{c}.{k.replace('.base_layer', '')}": v for k, v in m.state_dict().items()
                        if ".lokr_" not in k and ".lora_" not in k})
    return out


def _fused(base: str, files: list[str], scales: list[float]) -> dict[str, torch.Tensor]:
    """The reference: every file loaded by load_lokr_weights, set to its strength, fused by fuse_lokr."""
    pipe = DiffusionPipeline.from_pretrained(base)
    names = [pipe.load_lokr_weights(f, adapter_name=f"r{i}") for i, f in enumerate(files)]
    pipe.set_lokr_adapters(names, scales)
    pipe.fuse_lokr()
    return _state(pipe)


@pytest.mark.parametrize("family", ["sd1", "flux", "wan"])
def test_several_lokr_files_merge_as_fuse_lokr_fuses_them(tmp_path: str, family: str) -> None:
    base, files = _files(str(tmp_path), family)
    out = os.path.join(tmp_path, "merged")
    merge_lokr(base, files, out, scales=[0.7, -0.4])
    merged, want, bare = _state(DiffusionPipeline.from_pretrained(out)), _fused(base, files, [0.7, -0.4]), \
        _state(DiffusionPipeline.from_pretrained(base))
    assert merged.keys() == want.keys()
    changed = [k for k in want if not torch.equal(want[k], bare[k])]
    assert changed
    for k in want:
        torch.testing.assert_close(merged[k], want[k], rtol=1e-6, atol=1e-6, msg=k)


def test_a_lora_file_merges_beside_a_lokr_file(tmp_path: str) -> None:
    """The second file as a LoRA (the LoKr converted at full rank): merged through diffusers' fuse_lora, the result
    is the two LoKr files fused."""
    base, files = _files(str(tmp_path), "sd1")
    lora = os.path.join(tmp_path, "b-lora.safetensors")
    lokr_to_lora(files[1], lora, model=base)
    out = os.path.join(tmp_path, "merged")
    merge_lokr(base, [files[0], lora], out, scales=[0.7, 0.5])
    merged, want = _state(DiffusionPipeline.from_pretrained(out)), _fused(base, files, [0.7, 0.5])
    for k in want:
        torch.testing.assert_close(merged[k], want[k], rtol=1e-5, atol=1e-5, msg=k)


def test_a_quantized_model_is_refused_unless_requantize_and_nothing_is_written(tmp_path: str) -> None:
    base, files = _files(str(tmp_path), "flux", n=1)
    config = os.path.join(base, "transformer", "config.json")
    with open(config, encoding="utf-8") as fh:
        data = json.load(fh)
    data["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    with open(config, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
    out = os.path.join(tmp_path, "merged")
    with pytest.raises(ValueError, match=r"transformer \(bitsandbytes\) quantized.*requantize"):
        merge_lokr(base, files, out)
    assert not os.path.exists(out)


def test_the_command_merges_several_files_and_checks_its_arguments(tmp_path: str,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    base, files = _files(str(tmp_path), "sd1")
    out = os.path.join(tmp_path, "merged")
    assert main(["merge", "--model", base, "--lokr", *files, "--scale", "0.7", "-0.4", "--out", out]) == 0
    assert f"into {out}" in capsys.readouterr().out
    merged, want = _state(DiffusionPipeline.from_pretrained(out)), _fused(base, files, [0.7, -0.4])
    for k in want:
        torch.testing.assert_close(merged[k], want[k], rtol=1e-6, atol=1e-6, msg=k)
    again = os.path.join(tmp_path, "again")
    assert main(["merge", "--model", base, "--lokr", *files, "--scale", "0.7", "--out", again]) == 2
    assert "one scale per file" in capsys.readouterr().err
    assert main(["merge", "--model", base, "--lokr", os.path.join(tmp_path, "none.safetensors"), "--out", again]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not os.path.exists(again)
