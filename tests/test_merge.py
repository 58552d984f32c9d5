"""`merge_lokr` / `lokr-diffusers merge`: several adapters (LoKr and LoRA) at their strengths baked into a model of
any family, the folder loaded back by diffusers' `from_pretrained` equal to the pipeline with the same adapters fused
by `fuse_lokr`; quantized models refused unless requantize; nothing written on failure."""

from __future__ import annotations

import json
import os

import pytest
import torch
from diffusers import DiffusionPipeline
from helpers.adapter_files import fused_weights, lokr_files, weights_of

from lokr_diffusers.cli import main
from lokr_diffusers.tools.lora import lokr_to_lora
from lokr_diffusers.tools.merge import merge_lokr


@pytest.mark.parametrize("family", ["sd1", "flux", "wan"])
def test_several_lokr_files_merge_as_fuse_lokr_fuses_them(tmp_path: str, family: str) -> None:
    base, files = lokr_files(str(tmp_path), family)
    out = os.path.join(tmp_path, "merged")
    merge_lokr(base, files, out, scales=[0.7, -0.4])
    merged, want, bare = weights_of(DiffusionPipeline.from_pretrained(out)), fused_weights(base, files, [0.7, -0.4]), \
        weights_of(DiffusionPipeline.from_pretrained(base))
    assert merged.keys() == want.keys()
    changed = [k for k in want if not torch.equal(want[k], bare[k])]
    assert changed
    for k in want:
        torch.testing.assert_close(merged[k], want[k], rtol=1e-6, atol=1e-6, msg=k)


def test_a_lora_file_merges_beside_a_lokr_file(tmp_path: str) -> None:
    """The second file as a LoRA (the LoKr converted at full rank): merged through diffusers' fuse_lora, the result
    is the two LoKr files fused."""
    base, files = lokr_files(str(tmp_path), "sd1")
    lora = os.path.join(tmp_path, "b-lora.safetensors")
    lokr_to_lora(files[1], lora, model=base)
    out = os.path.join(tmp_path, "merged")
    merge_lokr(base, [files[0], lora], out, scales=[0.7, 0.5])
    merged, want = weights_of(DiffusionPipeline.from_pretrained(out)), fused_weights(base, files, [0.7, 0.5])
    for k in want:
        torch.testing.assert_close(merged[k], want[k], rtol=1e-5, atol=1e-5, msg=k)


def test_a_quantized_model_is_refused_unless_requantize_and_nothing_is_written(tmp_path: str) -> None:
    base, files = lokr_files(str(tmp_path), "flux", n=1)
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
    base, files = lokr_files(str(tmp_path), "sd1")
    out = os.path.join(tmp_path, "merged")
    assert main(["merge", "--model", base, "--lokr", *files, "--scale", "0.7", "-0.4", "--out", out]) == 0
    assert f"into {out}" in capsys.readouterr().out
    merged, want = weights_of(DiffusionPipeline.from_pretrained(out)), fused_weights(base, files, [0.7, -0.4])
    for k in want:
        torch.testing.assert_close(merged[k], want[k], rtol=1e-6, atol=1e-6, msg=k)
    again = os.path.join(tmp_path, "again")
    assert main(["merge", "--model", base, "--lokr", *files, "--scale", "0.7", "--out", again]) == 2
    assert "one scale per file" in capsys.readouterr().err
    assert main(["merge", "--model", base, "--lokr", os.path.join(tmp_path, "none.safetensors"), "--out", again]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not os.path.exists(again)
