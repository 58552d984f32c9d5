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


@pytest.mark.parametrize("family", ["sd1", pytest.param("flux", marks=pytest.mark.slow),
                                    pytest.param("wan", marks=pytest.mark.slow)])
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


@pytest.mark.parametrize("family", ["sd1", pytest.param("sdxl", marks=pytest.mark.slow)])
def test_a_single_file_output_loads_through_diffusers_from_single_file(tmp_path: str, family: str) -> None:
    """SD1 / SDXL: the pipeline read back by diffusers' own from_single_file (its UNet, VAE, CLIP and OpenCLIP
    converters) equals the merged folder, every component, every tensor; the merge of the text encoder is in it."""
    base, files = lokr_files(str(tmp_path), family)
    out, single = os.path.join(tmp_path, "merged"), os.path.join(tmp_path, "merged.safetensors")
    merge_lokr(base, files, out, scales=[0.7, 0.4], single_file=single)
    folder = DiffusionPipeline.from_pretrained(out)
    loaded = type(folder).from_single_file(single, config=out, local_files_only=True)
    bare = DiffusionPipeline.from_pretrained(base)
    for c in ("unet", "vae", "text_encoder"):
        want, got = getattr(folder, c).state_dict(), getattr(loaded, c).state_dict()
        assert want.keys() == got.keys(), c
        for k, v in want.items():
            assert torch.equal(got[k], v), f"{c}.{k}"
    if family == "sdxl":  # the tiny encoders have one width, which from_single_file's detection of the OpenCLIP
        # part needs to differ from CLIP-L's (768 / 1280 at full size): its converter is run directly here
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
        from safetensors.torch import load_file

        got = convert_open_clip_checkpoint(folder.text_encoder_2, load_file(single),
                                           prefix="conditioner.embedders.1.model.")
        for k, v in folder.text_encoder_2.state_dict().items():
            assert k.endswith("position_ids") or torch.equal(got[k], v), f"text_encoder_2.{k}"
    changed = [k for k, v in folder.text_encoder.state_dict().items()
               if not torch.equal(v, bare.text_encoder.state_dict()[k])]
    assert changed  # the second file adapts the text encoder: its merge is in the single file


@pytest.mark.parametrize("family", ["zimage", pytest.param("sd3", marks=pytest.mark.slow),
                                    pytest.param("flux2", marks=pytest.mark.slow),
                                    pytest.param("wan", marks=pytest.mark.slow)])
def test_a_dit_single_file_loads_through_diffusers_from_single_file(tmp_path: str, family: str) -> None:
    """A DiT family's merged transformer in its original layout: the class's from_single_file (diffusers' own
    converter) gives the merged folder's transformer, every tensor."""
    import diffusers

    base, files = lokr_files(str(tmp_path), family)
    out, single = os.path.join(tmp_path, "merged"), os.path.join(tmp_path, "merged.safetensors")
    merge_lokr(base, files, out, scales=[0.7, 0.4], single_file=single)
    folder = DiffusionPipeline.from_pretrained(out).transformer
    cls = getattr(diffusers, type(folder).__name__)
    loaded = cls.from_single_file(single, config=out, subfolder="transformer", local_files_only=True).state_dict()
    bare = DiffusionPipeline.from_pretrained(base).transformer.state_dict()
    assert loaded.keys() == folder.state_dict().keys()
    assert any(not torch.equal(v, bare[k]) for k, v in folder.state_dict().items())  # the merge is in it
    for k, v in folder.state_dict().items():
        assert torch.equal(loaded[k], v), k


def test_a_single_file_that_would_drop_a_change_is_refused(tmp_path: str) -> None:
    """A DiT single file holds the transformer only: a merge that changes a text encoder is refused with
    --single_file, before anything is written."""
    from helpers.adapter_files import add_lokr

    from lokr_diffusers import LoKrConfig

    base, _ = lokr_files(str(tmp_path), "zimage", n=0)
    pipe = DiffusionPipeline.from_pretrained(base)
    add_lokr(pipe, {"text_encoder": LoKrConfig(r=2, init_weights=False)}, "te")
    te_file = os.path.join(tmp_path, "te.safetensors")
    pipe.save_lokr_weights(te_file, adapter_name="te")
    out = os.path.join(tmp_path, "fm")
    with pytest.raises(ValueError, match=r"change text_encoder.*holds transformer"):
        merge_lokr(base, [te_file], out, single_file=os.path.join(tmp_path, "f.safetensors"))
    assert not os.path.exists(out) and not os.path.exists(os.path.join(tmp_path, "f.safetensors"))
