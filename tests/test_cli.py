"""The lokr-diffusers command, run as a subprocess on real files; convert checked module by module."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers.fullsize_files import full_size_file
from safetensors.torch import load_file, save_file

from lokr_diffusers import functional as LF
from lokr_diffusers.architectures import meta_components
from lokr_diffusers.cli import main
from lokr_diffusers.formats.names import build_index
from lokr_diffusers.formats.reader import parse_file
from lokr_diffusers.io import lokr_state_dict


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lokr_diffusers", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.fixture(scope="module")
def sd15_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("cli") / "style.safetensors"
    save_file(full_size_file("sd1", "kohya", every=3), str(path), metadata={"ss_output_name": "style"})
    return str(path)


def _deltas(path: str, base: str) -> dict[tuple[str, str], torch.Tensor | None]:
    """ΔW per module of a file read against the full-size base (built for modules up to 0.4M
    weights, to keep the test quick; larger ones are checked by name and scale only)."""
    from lokr_diffusers.loader import split_adapters

    comps = meta_components(base)
    sd, meta, layout = lokr_state_dict(path)
    out = {}
    for _, part in split_adapters(sd, meta).items():
        parsed = parse_file(part, meta, build_index(comps), layout)
        assert not parsed.unmatched
        for e in parsed.entries:
            shape = tuple(comps[e.ref.component].get_submodule(e.ref.path).weight.shape)
            small = torch.Size(shape).numel() <= 400_000
            out[(e.ref.component, e.ref.path)] = LF.delta_weight(e.factors, shape, e.scale) if small else \
                torch.tensor(e.scale)
    return out


def test_inspect_text_and_json(sd15_file: str) -> None:
    text = _cli("inspect", sd15_file)
    assert text.returncode == 0, text.stderr
    assert "kohya layout, base model sd1" in text.stdout and "Tucker" in text.stdout
    info = json.loads(_cli("inspect", sd15_file, "--json").stdout)
    expected = len({k.rsplit(".", 1)[0] for k in load_file(sd15_file)})
    assert info["modules"] == expected and info["base_model"] == "sd1" and info["layout"] == "kohya"
    adapter = info["adapters"]["default"]
    assert sum(adapter["modules_per_component"].values()) == expected
    assert adapter["tucker"] > 0 and adapter["scale_min"] == pytest.approx(0.5)  # alpha 2 / rank 4
    assert info["metadata"]["ss_output_name"] == "style"


@pytest.mark.parametrize("to", ["comfyui", "diffusers", "peft", "lokr_diffusers"])
def test_convert_keeps_every_delta(sd15_file: str, tmp_path, to: str) -> None:
    out = str(tmp_path / ("out" if to == "peft" else "out.safetensors"))
    result = _cli("convert", sd15_file, out, "--to", to, "--base", "sd15", "--dtype", "fp32")
    assert result.returncode == 0, result.stderr
    before, after = _deltas(sd15_file, "sd1"), _deltas(out, "sd1")
    assert before.keys() == after.keys()
    assert sum(dw.dim() > 0 for dw in before.values()) >= 15  # te layers, small convs, proj
    for key, dw in before.items():
        torch.testing.assert_close(after[key], dw, rtol=1e-5, atol=1e-7, msg=str(key))


def test_merge_bakes_the_lokr_into_a_model_folder(tiny_sd_dir: str, tmp_path) -> None:
    from diffusers import StableDiffusionPipeline
    from helpers.sd_adapters import assert_outputs, outputs, source_pipeline
    from helpers.writers import write_adapter

    src = source_pipeline(False)
    lokr = str(tmp_path / "tiny.safetensors")
    save_file(write_adapter(src, "src", "kohya"), lokr)
    out = str(tmp_path / "merged")
    result = _cli("merge", "--model", tiny_sd_dir, "--lokr", lokr, "--scale", "1.0", "--out", out)
    assert result.returncode == 0, result.stderr
    merged = StableDiffusionPipeline.from_pretrained(out)
    src.fuse_lokr()  # merged weights: sequential DoRA as the fused pipeline computes it
    assert_outputs(outputs(merged), outputs(src), atol=1e-4)


@pytest.mark.parametrize(("args", "message"), [
    (["inspect", "no_such_file.safetensors"], "no such file or folder: no_such_file.safetensors"),
    (["convert", "no_such_file.safetensors", "x.safetensors", "--to", "comfyui"],
     "no such file or folder: no_such_file.safetensors"),
    (["merge", "--model", ".", "--lokr", "x", "--out", "y"], "not a diffusers pipeline folder"),
])
def test_bad_input_exits_2_with_one_line(args: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(args) == 2  # in-process: quick (tests/test_reliability_arguments.py has the catalogue)
    err = capsys.readouterr().err
    assert err.startswith(f"lokr-diffusers {args[0]}: error: ") and err.count("\n") == 1 and message in err, err


def test_help() -> None:
    result = _cli("--help")
    assert result.returncode == 0 and "inspect" in result.stdout and "examples:" in result.stdout


def test_help_in_process_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["convert", "--help"]) == 0
    assert "--to" in capsys.readouterr().out


def test_inspect_a_lora_file_says_what_it_is(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    path = str(tmp_path / "lora.safetensors")
    save_file({"lora_unet_conv_in.lora_down.weight": torch.ones(2, 4), "lora_unet_conv_in.lora_up.weight":
               torch.ones(4, 2)}, path)
    assert main(["inspect", path, "--base", "sd15"]) == 0
    out = capsys.readouterr().out
    assert "0 LoKr modules, 1 LoRA modules" in out and "load it with pipe.load_lora_weights" in out


@pytest.fixture(scope="module")
def tiny_comfyui_file(tmp_path_factory: pytest.TempPathFactory) -> str:
    """What `lokr-diffusers demo` exports, without its training: the tiny SD pipeline of lokr_diffusers/tiny.py
    with a LoKr on the demo's targets (r 4, alpha 2, random factors), saved with format="comfyui"."""
    from lokr_diffusers import LoKrConfig, add_lokr
    from lokr_diffusers.demo import TINY_EXTRA_TARGETS
    from lokr_diffusers.export import save_lokr_weights
    from lokr_diffusers.tiny import make_sd_pipeline
    from lokr_diffusers.training.args import UNET_PRESETS

    pipe = make_sd_pipeline()
    config = LoKrConfig(r=4, alpha=2.0, target_modules=UNET_PRESETS["full"] + TINY_EXTRA_TARGETS, init_weights=False)
    add_lokr(pipe, {"unet": config}, "demo")
    path = str(tmp_path_factory.mktemp("tiny") / "lokr_comfyui.safetensors")
    return save_lokr_weights(pipe, path, "demo", format="comfyui")


def _file_ranks_and_scales(path: str) -> tuple[dict[str, int], list[float]]:
    """Per module of the file, by the consumers' rule (docs/formats.md §Scale rules), read off its tensors alone:
    rank = w2_b's rows, else w1_b's, else "full"; scale = alpha / rank with an alpha and a rank, else 1."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in load_file(path).items():
        name, leaf = key.rsplit(".", 1)
        modules.setdefault(name, {})[leaf] = t
    ranks: dict[str, int] = {}
    scales = []
    for tensors in modules.values():
        rank = tensors["lokr_w2_b"].shape[0] if "lokr_w2_b" in tensors else \
            tensors["lokr_w1_b"].shape[0] if "lokr_w1_b" in tensors else None
        ranks[str(rank or "full")] = ranks.get(str(rank or "full"), 0) + 1
        scales.append(float(tensors["alpha"]) / rank if "alpha" in tensors and rank else 1.0)
    return ranks, scales


def test_inspect_a_file_of_a_model_of_no_known_size(tiny_comfyui_file: str, capsys: pytest.CaptureFixture[str]
                                                   ) -> None:
    """The demo's own export: SD1.x names, shapes of no full-size model. Reported as base model unknown, with its
    layout, ranks and scales from the file alone, exit 0; --base sd15 still checks it against SD1.x and refuses."""
    ranks, scales = _file_ranks_and_scales(tiny_comfyui_file)
    assert main(["inspect", tiny_comfyui_file, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["base_model"] == "unknown" and info["layout"] == "kohya"
    assert "SD1.x" in info["base_note"] and "lora_unet_conv_in" in info["base_note"]
    adapter = info["adapters"]["default"]
    assert info["modules"] == sum(ranks.values()) and adapter["ranks"] == ranks
    assert adapter["scale_min"] == pytest.approx(min(scales)) and adapter["scale_max"] == pytest.approx(max(scales))
    assert adapter["alphas"] and adapter["unmatched_keys"] == 0
    assert main(["inspect", tiny_comfyui_file]) == 0
    text = capsys.readouterr().out
    assert "kohya layout, base model unknown" in text and f"ranks: {ranks}" in text
    assert f"scale {min(scales):.6g} .. {max(scales):.6g}" in text
    assert main(["inspect", tiny_comfyui_file, "--base", "sd15"]) == 2
    assert "lora_unet_conv_in -> unet.conv_in" in capsys.readouterr().err
