"""The generic floor: a diffusers transformer no model family names (CogView4, Sana, Mochi, Cosmos here) still
takes LoKr.

- `add_lokr` / `LoKrModel` with no target_modules adapt its attention and feed-forward Linears, checked against
  a list made here from diffusers' module names (to_q / to_k / to_v / to_out.0, the add_*_proj of joint
  attention, ff.net.0.proj / ff.net.2), not from the package's class-based rule;
- the layouts that name modules by their diffusers paths load exactly onto diffusers' pipeline for the class:
  a LoKr made and saved by LyCORIS itself (SimpleTuner's `lycoris_` layout) and the same tensors under
  `transformer.` and `lora_unet_` names give LyCORIS' own outputs; a PEFT folder written by PEFT gives PEFT's.
"""

from __future__ import annotations

import copy
import logging
import re
from typing import Any

import pytest
import torch
from helpers.generic_dit import GENERIC, generic_model, generic_pipeline, generic_run
from safetensors.torch import load_file, save_file
from torch import nn

from lokr_diffusers import LoKrConfig, LoKrModel, lokr_layers
from lokr_diffusers.targeting import default_target_modules

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest
NAMES = list(GENERIC)
# diffusers' names for the Linears of attention (Attention's projections, joint attention's context projections)
# and of FeedForward (GELU / SwiGLU projection in, projection out), under any block list
ATTENTION_AND_FF = re.compile(r".*\.(attn\d?|attn)\.(to_q|to_k|to_v|to_out\.0|add_[qkv]_proj|to_add_out)"
                              r"|.*\.ff(_context)?\.net\.(0\.proj|2)")


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_default_targets_are_the_attention_and_feed_forward_linears(name: str) -> None:
    model = generic_model(name)
    want = sorted(p for p, m in model.named_modules() if isinstance(m, nn.Linear) and ATTENTION_AND_FF.fullmatch(p))
    assert want, "the oracle found no Linear: the tiny config changed"
    assert sorted(default_target_modules(model)) == want
    adapted = LoKrModel(model, LoKrConfig(r=2, alpha=2, init_weights=False), "a")
    assert sorted(p for p, _ in lokr_layers(adapted.model)) == want
    assert sorted(default_target_modules(adapted.model)) == want  # the LoKr layers themselves, not their base


def _lycoris_file(name: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> tuple[nn.Module, torch.Tensor, str]:
    """(the bare model, LyCORIS' output with its LoKr on every Linear of the blocks, LyCORIS' saved file)."""
    from lycoris import LycorisNetwork, create_lycoris

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)
    monkeypatch.setattr(LycorisNetwork, "TARGET_REPLACE_MODULE", [GENERIC[name][2]])
    model = generic_model(name)
    base = copy.deepcopy(model)
    net = create_lycoris(model, 1.0, linear_dim=4, linear_alpha=2, algo="lokr", factor=4)
    net.apply_to()
    with torch.no_grad():  # LyCORIS starts at ΔW = 0
        for p in net.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    want = generic_run(model, name)
    path = str(tmp_path / "lycoris.safetensors")
    net.save_weights(path, torch.float32, {})
    return base, want, path


def _renamed(path: str, base: nn.Module, prefix: str, dotted: bool, out: str) -> str:
    """LyCORIS' file with each module named `prefix` + its diffusers path (dots kept, or as underscores)."""
    lyco = {"lycoris_" + p.replace(".", "_"): p for p, m in base.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d))}
    sd = {}
    for key, t in load_file(path).items():
        module, _, leaf = key.partition(".")
        p = lyco[module]
        sd[f"{prefix}{p if dotted else p.replace('.', '_')}.{leaf}"] = t
    save_file(sd, out)
    return out


@pytest.mark.parametrize("layout", ["lycoris", "transformer.", "lora_unet_"])
@pytest.mark.parametrize("name", NAMES)
def test_diffusers_path_layouts_load_as_lycoris_computes(name: str, layout: str, tmp_path: Any,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    base, want, path = _lycoris_file(name, tmp_path, monkeypatch)
    if layout != "lycoris":
        path = _renamed(path, base, layout, layout.endswith("."), str(tmp_path / "renamed.safetensors"))
    pipe = generic_pipeline(name, base)
    pipe.load_lokr_weights(path, adapter_name="style")
    assert pipe.get_list_lokr_adapters() == {"transformer": ["style"]}
    assert_close(generic_run(pipe.transformer, name), want)
    pipe.unload_lokr_weights()
    assert not list(lokr_layers(pipe.transformer))


@pytest.mark.parametrize("name", NAMES)
def test_a_peft_folder_loads_as_peft_computes(name: str, tmp_path: Any) -> None:
    from peft import LoKrConfig as PeftLoKrConfig
    from peft import get_peft_model

    base = generic_model(name)
    targets = default_target_modules(base)
    peft_model = get_peft_model(copy.deepcopy(base), PeftLoKrConfig(r=2, alpha=3, target_modules=targets,
                                                                    init_weights=False))
    want = generic_run(peft_model.base_model.model, name)
    peft_model.save_pretrained(str(tmp_path))
    pipe = generic_pipeline(name, base)
    pipe.load_lokr_weights(str(tmp_path))
    assert_close(generic_run(pipe.transformer, name), want)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "cosmos"])  # Cosmos' pipelines have no LoRA loader
def test_load_lora_weights_routes_lokr_files(name: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """diffusers' LoRA loader of the class's pipeline (CogView4LoraLoaderMixin, ...) refuses a LoKr file by
    itself ("Invalid LoRA checkpoint"); through it, LoKr files reach the LoKr loader."""
    base, want, path = _lycoris_file(name, tmp_path, monkeypatch)
    pipe = generic_pipeline(name, base)
    pipe.load_lora_weights(path, adapter_name="style")
    assert pipe.get_list_lokr_adapters() == {"transformer": ["style"]}
    assert_close(generic_run(pipe.transformer, name), want)
