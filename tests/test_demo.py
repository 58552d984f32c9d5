"""The offline demo (`lokr-diffusers demo`), run once in a fast mode (12 steps, 32 px, 3 checkpoints):
its pictures are real PNGs, its summary names every file, the sampled latent gets closer to the
training latent as the LoKr trains, and the exported ComfyUI file gives back the trained latent."""

from __future__ import annotations

import json
import os
from typing import Any

import pytest
import torch
from PIL import Image

from lokr_diffusers.demo import DemoSettings, checkpoint_steps, load_demo_pipeline, rms, run_demo, sample_latent

STEPS, RESOLUTION, CHECKPOINTS = 12, 32, 3
PICTURES = {  # file: minimum (width, height)
    "latents_over_training.png": (400, 3 * 128),
    "loss_curve.png": (300, 200),
    "delta_w_kron.png": (300, 200),
    "training_image.png": (RESOLUTION, RESOLUTION),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: threads only cost time


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Any]:
    out = str(tmp_path_factory.mktemp("demo"))
    torch.set_num_threads(2)  # run_demo works on one thread and must give the caller's setting back
    try:
        paths = run_demo(out, steps=STEPS, resolution=RESOLUTION, checkpoints=CHECKPOINTS)
        threads_after = torch.get_num_threads()
    finally:
        torch.set_num_threads(1)
    with open(paths["summary"], encoding="utf-8") as fh:
        summary = json.load(fh)
    return {"out": out, "paths": paths, "summary": summary, "threads_after": threads_after}


@pytest.mark.parametrize("name", sorted(PICTURES))
def test_pictures_are_valid_pngs(demo: dict[str, Any], name: str) -> None:
    path = os.path.join(demo["out"], name)
    with Image.open(path) as image:
        image.verify()  # a truncated or corrupt file raises here
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        assert (width, height) >= PICTURES[name] and width <= 2000 and height <= 2000, (name, image.size)
        low, high = image.convert("L").getextrema()
        assert high - low > 50, f"{name} is (nearly) one flat colour"


def test_summary_names_every_file(demo: dict[str, Any]) -> None:
    files = demo["summary"]["files"]
    assert set(os.listdir(demo["out"])) == set(files)
    for name, info in files.items():
        assert os.path.isfile(info["path"]) and os.path.basename(info["path"]) == name
        assert len(info["shows"]) > 10, name
    assert {os.path.basename(p) for p in demo["paths"].values()} == set(files)
    with open(demo["paths"]["summary_text"], encoding="utf-8") as fh:
        text = fh.read()
    for info in files.values():
        assert info["path"] in text and info["shows"] in text
    assert f"{demo['summary']['latent_distance']['lokr_final']:.3f}" in text


def test_sampled_latent_moves_to_the_target(demo: dict[str, Any]) -> None:
    s = demo["summary"]
    per = s["latent_distance"]["per_checkpoint"]
    assert [c["step"] for c in per] == checkpoint_steps(STEPS, CHECKPOINTS) == [0, 6, 12]
    assert per[0]["lokr"] == pytest.approx(per[0]["base"])  # step 0: W1 = 0, the LoKr changes nothing
    assert per[-1]["lokr"] < 0.9 * per[0]["lokr"], per  # a clear move towards the training latent
    assert s["loss"]["last_smoothed"] < s["loss"]["first_smoothed"]
    assert s["steps"] == STEPS and s["prediction_type"] == "sample"


def test_reloaded_comfyui_file_gives_the_trained_latent(demo: dict[str, Any]) -> None:
    s = demo["summary"]
    assert s["reloaded_comfyui_max_abs_latent_diff"] <= 1e-5
    # the same, checked here: the lossless file (the trained tensors) and the ComfyUI file, each
    # loaded into a fresh pipeline, sample the same latent, and it is the trained one, not the base's
    settings = DemoSettings(steps=STEPS, resolution=RESOLUTION)
    latents = {}
    for name in ("pytorch_lokr_weights.safetensors", "lokr_comfyui.safetensors", None):
        pipe, _ = load_demo_pipeline(settings, s["vae_scaling_factor"])
        if name is not None:
            pipe.load_lokr_weights(os.path.join(demo["out"], name), adapter_name="check")
        latents[name] = sample_latent(pipe, settings)
    ours, comfy, base = latents.values()
    torch.testing.assert_close(comfy, ours, rtol=1e-5, atol=1e-5)
    assert rms(comfy, base) > 0.1


def test_delta_w_picture_is_the_layers_kron(demo: dict[str, Any]) -> None:
    k = demo["summary"]["delta_w"]
    out_l, in_m = k["w1_shape"]
    out_k, in_n = k["w2_shape"]
    assert k["delta_w_shape"] == [out_l * out_k, in_m * in_n]
    assert k["kron_check_max_abs_diff"] <= 1e-6 * max(k["delta_w_max_abs"], 1.0)
    assert k["delta_w_max_abs"] > 0  # trained: W1 left its zero init


def test_threads_restored(demo: dict[str, Any]) -> None:
    assert demo["threads_after"] == 2


def test_checkpoint_steps() -> None:
    assert checkpoint_steps(100, 5) == [0, 25, 50, 75, 100]
    assert checkpoint_steps(2, 5) == [0, 1, 2]
    assert checkpoint_steps(1, 1) == [0, 1]
