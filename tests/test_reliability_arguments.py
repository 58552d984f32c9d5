"""A catalogue of bad arguments beside the files (issue 8): lokr_state_dict's arguments, configs (invalid regex,
types), the CLI (exit 2, one line, no traceback), and the rules behind them: where ComfyUI / A1111 define a
meaning (alpha 0 or negative) it is checked against that meaning, computed here by hand from the file's tensors;
metadata and adapter_config.json never override a file's alpha tensors; the base model read from a file.

Each case is one row of a table: it builds a bad input from a valid one (tests/helpers/bad_files.py, through
tests/helpers/writers.py, writes the valid LoKr files of a source pipeline made with add_lokr), makes the public
call, and checks the error class, exactly, a message fragment that says what is wrong and names the file, key or
argument at fault, and that nothing changed (files byte-identical; the pipeline as tests/helpers/bad_files.py's
`assert_same_state` says). Bad files loaded into a pipeline: tests/test_reliability_loads.py.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.bad_files import (
    INF,
    KOHYA_TO_Q,
    TO_Q,
    Env,
    altered,
    assert_same_state,
    digest,
    edit,
    first_key,
    lora_only,
    peft_folder,
    save_sd,
)
from torch import Tensor

import lokr_diffusers
from lokr_diffusers import LoKrConfig, add_lokr
from lokr_diffusers.cli import main
from lokr_diffusers.tiny import make_sd_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest


# --------------------------------------------------------------------- lokr_state_dict's arguments
API_CASES: list[Any] = [
    pytest.param(None, {}, TypeError, "got NoneType", id="api-none"),
    pytest.param(3, {}, TypeError, "got int", id="api-int"),
    pytest.param(["style.safetensors"], {}, TypeError, "got list", id="api-list"),
    pytest.param(b"style.safetensors", {}, TypeError, "got bytes", id="api-bytes-path"),
    pytest.param({"a.lokr_w1": 1.0}, {}, TypeError, "a.lokr_w1 (float)", id="api-dict-float-value"),
    pytest.param({"a.lokr_w1": [[1.0]]}, {}, TypeError, "a.lokr_w1 (list)", id="api-dict-list-value"),
    pytest.param({3: torch.ones(2, 2)}, {}, TypeError, "keys that are not str: [3]", id="api-dict-int-key"),
    pytest.param({}, {}, ValueError, "is empty", id="api-empty-dict"),
    pytest.param("", {}, ValueError, "the path is empty", id="api-empty-path"),
    pytest.param("x.safetensors", {"weight_name": 5}, TypeError, "weight_name must be a str", id="api-weight-name-int"),
    pytest.param("x.safetensors", {"revison": "main"}, TypeError, "unknown arguments ['revison']",
                 id="api-unknown-kwarg"),
]


@pytest.mark.parametrize(("arg", "kwargs", "error", "fragment"), API_CASES)
def test_bad_arguments_to_lokr_state_dict(env: Env, arg: Any, kwargs: dict[str, Any], error: type,
                                          fragment: str) -> None:
    with pytest.raises(Exception) as caught:
        lokr_diffusers.lokr_state_dict(arg, **kwargs)
    assert type(caught.value) is error, f"{type(caught.value).__name__}: {caught.value}"
    assert fragment in str(caught.value)
    with pytest.raises(error):  # the pipeline method says the same and changes nothing
        env.sd_pipe.load_lokr_weights(arg, **kwargs)
    assert_same_state(env.sd_state, env.sd_pipe)


# ------------------------------------------------------------------------------------- configs
CONFIG_CASES: list[Any] = [
    pytest.param({"target_modules": "to_q["}, ValueError, "target_modules: 'to_q[' is not a valid regular",
                 id="config-target-regex"),
    pytest.param({"exclude_modules": "(to_k"}, ValueError, "exclude_modules: '(to_k' is not a valid regular",
                 id="config-exclude-regex"),
    pytest.param({"target_modules": ["to_q"], "rank_pattern": {"*to_q": 4}}, ValueError,
                 "rank_pattern: '*to_q' is not a valid regular", id="config-rank-pattern-regex"),
    pytest.param({"target_modules": ["to_q"], "alpha_pattern": {"to_[q": 4}}, ValueError,
                 "alpha_pattern: 'to_[q' is not a valid regular", id="config-alpha-pattern-regex"),
    pytest.param({"target_modules": ["to_q"], "layers_to_transform": [0], "layers_pattern": "blocks["}, ValueError,
                 "layers_pattern: 'blocks[' is not a valid regular", id="config-layers-pattern-regex"),
    pytest.param({"target_modules": ["to_q"], "modules_to_save": ["conv_in)"]}, ValueError,
                 "modules_to_save: 'conv_in)' is not a valid regular", id="config-modules-to-save-regex"),
    pytest.param({"target_modules": [1, 2]}, TypeError, "target_modules must be a list of str",
                 id="config-targets-ints"),
    pytest.param({"alpha": "8"}, TypeError, "alpha must be a number, got '8'", id="config-alpha-string"),
    pytest.param({"alpha": float("inf")}, ValueError, "alpha must be finite", id="config-alpha-inf"),
    pytest.param({"rank_pattern": {"to_q": "4"}}, ValueError, "rank_pattern['to_q'] must be a positive integer",
                 id="config-rank-pattern-value"),
    pytest.param({"decompose_both": "yes"}, TypeError, "decompose_both must be True or False",
                 id="config-bool-field-string"),
    pytest.param({"layers_to_transform": ["0"]}, TypeError, "layers_to_transform must be an int",
                 id="config-layers-strings"),
]


@pytest.mark.parametrize(("kwargs", "error", "fragment"), CONFIG_CASES)
def test_bad_config_is_refused_when_made(kwargs: dict[str, Any], error: type, fragment: str) -> None:
    with pytest.raises(Exception) as caught:
        LoKrConfig(**kwargs)
    assert type(caught.value) is error, f"{type(caught.value).__name__}: {caught.value}"
    assert fragment in str(caught.value)


@pytest.mark.parametrize(("field_name", "value"), [("target_modules", "to_q["), ("exclude_modules", "(to_k"),
                                                   ("rank_pattern", {"to_q(": 4})],
                         ids=["add-target-regex", "add-exclude-regex", "add-rank-pattern-regex"])
def test_config_changed_after_creation_still_fails_cleanly(env: Env, field_name: str, value: Any) -> None:
    config = LoKrConfig(r=2, target_modules=["to_q"])
    setattr(config, field_name, value)
    shown = value if isinstance(value, str) else next(iter(value))
    with pytest.raises(ValueError, match=rf"{field_name}: '{__import__('re').escape(shown)}' is not a valid regular"):
        add_lokr(env.sd_pipe, {"unet": config}, "bad")
    assert_same_state(env.sd_state, env.sd_pipe)


def test_config_file_errors_name_the_file(tmp_path: Path) -> None:
    for text, fragment in [("{", "not valid JSON: Expecting property name enclosed in double quotes at line 1 "
                                 "column 2"),
                           ('"r"', "holds a JSON str, not an object"), ('{"r": 0}', "r must be a positive integer")]:
        (tmp_path / "adapter_config.json").write_text(text)
        with pytest.raises(ValueError) as caught:
            LoKrConfig.from_pretrained(tmp_path)
        assert str(tmp_path / "adapter_config.json") in str(caught.value) and fragment in str(caught.value)


# ----------------------------------------------------------------------------------------- CLI
@dataclass
class Cli:
    """`lokr-diffusers <argv>`: exit code 2, one line on stderr naming `names`; `watch` unchanged;
    `absent` paths (outputs) not created."""

    argv: list[str]
    names: list[str]
    watch: list[str] = field(default_factory=list)
    absent: list[str] = field(default_factory=list)


def _read_only_dir(tmp: Path) -> str:
    folder = tmp / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with open(folder / "probe", "wb"):
            pass
    except OSError:
        return str(folder)
    os.remove(folder / "probe")  # root: permissions do not bind; sysfs refuses new files to everyone
    if os.path.isdir("/sys"):
        return "/sys"
    pytest.skip("no read-only folder on this machine")


def _fake_model(tmp: Path) -> str:
    model = tmp / "model"
    model.mkdir()
    (model / "model_index.json").write_text("{}")
    return str(model)


def _convert(env: Env, tmp: Path, out: str, *extra: str, sd: dict[str, Tensor] | None = None) -> Cli:
    src = save_sd(tmp, env.good if sd is None else sd)
    return Cli(["convert", src, out, *extra], [], [src], [out] if not os.path.exists(out) else [])


def _named(cli: Cli, *names: str) -> Cli:
    cli.names += list(names)
    return cli


def _to_k(name: str, width: int, out: int = 320) -> dict[str, Tensor]:
    """One attn2.to_k LoKr module of a full-size UNet whose cross-attention width is `width`
    (W1 (16, 32) x W2 (out/16, width/32) at rank 4)."""
    return {f"{name}.lokr_w1": torch.ones(16, 32), f"{name}.lokr_w2_a": torch.ones(out // 16, 4),
            f"{name}.lokr_w2_b": torch.ones(4, width // 32), f"{name}.alpha": torch.tensor(4.0)}


def _sd2_to_k() -> dict[str, Tensor]:
    return _to_k("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 1024)


def _garbage(tmp: Path, name: str = "style.safetensors") -> str:
    (tmp / name).write_bytes(b"\x00\x01garbage" * 40)
    return str(tmp / name)


CLI_CASES: list[Any] = [
    pytest.param(lambda e, t: Cli(["inspect", _garbage(t)], ["style.safetensors"], [_garbage(t)]),
                 "not a valid safetensors file", id="cli-inspect-garbage"),
    pytest.param(lambda e, t: Cli(["inspect", str(t / "nope.safetensors")], ["nope.safetensors"]),
                 "no such file or folder", id="cli-inspect-missing"),
    pytest.param(lambda e, t: Cli(["inspect", altered(t, e, lambda d: b"")], ["style.safetensors"]),
                 "empty (0 bytes)", id="cli-inspect-empty"),
    pytest.param(lambda e, t: Cli(["inspect", save_sd(t, edit(e, lambda e: first_key(e, "alpha"), lambda v: v * INF))],
                                  ["style.safetensors", ".alpha"]), "NaN or infinite", id="cli-inspect-inf-alpha"),
    pytest.param(lambda e, t: Cli(["inspect", peft_folder(t, e, config=None)], ["adapter_config.json"]),
                 "PEFT-layout LoKr weights", id="cli-inspect-peft-no-config"),
    pytest.param(lambda e, t: Cli(["inspect", peft_folder(t, e, config="{")], ["adapter_config.json"]),
                 "not valid JSON", id="cli-inspect-peft-bad-json"),
    pytest.param(lambda e, t: Cli(["inspect", "x.safetensors", "--base", "sd3"], ["--base"]),
                 "invalid choice: 'sd3'", id="cli-inspect-bad-base"),
    pytest.param(lambda e, t: _named(_convert(e, t, str(t / "o.safetensors"), "--to", "ckpt"), "--to"),
                 "invalid choice: 'ckpt'", id="cli-convert-bad-to"),
    pytest.param(lambda e, t: _named(_convert(e, t, str(t / "o.safetensors")), "--to"),
                 "the following arguments are required", id="cli-convert-no-to"),
    pytest.param(lambda e, t: _named(_convert(e, t, str(t / "missing" / "o.safetensors"), "--to", "comfyui"),
                                     str(t / "missing")), "does not exist", id="cli-convert-out-missing-folder"),
    pytest.param(lambda e, t: _named(_convert(e, t, os.path.join(_read_only_dir(t), "o.safetensors"), "--to",
                                              "comfyui", "--base", "sd15"), "o.safetensors"), "is not writable",
                 id="cli-convert-out-read-only"),
    pytest.param(lambda e, t: _named(_convert(e, t, str(t), "--to", "comfyui"), str(t)), "existing folder",
                 id="cli-convert-out-is-folder"),
    pytest.param(lambda e, t: _named(_convert(e, t, save_sd(t, e.good, "taken.bin"), "--to", "peft"), "taken.bin"),
                 "existing file", id="cli-convert-peft-out-is-file"),
    pytest.param(lambda e, t: _named(Cli(["convert", _garbage(t), str(t / "o.safetensors"), "--to", "comfyui"], [],
                                         [_garbage(t)], [str(t / "o.safetensors")]), "style.safetensors"),
                 "not a valid safetensors file", id="cli-convert-garbage"),
    pytest.param(lambda e, t: _named(_convert(e, t, str(t / "o.safetensors"), "--to", "comfyui", sd=lora_only(e)),
                                     "style.safetensors"), "no LoKr modules, only 2 LoRA modules",
                 id="cli-convert-lora-only"),
    pytest.param(lambda e, t: _named(_convert(e, t, str(t / "o.safetensors"), "--to", "comfyui"), "--base"),
                 "cannot tell which base model", id="cli-convert-base-unknown"),
    pytest.param(lambda e, t: _named(_convert(e, t, str(t / "o.safetensors"), "--to", "comfyui", "--base", "sd15",
                                              sd=e.sdxl), "lora_unet_input_blocks"),
                 "looks like an SDXL LoKr; the pipeline is SD1.x", id="cli-convert-sdxl-file-as-sd15"),
    pytest.param(lambda e, t: _named(_convert(e, t, str(t / "o.safetensors"), "--to", "comfyui", "--base", "sd15",
                                              sd=_sd2_to_k()), "cross-attention width 1024"),
                 "looks like an SD2.x LoKr; the pipeline is SD1.x", id="cli-convert-sd2-file-as-sd15"),
    pytest.param(lambda e, t: Cli(["merge", "--model", str(t / "no_model"), "--lokr", "x", "--out", str(t / "o")],
                                  ["--model", "no_model"], [], [str(t / "o")]), "no such file or folder",
                 id="cli-merge-missing-model"),
    pytest.param(lambda e, t: Cli(["merge", "--model", str(t), "--lokr", "x", "--out", str(t / "o")],
                                  ["--model"], [str(t)], [str(t / "o")]), "not a diffusers pipeline folder",
                 id="cli-merge-not-a-pipeline"),
    pytest.param(lambda e, t: Cli(["merge", "--model", _fake_model(t), "--lokr", _garbage(t), "--out", str(t / "o")],
                                  ["style.safetensors"], [_garbage(t), str(t / "model")], [str(t / "o")]),
                 "not a valid safetensors file", id="cli-merge-garbage-lokr"),
    pytest.param(lambda e, t: Cli(["merge", "--model", _fake_model(t), "--lokr", save_sd(t, e.good), "--out",
                                   str(t / "missing" / "o")], [str(t / "missing")], [str(t / "model")],
                                  [str(t / "missing")]), "does not exist", id="cli-merge-out-missing-parent"),
    pytest.param(lambda e, t: Cli(["merge", "--model", _fake_model(t), "--lokr", "x", "--out", str(t / "model")],
                                  ["--out", "--model"], [str(t / "model")]), "must differ",
                 id="cli-merge-out-is-model"),
    pytest.param(lambda e, t: Cli(["merge", "--model", "m", "--lokr", "x", "--out", "o", "--scale", "nan"],
                                  ["--scale"]), "invalid finite number value: 'nan'", id="cli-merge-scale-nan"),
    pytest.param(lambda e, t: Cli(["demo", "--steps", "0"], ["--steps"]), "invalid positive integer value: '0'",
                 id="cli-demo-steps-zero"),
    pytest.param(lambda e, t: Cli(["inspekt", "x"], ["inspekt"]), "invalid choice", id="cli-unknown-command"),
    pytest.param(lambda e, t: Cli([], ["COMMAND"]), "the following arguments are required", id="cli-no-command"),
]


@pytest.mark.parametrize(("build", "fragment"), CLI_CASES)
def test_cli_bad_input_is_one_line_and_exit_2(env: Env, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              build: Callable[[Env, Path], Cli], fragment: str) -> None:
    cli = build(env, tmp_path)
    files = {p: digest(p) for p in cli.watch}
    capsys.readouterr()
    code = main(cli.argv)
    out, err = capsys.readouterr()
    command = cli.argv[0] if cli.argv and cli.argv[0] in ("inspect", "convert", "merge", "demo") else None
    prefix = f"lokr-diffusers {command}: error: " if command else "lokr-diffusers: error: "
    assert code == 2 and out == "", (code, out, err)
    assert err.endswith("\n") and err.count("\n") == 1 and err.startswith(prefix), err
    assert fragment in err and "Traceback" not in err, err
    for name in cli.names:
        assert name in err, f"{name!r} not named in: {err}"
    assert {p: digest(p) for p in cli.watch} == files
    assert all(not os.path.exists(p) for p in cli.absent)


def test_cli_unexpected_error_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    def broken(path: str, base: str | None = None) -> dict[str, Any]:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("lokr_diffusers.cli.inspect_file", broken)
    assert main(["inspect", "x.safetensors"]) == 2
    err = capsys.readouterr().err
    assert err == ("lokr-diffusers inspect: error: unexpected RuntimeError: boom second line (rerun with --traceback "
                   "and report it, please)\n")
    with pytest.raises(RuntimeError, match="boom"):
        main(["--traceback", "inspect", "x.safetensors"])


def test_cli_subprocess_bad_file_has_no_traceback(tmp_path: Path) -> None:
    bad = _garbage(tmp_path)
    result = subprocess.run([sys.executable, "-m", "lokr_diffusers", "inspect", bad], capture_output=True, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert lines == [f"lokr-diffusers inspect: error: {bad}: not a valid safetensors file (Error while deserializing "
                     "header: header too large); it is damaged or truncated: download or export it again"], lines


# ------------------------------------------------- where consumers define a meaning: load, and warn
def _to_q_delta(sd: dict[str, Tensor], alpha: float) -> Tensor:
    """ΔW of the to_q module by the ComfyUI/A1111 rule, written out here: kron(W1, W2) · alpha / rank,
    rank = rows of w2_b (else of w1_b)."""
    f = {k.rsplit(".", 1)[1]: v.double() for k, v in sd.items() if k.startswith(KOHYA_TO_Q + ".")}
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
    rank = f["lokr_w2_b"].shape[0] if "lokr_w2_b" in f else f["lokr_w1_b"].shape[0]
    return torch.kron(w1, w2) * (alpha / rank)


def _to_q_change(pipe) -> tuple[Tensor, Tensor]:
    """(x, module(x) - base(x)) of the loaded to_q."""
    module = pipe.unet.get_submodule(TO_Q)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return x, (module(x) - torch.nn.functional.linear(x, pipe.unet.get_submodule(TO_Q).weight,
                                                              pipe.unet.get_submodule(TO_Q).bias)).double()


@pytest.mark.parametrize("alpha", [0.0, -3.0, 4], ids=["alpha-zero", "alpha-negative", "alpha-integer"])
def test_alpha_zero_negative_or_integer_means_what_consumers_compute(env: Env, caplog: pytest.LogCaptureFixture,
                                                                     alpha: float) -> None:
    sd = {k: (torch.tensor(alpha) if k.endswith(".alpha") else v) for k, v in env.good.items()}
    pipe = make_sd_pipeline(0)
    with caplog.at_level(logging.WARNING):
        pipe.load_lokr_weights(sd, adapter_name="x")
    x, change = _to_q_change(pipe)
    torch.testing.assert_close(change, x.double() @ _to_q_delta(sd, float(alpha)).T, rtol=1e-5, atol=1e-6)
    assert ("alpha <= 0" in caplog.text) == (alpha <= 0), caplog.text
    if alpha > 0:
        assert change.abs().max() > 1e-3  # the check can fail: the adapter does change the output


def test_metadata_never_overrides_the_files_alpha(env: Env, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A file whose metadata carries a PEFT config (r 1, alpha 1000) keeps the scale of its own alpha
    tensors, as ComfyUI and A1111 (which never read metadata) compute it. The package reads a PEFT
    config only from the adapter_config.json beside the weights (LoadedFile.peft_config), never from
    metadata: the key is neither used nor removed."""
    poisoned = json.dumps({"peft_type": "LOKR", "r": 1, "alpha": 1000.0})
    path = save_sd(tmp_path, env.good, metadata={"lokr_diffusers.peft_config": poisoned})
    pipe = make_sd_pipeline(0)
    with caplog.at_level(logging.WARNING):
        pipe.load_lokr_weights(path, adapter_name="x")
    x, change = _to_q_change(pipe)
    alpha = float(env.good[KOHYA_TO_Q + ".alpha"])
    torch.testing.assert_close(change, x.double() @ _to_q_delta(env.good, alpha).T, rtol=1e-5, atol=1e-6)
    assert lokr_diffusers.lokr_state_dict(path)[1] == {"lokr_diffusers.peft_config": poisoned}  # the file's own
    assert "adapter_config.json would give" not in caplog.text  # no config was read at all


def test_peft_folder_alpha_tensors_win_over_its_config(env: Env, tmp_path: Path,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    alpha = float(env.good[KOHYA_TO_Q + ".alpha"])
    weights = {**env.peft, f"base_model.model.{TO_Q}.alpha": torch.tensor(alpha)}
    folder = peft_folder(tmp_path, env, config={"peft_type": "LOKR", "r": 2, "alpha": 1000.0}, weights=weights)
    pipe = make_sd_pipeline(0)
    with caplog.at_level(logging.WARNING):
        pipe.load_lokr_weights(folder, adapter_name="x")
    x, change = _to_q_change(pipe)
    torch.testing.assert_close(change, x.double() @ _to_q_delta(env.good, alpha).T, rtol=1e-5, atol=1e-6)
    assert "the file's own alpha tensor is used" in caplog.text and TO_Q in caplog.text


def test_strict_false_names_the_keys_it_skips(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    pipe = make_sd_pipeline(0)
    extra = {"lora_unet_conv_in.alpha": torch.tensor(1.0), "lora_unet_no_such_block.lokr_w1": torch.ones(2, 2),
             "lora_unet_no_such_block.lokr_w2": torch.ones(2, 2)}
    with caplog.at_level(logging.WARNING):
        pipe.load_lokr_weights({**env.good, **extra}, adapter_name="x", strict=False)
    assert all(k in caplog.text for k in extra)
    assert "no LoKr factors, only alpha/dora_scale (lora_unet_conv_in)" in caplog.text
    x, change = _to_q_change(pipe)
    torch.testing.assert_close(change, x.double() @ _to_q_delta(env.good, float(env.good[KOHYA_TO_Q + ".alpha"])).T,
                               rtol=1e-5, atol=1e-6)


def test_peft_state_dict_without_config_warns(env: Env, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        lokr_diffusers.lokr_state_dict(dict(env.peft))
    assert "adapter_config.json" in caplog.text and "scale 1" in caplog.text


def test_valid_peft_folder_loads_by_peft_rule(env: Env, tmp_path: Path) -> None:
    """The control for the peft-* cases: the same folder with its config loads, at alpha / r = 4 / 2."""
    pipe = make_sd_pipeline(0)
    pipe.load_lokr_weights(peft_folder(tmp_path, env), adapter_name="x")
    x, change = _to_q_change(pipe)
    scale = env.peft_config["alpha"] / env.peft_config["r"]  # PEFT: alpha / r, from the config
    rank = env.good[KOHYA_TO_Q + ".lokr_w2_b"].shape[0]  # _to_q_delta divides by it
    torch.testing.assert_close(change, x.double() @ _to_q_delta(env.good, scale * rank).T, rtol=1e-5, atol=1e-6)
    assert change.abs().max() > 1e-3


# ------------------------------------------------------------------ which base a file is for
MID_TO_K = "unet.mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
BASE_CASES: list[Any] = [
    pytest.param(_to_k(MID_TO_K, 768, 1280), "sd1", "cross-attention width 768", id="width-768-sd1"),
    pytest.param(_to_k(MID_TO_K, 1024, 1280), "sd2", "cross-attention width 1024", id="width-1024-sd2"),
    pytest.param(_to_k(MID_TO_K, 2048, 1280), "sdxl", "cross-attention width 2048", id="width-2048-sdxl"),
    pytest.param(_to_k("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280), "sdxl",
                 "a second text encoder", id="name-te2"),
    pytest.param(_to_k("lora_te_text_model_encoder_layers_0_self_attn_q_proj", 1024, 1024), "sd2",
                 "text-encoder width 1024", id="te-width-1024-sd2"),
    pytest.param({"lora_unet_input_blocks_1_1_proj_in.lokr_w1": torch.ones(16, 16),
                  "lora_unet_input_blocks_1_1_proj_in.lokr_w2": torch.ones(20, 20, 1, 1)}, "sd1",
                 "a 1x1-conv proj_in", id="conv-proj-sd1"),
    pytest.param({"lora_unet_label_emb_0_0.lokr_w1": torch.ones(8, 8)}, "sdxl", "added embedding",
                 id="name-label-emb"),
    pytest.param({**_to_k("lora_te2_text_model_encoder_layers_0_self_attn_q_proj", 1280, 1280),
                  **_to_k("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", 768)}, None,
                 "a second text encoder", id="contradiction-none"),
    pytest.param({"lora_unet_conv_in.lokr_w1": torch.ones(4, 4)}, None, None, id="silent-none"),
]


@pytest.mark.parametrize(("sd", "base", "evidence"), BASE_CASES)
def test_file_base_is_read_from_the_structure(sd: dict[str, Tensor], base: str | None, evidence: str | None) -> None:
    from lokr_diffusers.formats.report import file_base

    guess = file_base(sd)
    assert guess.base == base
    assert (evidence is None and not guess.evidence) or any(evidence in e for e in guess.evidence), guess.evidence
