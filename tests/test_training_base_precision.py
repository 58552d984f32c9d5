"""--base_precision: the flow script trains LoKr beside a quantized frozen denoiser (fp8 storage, torchao int8,
bitsandbytes nf4) on every family's tiny pipeline.

Each run: the denoiser's weights are quantized (fewer bytes, every adapted layer over a quantized base: the LoKr
layer's `quantization` names the scheme), the script resumes from its step-2 checkpoint to the very same factors,
and the file it writes loads onto the unquantized pipeline with exactly the factors training left (the checkpoint's)
and lowers the flow loss there on the training data (fixed noise and timesteps).
"""

from __future__ import annotations

import importlib
import logging
import os

import pytest
import torch
from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler
from helpers.flow_loss import flow_args, image_batch
from helpers.flow_runs import check_exact_resume, make_clip_folder
from safetensors.torch import load_file

from lokr_diffusers import families
from lokr_diffusers.model import lokr_layers
from lokr_diffusers.training.args import build_parser, parse
from lokr_diffusers.training.base_precision import quantize_base, weight_bytes
from lokr_diffusers.training.checks import check_args
from lokr_diffusers.training.clips import DreamBoothClipDataset, load_clip_folder
from lokr_diffusers.training.data import collate, make_synthetic_dataset
from lokr_diffusers.training.errors import TrainingInputError
from lokr_diffusers.training.flow import flow_loss
from lokr_diffusers.training.output import OURS_FILE
from lokr_diffusers.training.run import train

CPU = torch.device("cpu")
PROMPT = "a photo of sks dog"
# family: (resolution, frames of a clip (None: images), --max_sequence_length, more arguments)
RUNS = {
    "flux": (32, None, 16, ()),
    "sd3": (32, None, 16, ()),
    "flux2": (32, None, 16, ()),
    "zimage": (32, None, 16, ()),
    "chroma": (32, None, 16, ()),
    "qwenimage": (32, None, 16, ()),
    "qwenimage21": (32, None, 64, ()),
    "lumina2": (32, None, 256, ()),
    "hidream": (32, None, 24, ()),
    "wan": (16, 5, 16, ()),
    "ltxvideo": (32, 9, 16, ()),
    "ltx2": (32, 9, 16, ("--frame_rate", "24")),
    "hunyuanvideo": (16, 5, 16, ()),
    "hunyuanvideo15": (16, 5, 16, ()),
}
# each scheme once in the default suite (a cheap family each); every family x scheme with -m slow
DEFAULT = {("flux", "nf4"), ("wan", "fp8"), ("zimage", "int8")}
QUANTIZED = {"fp8": "fp8 storage", "int8": "torchao", "nf4": "bitsandbytes 4-bit"}
CASES = [pytest.param(f, p, marks=() if (f, p) in DEFAULT else pytest.mark.slow, id=f"{f}-{p}")
         for f in RUNS for p in QUANTIZED]


def _argv(model: str, data: str, out: str, family: str, precision: str, *extra: str) -> list[str]:
    resolution, frames, length, more = RUNS[family]
    clip = ["--num_frames", str(frames)] if frames else []
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", data, "--instance_prompt", PROMPT,
            "--resolution", str(resolution), *clip, "--train_batch_size", "2", "--max_train_steps", "4",
            "--learning_rate", "1e-2", "--rank", "4", "--seed", "0", "--output_dir", out, "--checkpointing_steps",
            "2", "--max_sequence_length", str(length), "--export_format", "none", "--base_precision", precision,
            *more, *extra]


def _batch(family: str, data: str) -> dict:
    resolution, frames, _, _ = RUNS[family]
    if frames is None:
        return image_batch(data, resolution)
    ds = DreamBoothClipDataset(load_clip_folder(data), PROMPT, frames, resolution=resolution, center_crop=True)
    return collate([ds[i] for i in range(len(ds))])


def _fixed_loss(pipe, family: str, batch: dict) -> float:
    """The flow loss on the training data with fixed noise and timesteps (one generator, uniform weighting)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    args = flow_args(family, weighting_scheme="none", max_sequence_length=RUNS[family][2], frame_rate=24.0)
    with torch.no_grad():
        return flow_loss(pipe, scheduler, batch, args, family, torch.Generator().manual_seed(0), torch.float32,
                         CPU).item()


@pytest.mark.parametrize("family, precision", CASES)
def test_the_flow_script_trains_beside_a_quantized_base(tmp_path, family: str, precision: str, caplog) -> None:
    model = str(tmp_path / "model")
    families.build_tiny(family).save_pretrained(model, safe_serialization=True)
    resolution, frames, _, _ = RUNS[family]
    data = make_clip_folder(str(tmp_path / "data"), clips=2, frames=frames + 2, size=resolution) if frames else \
        make_synthetic_dataset(str(tmp_path / "data"), n=4, size=resolution)
    out = str(tmp_path / "out")
    with caplog.at_level(logging.INFO, logger="lokr_diffusers.training.base_precision"):
        result = train(parse("t", True, _argv(model, data, out, family, precision), "flow"))
    assert result.global_step == 4
    assert f"--base_precision {precision}: the transformer's weights" in caplog.text
    check_exact_resume(out, str(tmp_path / "again"), _argv(model, data, str(tmp_path / "again"), family, precision,
                                                             "--resume_from_checkpoint", "latest"))
    # the file on the unquantized pipeline: exactly the factors training left, and a lower loss on the data
    checkpoint = load_file(os.path.join(out, "checkpoint-4", "adapter.safetensors"))
    loaded = DiffusionPipeline.from_pretrained(model)
    batch = _batch(family, data)
    base_loss = _fixed_loss(loaded, family, batch)
    loaded.load_lokr_weights(os.path.join(out, OURS_FILE))
    (name,) = loaded.get_list_lokr_adapters()["transformer"]
    layers = {f"transformer.{path}.{k}": t for path, layer in lokr_layers(loaded.transformer)
              for k, t in layer.factors(name).items()}
    assert layers.keys() == checkpoint.keys() and all(torch.equal(layers[k], checkpoint[k]) for k in checkpoint)
    assert _fixed_loss(loaded, family, batch) < base_loss


@pytest.mark.parametrize("precision", list(QUANTIZED))
def test_quantize_base_shrinks_the_denoiser_and_lokr_runs_beside_it(precision: str) -> None:
    """Fewer weight bytes (nf4 < int8 < fp8 < fp32), and every Linear LoKr adapts sits on the quantized scheme."""
    from lokr_diffusers import LoKrConfig, add_lokr

    pipe = families.build_tiny("flux")
    before, after = quantize_base(pipe.transformer, precision, torch.float32, CPU)
    assert before == weight_bytes(families.build_tiny("flux").transformer) and after < before
    add_lokr(pipe, {"transformer": LoKrConfig(r=4, alpha=4)})
    kinds = {layer.quantization for _, layer in lokr_layers(pipe.transformer)}
    assert kinds and all(k is not None and k.startswith(QUANTIZED[precision]) for k in kinds), kinds
    assert not any(p.requires_grad for n, p in pipe.transformer.named_parameters() if "lokr_" not in n)


def test_the_sizes_order_as_the_schemes_say() -> None:
    sizes = {}
    for precision in ("none", *QUANTIZED):
        pipe = families.build_tiny("flux")
        sizes[precision] = quantize_base(pipe.transformer, precision, torch.float32, CPU)[1]
    assert sizes["nf4"] < sizes["int8"] < sizes["fp8"] < sizes["none"]


def test_a_missing_quantizer_is_refused_before_anything_loads(tmp_path, monkeypatch) -> None:
    real = importlib.import_module
    monkeypatch.setattr(importlib, "import_module",
                        lambda name, *a: (_ for _ in ()).throw(ImportError(name)) if name == "torchao" else
                        real(name, *a))
    out = str(tmp_path / "out")
    argv = _argv(str(tmp_path / "no-model"), str(tmp_path), out, "flux", "int8")
    with pytest.raises(TrainingInputError, match=r"--base_precision int8 needs torchao: `pip install torchao`"):
        check_args(build_parser("t", True, "flow").parse_args(argv))  # what parse() runs, before any folder
    assert not os.path.exists(out)


def test_none_leaves_the_denoiser_as_it_is() -> None:
    pipe = families.build_tiny("flux")
    weights = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    assert quantize_base(pipe.transformer, "none", torch.float32, CPU) == (weight_bytes(pipe.transformer),) * 2
    assert all(torch.equal(v, weights[k]) for k, v in pipe.transformer.state_dict().items())
