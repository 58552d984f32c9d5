"""Export (`save_lokr_weights`, `pipe.save_lokr_weights`) read back, with the sources of
tests/helpers/sd_export.py (references written there from docs/formats.md):

- round trips through every format (ComfyUI with and without Tucker, diffusers, lokr_diffusers, PEFT) into a
  fresh pipeline give back the source's outputs; the method and the kohya / a1111 aliases write the same file;
- PEFT 0.21.2 loads the PEFT export, LyCORIS 4.1.3 the ComfyUI one (through the helper's kohya name map,
  its output-axis DoRA turned back into LyCORIS' magnitude by the helper's consumer rule);
- dtype (fp16 / bf16, alpha too), and atomic writes: a failed save leaves existing files untouched.

The portable file itself (consumer rules, kohya names, DoRA for ComfyUI, convert_lokr_file):
tests/test_export_comfyui.py.
"""

from __future__ import annotations

import copy
import importlib
import logging
import os
from collections.abc import Callable

import pytest
import torch
from helpers.lycoris_files import component_outputs, make_inputs, pipeline_outputs
from helpers.sd_adapters import tiny_pipe
from helpers.sd_export import (
    ATOL,
    UNET_TARGETS,
    A,
    components,
    export_source,
    kron_delta,
    metadata_of,
    modules_of,
    name_map,
    row_norm,
)
from safetensors.torch import load_file, save_file

import lokr_diffusers
from lokr_diffusers import LoKrConfig, add_lokr, lokr_layers, save_lokr_weights

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest


# ------------------------------------------------------------------------------- 1. round trips
ROUND_TRIPS = [  # (format, kwargs, extras in the source)
    ("comfyui", {}, True), ("comfyui", {"keep_tucker": True}, True), ("diffusers", {}, True),
    ("lokr_diffusers", {}, True), ("peft", {}, False),
]  # the aliases kohya / a1111 write the very same file (test_method_and_aliases_write_the_same_file)
# A ComfyUI file holds output-axis DoRA rescaled for ComfyUI's rule, which our reader (LyCORIS' rule) does not
# undo yet: its round trip is test_comfyui_output_axis_dora_round_trip; the others here keep that DoRA.


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
@pytest.mark.parametrize("fmt,kwargs,extras", ROUND_TRIPS,
                         ids=[f + ("-keep_tucker" if kw else "") for f, kw, _ in ROUND_TRIPS])
def test_round_trip(sources, tmp_path, kind: str, fmt: str, kwargs: dict, extras: bool) -> None:
    src, inputs, expected = sources(kind, extras, dora_out=fmt != "comfyui")
    path = str(tmp_path / ("out" if fmt == "peft" else "out.safetensors"))
    assert save_lokr_weights(src, path, adapter_name=A, format=fmt, **kwargs) == path
    if fmt == "peft":
        assert {"unet", "text_encoder"} <= set(os.listdir(path))
    pipe = tiny_pipe(kind == "sdxl")
    base = pipeline_outputs(pipe, inputs)
    pipe.load_lokr_weights(path)
    got = pipeline_outputs(pipe, inputs)
    for k in expected:
        assert (expected[k] - base[k]).abs().max() > 1e-2, f"{k}: the adapter must change the output"
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=ATOL, msg=k)


def test_comfyui_output_axis_dora_round_trip(sources, tmp_path) -> None:
    src, inputs, expected = sources("sd1", True)
    path = save_lokr_weights(src, str(tmp_path / "out.safetensors"), adapter_name=A)
    pipe = tiny_pipe(False)
    pipe.load_lokr_weights(path)
    got = pipeline_outputs(pipe, inputs)
    for k in expected:
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=ATOL, msg=k)


def test_method_and_aliases_write_the_same_file(sources, tmp_path) -> None:
    src = sources("sdxl", True)[0]
    files = {}
    for how in ("comfyui", "kohya", "a1111", "method"):
        os.makedirs(tmp_path / how)
        path = str(tmp_path / how / "same.safetensors")
        if how == "method":
            assert src.save_lokr_weights(path, adapter_name=A, format="comfyui") == path
        else:
            save_lokr_weights(src, path, adapter_name=A, format=how)
        files[how] = load_file(path), metadata_of(path)
    ref_sd, ref_meta = files["comfyui"]
    for how, (sd, meta) in files.items():
        assert sd.keys() == ref_sd.keys() and all(torch.equal(sd[k], v) for k, v in ref_sd.items()), how
        assert meta == ref_meta, how


# ----------------------------------------------------------------------------------- 2. PEFT
@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_peft_loads_the_peft_export(sources, tmp_path, kind: str) -> None:
    peft = pytest.importorskip("peft")
    sdxl = kind == "sdxl"
    if sdxl:  # UNet only: the folder itself is the adapter
        src = export_source(True, extras=False, te=False)
        inputs = make_inputs(src)
        expected = pipeline_outputs(src, inputs)
    else:
        src, inputs, expected = sources(kind, False)
    folder = tmp_path / "peft"
    save_lokr_weights(src, str(folder), adapter_name=A, format="peft")
    comps = ["unet"] if sdxl else ["unet", "text_encoder"]
    fresh = tiny_pipe(sdxl)
    for comp in comps:
        sub = folder if sdxl else folder / comp
        assert {"adapter_model.safetensors", "adapter_config.json"} <= set(os.listdir(sub)), comp
        setattr(fresh, comp, peft.PeftModel.from_pretrained(getattr(fresh, comp), str(sub)).eval())
    outputs = component_outputs(fresh.unet, {"text_encoder": fresh.text_encoder} if not sdxl else {}, inputs)
    for k, v in outputs.items():
        torch.testing.assert_close(v, expected[k], rtol=0, atol=ATOL, msg=k)


# ------------------------------------------------------------------------------------ 3. LyCORIS
# docs/formats.md §Oracles in tests: no TimestepEmbedding module target (duplicated names with unet_target_name)
LYCORIS_PRESET = {
    "enable_conv": True, "unet_target_module": ["Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"],
    "unet_target_name": ["conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2"],
    "text_encoder_target_module": ["CLIPAttention", "CLIPSdpaAttention", "CLIPMLP"], "text_encoder_target_name": []}


@pytest.mark.parametrize("kind", ["sd1", "sdxl"])
def test_lycoris_loads_the_comfyui_export(tmp_path, kind: str) -> None:
    """LyCORIS' kohya loader names UNet modules by diffusers paths and text encoders by their transformers 5
    paths (no `text_model.`): the SDXL UNet's ldm names and the `text_model` level are renamed here,
    through the test's own map; SD1 UNet names are read as written. LyCORIS re-plans each module from
    (rank, factor, decompose_both) and needs an alpha everywhere, so the source has no both-full layers
    and DoRA on LyCORIS' default output axis only. That DoRA is written for ComfyUI's rule (‖W‖, not
    ‖W + ΔW‖): the test turns it back into LyCORIS' magnitude, m = m' · (‖W + ΔW‖ + eps) / (‖W‖ + eps)."""
    kohya = importlib.reload(pytest.importorskip("lycoris.kohya"))  # apply_preset mutates class state
    logging.getLogger("LyCORIS").setLevel(logging.WARNING)
    kohya.LycorisNetworkKohya.apply_preset(LYCORIS_PRESET)  # its `full` preset crashes on diffusers' UNet
    sdxl = kind == "sdxl"
    src = tiny_pipe(sdxl)
    unet = LoKrConfig(r=2, alpha=1.5, target_modules=UNET_TARGETS, use_effective_conv2d=True, init_weights=False,
                      alpha_pattern={"to_v": 0.5, "conv2": 3.0})
    te = LoKrConfig(r=1, alpha=0.75, init_weights=False, decompose_both=True)
    add_lokr(src, {"unet": unet, "text_encoder": te} | ({"text_encoder_2": te} if sdxl else {}), A)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for comp in components(src):
            for i, (_, layer) in enumerate(lokr_layers(getattr(src, comp))):
                for t in layer.factors(A).values():
                    t.copy_(torch.randn(t.shape, generator=g) * 0.3)
                if i % 5 == 2:
                    w = layer.weight.detach()
                    norm = w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
                    layer.set_adapter_tensors(A, layer.factors(A), layer.scaling[A], dora_scale=norm * 1.2)
    assert any("lokr_t2" in la.factors(A) for _, la in lokr_layers(src.unet))
    path = save_lokr_weights(src, str(tmp_path / "lyco.safetensors"), adapter_name=A)
    sd = load_file(path)
    fresh = tiny_pipe(sdxl)
    comps = components(fresh)
    names = name_map(comps, kind)
    prefix = {"unet": "lora_unet_"} | ({"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"} if sdxl
                                       else {"text_encoder": "lora_te_"})
    renamed = {}
    eps = torch.finfo(torch.float32).eps
    for key, v in sd.items():
        module, suffix = key.split(".", 1)
        comp, p = names[module]
        if suffix == "dora_scale":
            w0 = comps[comp].get_submodule(p).weight.detach()
            assert v.shape[0] == w0.shape[0], f"{key}: the source has output-axis DoRA only"
            v = v * (row_norm(w0 + kron_delta(w0, modules_of(sd)[module])) + eps) / (row_norm(w0) + eps)
        renamed[f"{prefix[comp]}{p.replace('.', '_')}.{suffix}"] = v
    if not sdxl:
        assert {k for k in sd if k.startswith("lora_unet_")} == {k for k in renamed if k.startswith("lora_unet_")}
    tes = {c: copy.deepcopy(m) for c, m in comps.items() if c != "unet"}
    lyc_unet = copy.deepcopy(comps["unet"])
    te_arg = list(tes.values()) if sdxl else tes["text_encoder"]
    net, _ = kohya.create_network_from_weights(1.0, path, None, te_arg, lyc_unet, weights_sd=renamed,
                                               for_inference=True)
    assert len(net.unet_loras) + len(net.text_encoder_loras) == len(modules_of(sd))
    net.apply_to(te_arg, lyc_unet, apply_text_encoder=True, apply_unet=True)
    inputs = make_inputs(src)
    got, expected, base = (component_outputs(lyc_unet.eval(), tes, inputs), pipeline_outputs(src, inputs),
                           pipeline_outputs(fresh, inputs))
    for k in expected:
        assert (expected[k] - base[k]).abs().max() > 1e-2, k
        torch.testing.assert_close(got[k], expected[k], rtol=0, atol=ATOL, msg=k)


# ------------------------------------------------------------------------ 4. dtype, atomic writes
DTYPES = [("comfyui", "fp16", torch.float16), ("comfyui", torch.float16, torch.float16),
          ("comfyui", "bf16", torch.bfloat16), ("lokr_diffusers", "fp16", torch.float16),
          ("peft", "fp16", torch.float16)]


@pytest.mark.parametrize("fmt,dtype,want", DTYPES, ids=[f"{f}-{d}" for f, d, _ in DTYPES])
def test_dtype(sources, tmp_path, fmt: str, dtype, want: torch.dtype) -> None:
    src, inputs, expected = sources("sd1", fmt != "peft", dora_out=fmt != "comfyui")  # see ROUND_TRIPS
    ext = "" if fmt == "peft" else ".safetensors"
    ref = save_lokr_weights(src, str(tmp_path / f"ref{ext}"), adapter_name=A, format=fmt)
    path = save_lokr_weights(src, str(tmp_path / f"half{ext}"), adapter_name=A, format=fmt, dtype=dtype)
    files = [("unet/adapter_model.safetensors", "unet/adapter_model.safetensors")] if fmt == "peft" else [("", "")]
    for a, b in files:
        full, half = load_file(os.path.join(ref, a) if a else ref), load_file(os.path.join(path, b) if b else path)
        assert full.keys() == half.keys()
        for k, v in half.items():
            if k.endswith(".lokr_scale"):  # our lossless layout keeps the scale in fp64 (export.cast's docs)
                assert v.dtype == torch.float64 and torch.equal(v, full[k]), k
                continue
            assert v.dtype == want, f"{k}: {v.dtype}"  # alpha too, as LyCORIS does (docs/formats.md §Key layouts)
            assert torch.equal(v, full[k].to(want)), k
    if dtype == "fp16":
        pipe = tiny_pipe(False)
        pipe.load_lokr_weights(path)
        got = pipeline_outputs(pipe, inputs)
        for k in expected:
            torch.testing.assert_close(got[k], expected[k], rtol=0, atol=5e-2, msg=k)


def _listing(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _breaking_save(fail_on: int) -> Callable[..., None]:
    """safetensors' save_file, failing half-way through its `fail_on`-th file (disk full)."""
    calls: list[str] = []

    def save(tensors, filename, metadata=None) -> None:
        calls.append(filename)
        if len(calls) < fail_on:
            return save_file(tensors, filename, metadata=metadata)
        with open(filename, "wb") as fh:
            fh.write(b"half a file")
        raise OSError("disk full")

    return save


FAILURES = [  # (id, save_lokr_weights kwargs, error, source has DoRA, safetensors write that fails (0: none))
    ("unknown_format", {"format": "onnx"}, ValueError, True, 0),
    ("unknown_dtype", {"dtype": "fp8"}, ValueError, True, 0),
    ("unknown_adapter", {"adapter_name": "nope"}, ValueError, True, 0),
    ("peft_cannot_hold_dora", {"format": "peft"}, ValueError, True, 0),
    ("write_fails_midway", {"dtype": "fp16"}, OSError, True, 1),
    ("peft_first_write_fails", {"format": "peft", "dtype": "fp16"}, OSError, False, 1),
    # PEFT writes one folder per component: failing on the second must not leave a new unet beside an old te
    ("peft_second_write_fails", {"format": "peft", "dtype": "fp16"}, OSError, False, 2),
]


@pytest.mark.parametrize("case", FAILURES, ids=[f[0] for f in FAILURES])
def test_failed_save_leaves_existing_files_untouched(sources, tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                     case: tuple) -> None:
    _, kwargs, error, extras, fail_on = case
    src = sources("sd1", extras)[0]
    peft = kwargs.get("format") == "peft"
    target = tmp_path / ("out" if peft else "out.safetensors")
    if peft:  # an earlier (fp32) export sits in the folder
        save_lokr_weights(sources("sd1", False)[0], str(target), adapter_name=A, format="peft")
    else:
        save_file({"old": torch.ones(2)}, str(target), metadata={"old": "yes"})
    before = _listing(tmp_path)
    if fail_on:
        monkeypatch.setattr(lokr_diffusers.atomic, "save_file", _breaking_save(fail_on))
    with pytest.raises(error):
        save_lokr_weights(src, str(target), **{"adapter_name": A, **kwargs})
    after = _listing(tmp_path)
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"a failed save changed or left files: {changed}"


def test_save_into_a_missing_folder_fails_cleanly(sources, tmp_path) -> None:
    with pytest.raises(OSError):
        save_lokr_weights(sources("sd1", True)[0], str(tmp_path / "missing" / "x.safetensors"), adapter_name=A)
    assert not os.listdir(tmp_path)
