"""`pipe.load_lokr_weights` on real LyCORIS 4.1.3 files: our outputs equal LyCORIS' own forward.

For each (tiny pipeline kind) x (LyCORIS kohya-wrapper variant, see `lycoris_files.VARIANTS`):
LyCORIS writes a file from random factors and runs the UNet and text encoder(s) with itself
applied (`expected`); a fresh pipeline then loads the file with `load_lokr_weights(path,
adapter_name="x")` and must give the same UNet `.sample`, text encoder last_hidden_state (and
text_embeds for SDXL's text_encoder_2) to ATOL, while the adapter moves every output by far more
than ATOL (so the test can fail). fp16 files hold exactly the fp16-rounded factors LyCORIS ran with
(`lycoris_files` rounds before running), so they get the same tolerance: a loader that casts the
file's tensors to the pipeline's fp32 reproduces them exactly.

Every key must be used: load_lokr_weights raises on unmatched keys (strict=True by default), and
the number of LoKr layers holding adapter "x" in each component must equal the file's module count.
LyCORIS files are built once per module (about 0.5 s each, ~15 s for all).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers.lycoris_files import (
    KINDS,
    VARIANT_IDS,
    VARIANTS,
    LycorisFile,
    Variant,
    build_lycoris_file,
    make_pipeline,
    pipeline_outputs,
)
from torch import nn

import lokr_diffusers  # attaches load_lokr_weights to diffusers pipelines

ATOL = 1e-5  # fp32 end to end; a merged-weight replay of the files stays under 3.5e-6 on these models
MIN_EFFECT = 1000 * ATOL  # every output must move at least this much with the adapter (observed: ~1)
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
CASES = [pytest.param(kind, v, id=f"{kind}-{v.id}") for kind in KINDS for v in VARIANTS]

GetFile = Callable[[str, Variant], LycorisFile]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest


@pytest.fixture(scope="module")
def lycoris_file(tmp_path_factory: pytest.TempPathFactory) -> GetFile:
    """(kind, variant) -> LycorisFile, each built once per module from one source pipeline per kind."""
    directory = str(tmp_path_factory.mktemp("lycoris_files"))
    sources: dict[str, Any] = {}
    cache: dict[tuple[str, str], LycorisFile] = {}

    def get(kind: str, variant: Variant) -> LycorisFile:
        if (kind, variant.id) not in cache:
            if kind not in sources:
                sources[kind] = make_pipeline(kind)
            cache[kind, variant.id] = build_lycoris_file(sources[kind], variant, directory)
        return cache[kind, variant.id]

    return get


def count_adapted(module: nn.Module, adapter_name: str) -> int:
    return sum(1 for _, layer in lokr_diffusers.lokr_layers(module) if adapter_name in layer.adapter_names())


def fresh_pipeline(lf: LycorisFile) -> Any:
    """A pipeline with the weights LyCORIS started from (checked: same base outputs, bit for bit)."""
    pipe = make_pipeline(lf.kind)
    base = pipeline_outputs(pipe, lf.inputs)
    for k, v in lf.base.items():
        assert torch.equal(base[k], v), f"{k}: the fresh pipeline is not the one LyCORIS ran on"
    return pipe


def assert_matches_lycoris(pipe: Any, lf: LycorisFile, adapter_name: str) -> None:
    adapted = {c: count_adapted(getattr(pipe, c), adapter_name) for c in COMPONENTS if getattr(pipe, c, None)}
    want = {c: len(lf.modules.get(c, [])) for c in adapted}
    assert adapted == want, f"LoKr layers with adapter {adapter_name!r} per component != modules in the file"

    ours = pipeline_outputs(pipe, lf.inputs)
    assert set(ours) == set(lf.expected)
    for key, expected in lf.expected.items():
        effect = (expected - lf.base[key]).abs().max().item()
        assert effect > MIN_EFFECT, f"{key}: the adapter barely changes the output ({effect:.2e})"
        where = f"{lf.kind}/{lf.variant.id} {key}"
        torch.testing.assert_close(ours[key], expected, atol=ATOL, rtol=0, msg=lambda m: f"{where}: {m}")  # noqa: B023


# ------------------------------------------------------------------------------------------ tests
@pytest.mark.parametrize(("kind", "variant"), CASES)
def test_load_lycoris_file_matches_lycoris(lycoris_file: GetFile, kind: str, variant: Variant) -> None:
    lf = lycoris_file(kind, variant)
    pipe = fresh_pipeline(lf)
    pipe.load_lokr_weights(lf.path, adapter_name="x")
    assert_matches_lycoris(pipe, lf, "x")


@pytest.mark.parametrize("kind", KINDS)
def test_load_lycoris_state_dict(lycoris_file: GetFile, kind: str) -> None:
    """The same file given as an in-memory state dict (tucker: conv Tucker factors, two ranks)."""
    lf = lycoris_file(kind, VARIANTS[VARIANT_IDS.index("tucker")])
    pipe = fresh_pipeline(lf)
    pipe.load_lokr_weights({k: v.clone() for k, v in lf.tensors.items()}, adapter_name="x")
    assert_matches_lycoris(pipe, lf, "x")


@pytest.mark.parametrize("kind", KINDS)
def test_load_lycoris_directory_and_weight_name(lycoris_file: GetFile, kind: str) -> None:
    """diffusers' local form: `load_lokr_weights(directory, weight_name=file name)`."""
    lf = lycoris_file(kind, VARIANTS[VARIANT_IDS.index("dora_out")])
    pipe = fresh_pipeline(lf)
    pipe.load_lokr_weights(os.path.dirname(lf.path), adapter_name="x", weight_name=os.path.basename(lf.path))
    assert_matches_lycoris(pipe, lf, "x")


@pytest.mark.parametrize("kind", KINDS)
def test_lycoris_naming_facts(lycoris_file: GetFile, kind: str) -> None:
    """What LyCORIS 4.1.3 + transformers 5 write (the loader must accept exactly this; docs/formats.md §Key layouts).
    Runs without the loader: a canary for upstream naming changes."""
    lf = lycoris_file(kind, VARIANTS[VARIANT_IDS.index("default")])
    unet = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    assert unet in lf.modules["unet"]
    assert "lora_unet_conv_in" in lf.modules["unet"] and "lora_unet_time_embedding_linear_1" in lf.modules["unet"]
    if kind == "sd":
        # CLIPTextModel: no `text_model.` level under transformers 5
        assert "lora_te_encoder_layers_0_self_attn_q_proj" in lf.modules["text_encoder"]
        assert set(lf.modules) == {"unet", "text_encoder"}
    else:
        assert "lora_te1_encoder_layers_0_self_attn_q_proj" in lf.modules["text_encoder"]
        # CLIPTextModelWithProjection keeps `text_model.`
        assert "lora_te2_text_model_encoder_layers_0_mlp_fc1" in lf.modules["text_encoder_2"]
    assert lf.metadata["ss_network_module"] == "lycoris.kohya" and "sshs_model_hash" in lf.metadata
