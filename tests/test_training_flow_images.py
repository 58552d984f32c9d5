"""Flow-matching training of Chroma, Qwen-Image, Lumina 2 and HiDream-I1 on their tiny offline pipelines (the
builders their records name: `families.build_tiny`), as tests/test_training_flow_families.py does FLUX.2 [klein] and
Z-Image.

The pieces (training/flow_models.py) against the pipelines themselves: the prompt encoders equal the pipelines'
`encode_prompt` (Chroma's mask that keeps one padding token, Qwen-Image's template tokens dropped, Lumina 2's system
prompt, HiDream's four encoders and Llama layer stack), and the velocity the loss trains equals the one the pipeline's
own denoising step applies (one Euler step of the pipeline from given latents at a given sigma, read back:
v = (x_after − x) / (σ_next − σ)). That pins the token packing and position ids, the masks, the timestep convention
(t / 1000 for Chroma and Qwen-Image, 1 − σ for Lumina 2, t for HiDream) and the sign (Lumina 2 and HiDream predict
x − ε).

The flow script end to end: family told from the folder, exact resume, the file reloads to the trained outputs, and
the loss on the training set (fixed noise and timesteps) falls.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from helpers.flow_loss import check_trained_file, flow_args, image_batch
from helpers.flow_runs import check_exact_resume

from lokr_diffusers import families
from lokr_diffusers.training.args import parse
from lokr_diffusers.training.data import make_synthetic_dataset
from lokr_diffusers.training.flow import flow_loss
from lokr_diffusers.training.flow_models import (
    encode_chroma,
    encode_hidream,
    encode_lumina2,
    encode_qwenimage,
    flow_model,
)
from lokr_diffusers.training.output import OURS_FILE
from lokr_diffusers.training.run import train

FAMILIES = ("chroma", "qwenimage", "lumina2", "hidream")
CAPTIONS = ("a photo of sks dog", "a red cat")  # unequal lengths: the masks have padding to keep out
CPU = torch.device("cpu")
# text tokens: Lumina 2 puts its long system prompt (spelt letter by letter by the tiny tokenizer) before the caption
LENGTH = {"chroma": 16, "qwenimage": 16, "lumina2": 256, "hidream": 24}
# the latents of a 32 px image in each piece's space (the tiny VAEs: 2x for Chroma, Qwen-Image and HiDream, 8x for
# Lumina 2)
SHAPES = {"chroma": (2, 4, 16, 16), "qwenimage": (2, 4, 16, 16), "lumina2": (2, 4, 4, 4), "hidream": (2, 4, 16, 16)}
PACKED = ("chroma", "qwenimage")  # pipelines whose `latents` are 2x2-packed tokens


def test_the_image_families_train_with_the_flow_script() -> None:
    for name, length in (("chroma", 512), ("qwenimage", 512), ("lumina2", 256), ("hidream", 128)):
        training = families.get(name).training
        assert training is not None and (training.script, training.text_encoders, training.weighting_scheme,
                                         training.max_sequence_length) == ("flow", (), "none", length)
        assert flow_model(name).family == name


def test_chroma_prompt_encoding_equals_the_pipelines() -> None:
    pipe = families.build_tiny("chroma")
    embeds, ids, mask = encode_chroma(pipe, list(CAPTIONS), 16, CPU)
    want, want_ids, want_mask, *_ = pipe.encode_prompt(list(CAPTIONS), device=CPU, do_classifier_free_guidance=False,
                                                       max_sequence_length=16)
    torch.testing.assert_close(embeds, want, rtol=0, atol=0)
    torch.testing.assert_close(ids, want_ids, rtol=0, atol=0)
    torch.testing.assert_close(mask, want_mask, rtol=0, atol=0)
    assert 0 < mask.sum(1).min() < mask.shape[1]  # something padded, something kept


def test_qwenimage_prompt_encoding_equals_the_pipelines() -> None:
    pipe = families.build_tiny("qwenimage")
    for captions, length in ((list(CAPTIONS), 16), (list(CAPTIONS), 4), ([CAPTIONS[0]] * 2, 16)):
        embeds, mask = encode_qwenimage(pipe, captions, length, CPU)
        want, want_mask = pipe.encode_prompt(captions, device=CPU, max_sequence_length=length)
        torch.testing.assert_close(embeds, want, rtol=0, atol=0)
        assert (mask is None) == (want_mask is None)  # None: no caption padded (equal captions, or cut short)
        if mask is not None:
            assert torch.equal(mask, want_mask)


def test_lumina2_prompt_encoding_equals_the_pipelines() -> None:
    pipe = families.build_tiny("lumina2")
    embeds, mask = encode_lumina2(pipe, list(CAPTIONS), LENGTH["lumina2"], CPU)
    want, want_mask, *_ = pipe.encode_prompt(list(CAPTIONS), do_classifier_free_guidance=False, device=CPU,
                                             max_sequence_length=LENGTH["lumina2"])
    torch.testing.assert_close(embeds, want, rtol=0, atol=0)
    assert torch.equal(mask, want_mask) and not bool(mask.all())


def test_hidream_prompt_encoding_equals_the_pipelines() -> None:
    """T5, the Llama's layers past the embeddings (layers, B, L, D) and both CLIPs' projected pooled vectors."""
    pipe = families.build_tiny("hidream")
    t5, llama, pooled = encode_hidream(pipe, list(CAPTIONS), LENGTH["hidream"], CPU)
    want_t5, _, want_llama, _, want_pooled, _ = pipe.encode_prompt(
        list(CAPTIONS), device=CPU, do_classifier_free_guidance=False, max_sequence_length=LENGTH["hidream"])
    for ours, want in ((t5, want_t5), (llama, want_llama), (pooled, want_pooled)):
        torch.testing.assert_close(ours, want, rtol=0, atol=0)
    assert llama.shape == (pipe.text_encoder_4.config.num_hidden_layers, 2, LENGTH["hidream"], 16)


def _args(family: str) -> SimpleNamespace:
    return SimpleNamespace(max_sequence_length=LENGTH[family], guidance_scale=None)


def _pack(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def _unpack(t: torch.Tensor, h: int, w: int) -> torch.Tensor:
    b, _, c4 = t.shape
    return t.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def _pipeline_velocity(pipe, family: str, x: torch.Tensor, sigma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(v, timestep): the velocity the pipeline's one denoising step applies to `x` (the piece's latent space) and
    the timestep it ran at (the scheduler shifts the sigma it is given). No guidance: the conditional prediction."""
    h, w = x.shape[-2:]
    kw = dict(prompt=list(CAPTIONS), height=32, width=32, num_inference_steps=1, sigmas=[sigma], output_type="latent",
              max_sequence_length=LENGTH[family], latents=_pack(x) if family in PACKED else x)
    if family != "qwenimage":  # Qwen-Image guides only with a negative prompt (true_cfg_scale)
        kw["guidance_scale"] = 1.0
    with torch.no_grad():
        out = pipe(**kw).images
    out = _unpack(out, h, w) if family in PACKED else out
    s = pipe.scheduler.sigmas
    return (out - x) / (s[1] - s[0]), pipe.scheduler.timesteps[:1]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_velocity_is_the_pipelines(family: str) -> None:
    pipe = families.build_tiny(family)
    model = flow_model(family)
    shape = SHAPES[family]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    want, t = _pipeline_velocity(pipe, family, x, 0.6)
    args = _args(family)
    with torch.no_grad():
        ours = model.velocity(pipe, x, t.expand(2), model.encode(pipe, list(CAPTIONS), args, CPU), args, CPU)
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-4)
    # the piece's latents are the space the pipeline's latents live in: same shape for a 32 px image
    pixels = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    with torch.no_grad():
        assert model.latents(pipe.vae, pixels, torch.Generator()).shape == shape


def test_hidream_trains_on_the_transformers_inference_outputs(tmp_path) -> None:
    """In train mode HiDream's transformer returns tokens (B, C, h/2 · w/2, 4) and adds its experts' load-balancing
    loss; the piece loads it with force_inference_output=True (as diffusers' script), so that train mode gives the
    inference outputs, the velocity the pipeline samples with."""
    pipe = families.build_tiny("hidream")
    pipe.save_pretrained(str(tmp_path), safe_serialization=True)
    model = flow_model("hidream")
    x = torch.randn(SHAPES["hidream"], generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300.0, 800.0])
    args = _args("hidream")
    cond = model.encode(pipe, list(CAPTIONS), args, CPU)
    loaded = model.load_components(SimpleNamespace(pretrained_model_name_or_path=str(tmp_path), revision=None,
                                                   variant=None))
    assert set(loaded) == model.supplies(SimpleNamespace()) == {"transformer"}
    with torch.no_grad():
        want = model.velocity(pipe, x, t, cond, args, CPU)
        pipe.transformer.train()
        assert model.velocity(pipe, x, t, cond, args, CPU).shape == (2, 4, 64, 4)
        pipe.transformer = loaded["transformer"].train()
        torch.testing.assert_close(model.velocity(pipe, x, t, cond, args, CPU), want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------- the flow script

def _argv(model: str, data: str, out: str, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", model, "--instance_data_dir", data, "--instance_prompt",
            "a photo of sks dog", "--resolution", "32", "--train_batch_size", "2", "--max_train_steps", "4",
            "--learning_rate", "1e-2", "--rank", "4", "--seed", "0", "--output_dir", out,
            "--checkpointing_steps", "2", "--export_format", "none", *extra]


def _velocity(pipe, family: str, cond: object) -> torch.Tensor:
    """The transformer's velocity on fixed latents, timesteps and text conditioning."""
    x = torch.randn(SHAPES[family], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return flow_model(family).velocity(pipe, x, torch.tensor([300.0, 800.0]), cond, _args(family), CPU)


def _fixed_loss(pipe, family: str, batch: dict, prompts: dict) -> float:
    """The flow loss on the whole training set with fixed noise and timesteps (one generator; uniform weighting)."""
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    with torch.no_grad():
        args = flow_args(family, weighting_scheme="none", max_sequence_length=LENGTH[family])
        return flow_loss(pipe, scheduler, batch, args, family, torch.Generator().manual_seed(0), torch.float32, CPU,
                         prompts=prompts).item()


# every family end to end in the default suite (tiny pipelines: a few seconds each)
@pytest.mark.parametrize("family", ["lumina2", "chroma", "qwenimage", "hidream"])
def test_the_flow_script_trains_resumes_exactly_and_its_file_reloads(tmp_path, family: str) -> None:
    """The one flow script tells the family from the model folder, trains it (the loss on the training set falls),
    resumes from a checkpoint to the very same adapter, and its file loads back to the trained model's outputs."""
    model = str(tmp_path / "model")
    families.build_tiny(family).save_pretrained(model, safe_serialization=True)
    data = make_synthetic_dataset(str(tmp_path / "data"), n=4, size=32)
    out = str(tmp_path / "out")
    length = ("--max_sequence_length", str(LENGTH[family]))
    args = parse("t", True, _argv(model, data, out, *length), "flow")
    result = train(args)
    assert (result.global_step, args.model_family, args.weighting_scheme, args.max_sequence_length) == \
        (4, family, "none", LENGTH[family])
    assert {"checkpoint-2", "checkpoint-4", OURS_FILE, "README.md"} <= set(os.listdir(out))
    # resume from the step-2 checkpoint in a fresh output folder: the same final factors, bit for bit
    again = str(tmp_path / "again")
    check_exact_resume(out, again, _argv(model, data, again, *length, "--resume_from_checkpoint", "latest"))
    # the trained model: the base with the step-4 checkpoint's factors (what training left in its layers)
    batch = image_batch(data)
    # its file, loaded into a fresh pipeline, gives the trained model's outputs and lowers the loss on the data
    check_trained_file(model, out, args, family, CAPTIONS, _args(family), batch, _velocity, _fixed_loss)


def test_an_export_comfyui_cannot_write_fails_before_the_first_step(tmp_path) -> None:
    """Lumina 2's to_q / to_k / to_v one by one have no ComfyUI name (rows of attention.qkv): the default
    --export_format comfyui is refused before training, nothing written (3 blocks x q, k, v of the tiny model)."""
    model = str(tmp_path / "model")
    families.build_tiny("lumina2").save_pretrained(model, safe_serialization=True)
    data = make_synthetic_dataset(str(tmp_path / "data"), n=2, size=32)
    out = str(tmp_path / "out")
    argv = [a for a in _argv(model, data, out, "--max_sequence_length", "256") if a != "none"]
    argv = [*argv[:argv.index("--export_format")], *argv[argv.index("--export_format") + 1:], "--export_format",
            "comfyui"]
    from lokr_diffusers.training.errors import TrainingInputError

    with pytest.raises(TrainingInputError, match=r"--export_format comfyui: 12 of the adapter's modules .*attn\.to_q"):
        train(parse("t", True, argv, "flow"))  # the command turns it into exit code 2
    assert not os.path.exists(out) or not os.listdir(out)


def test_hidreams_llama_comes_from_its_own_folder_when_the_model_has_none(tmp_path) -> None:
    """HiDream-I1's folders leave the Llama-3.1 text encoder out (diffusers loads it from meta-llama's): without
    --pretrained_text_encoder_4_name_or_path the run is refused naming it; with it, the pipeline has that Llama."""
    from lokr_diffusers.training.run import _load_pipeline

    pipe = families.build_tiny("hidream")
    llama = str(tmp_path / "llama")
    pipe.text_encoder_4.save_pretrained(llama)
    pipe.tokenizer_4.save_pretrained(llama)
    pipe.text_encoder_4 = pipe.tokenizer_4 = None
    model = str(tmp_path / "model")
    pipe.save_pretrained(model, safe_serialization=True)
    data = make_synthetic_dataset(str(tmp_path / "data"), n=2, size=32)
    from lokr_diffusers.training.errors import TrainingInputError

    with pytest.raises(TrainingInputError, match=r"without text_encoder_4, tokenizer_4 .*"
                                                 r"--pretrained_text_encoder_4_name_or_path"):
        train(parse("t", True, _argv(model, data, str(tmp_path / "out")), "flow"))
    assert not os.path.exists(tmp_path / "out")
    args = parse("t", True, _argv(model, data, str(tmp_path / "out"), "--pretrained_text_encoder_4_name_or_path",
                                  llama), "flow")
    loaded, _, family = _load_pipeline(args, CPU, torch.float32)
    assert family.name == "hidream" and type(loaded.text_encoder_4).__name__ == "LlamaForCausalLM"
    assert loaded.tokenizer_4.pad_token is not None
