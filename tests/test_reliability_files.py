"""A catalogue of bad inputs for reading files, folders, metadata, configs and the CLI (issue 8).

Each case is one row of a table: it builds a bad input from a valid one (tests/helpers/writers.py writes the
valid LoKr files of a source pipeline made with add_lokr), makes the public call, and checks
- the error class, exactly, and a message fragment that says what is wrong;
- that the message names the file, key or argument at fault;
- that nothing changed: every file and folder involved is byte-identical afterwards, and for loads
  into a pipeline every parameter and buffer of every component is bit-identical, no module was
  replaced, no requires_grad flag moved and no LoKr adapter is registered.
Cases where ComfyUI / A1111 define a meaning (alpha 0 or negative) are checked against that
meaning, computed here by hand from the file's tensors.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import struct
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.writers import write_adapter
from safetensors.torch import save_file
from torch import Tensor

import lokr_diffusers
from lokr_diffusers import LoKrConfig, add_lokr
from lokr_diffusers.cli import main
from lokr_diffusers.io import InvalidFileError
from lokr_diffusers.tiny import make_sd_pipeline, make_sdxl_pipeline

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
TO_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # a Linear the source adapts
KOHYA_TO_Q = "lora_unet_" + TO_Q.replace(".", "_")


class Custom:  # a class that a weights_only pickle must refuse
    def __init__(self) -> None:
        self.payload = [1, 2, 3]


def _source(sdxl: bool):
    pipe = make_sdxl_pipeline(0) if sdxl else make_sd_pipeline(0)
    configs = {"unet": LoKrConfig(r=2, alpha=4.0, target_modules=UNET_TARGETS, init_weights=False),
               "text_encoder": LoKrConfig(r=2, alpha=2.0, init_weights=False)}
    if sdxl:
        configs["text_encoder_2"] = LoKrConfig(r=2, alpha=2.0, init_weights=False)
    add_lokr(pipe, configs, "src")
    return pipe


def _components(pipe) -> dict[str, torch.nn.Module]:
    return {c: getattr(pipe, c) for c in ("unet", "text_encoder", "text_encoder_2", "vae")
            if getattr(pipe, c, None) is not None}


def _state(pipe) -> dict[str, Any]:
    """Everything a failed load must leave as it was."""
    out: dict[str, Any] = {}
    for c, model in _components(pipe).items():
        out[c] = ([(n, type(m), id(m)) for n, m in model.named_modules()],
                  {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
                  {n: p.requires_grad for n, p in model.named_parameters()})
    return out


def _assert_same_state(before: dict[str, Any], pipe) -> None:
    after = _state(pipe)
    assert after.keys() == before.keys()
    for c, (modules, tensors, grads) in before.items():
        assert after[c][0] == modules, f"{c}: the module tree changed"
        assert after[c][1].keys() == tensors.keys(), f"{c}: parameters were added or removed"
        changed = [k for k, v in tensors.items() if not torch.equal(after[c][1][k], v)]
        assert not changed, f"{c}: {changed[:3]} changed"
        assert after[c][2] == grads, f"{c}: requires_grad flags changed"
    assert pipe.get_list_lokr_adapters() == {}


def _digest(path: str | Path) -> Any:
    """Bytes of a file (sha256), or of every file under a folder; None when absent."""
    p = Path(path)
    if p.is_file():
        return hashlib.sha256(p.read_bytes()).hexdigest()
    if p.is_dir():
        return {str(f.relative_to(p)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(p.rglob("*"))
                if f.is_file()}
    return None


@dataclass
class Env:
    sd_pipe: Any
    xl_pipe: Any
    sd_state: dict[str, Any]
    xl_state: dict[str, Any]
    good: dict[str, Tensor]  # SD1 kohya layout
    sdxl: dict[str, Tensor]  # SDXL kohya (ldm) layout
    peft: dict[str, Tensor]  # SD1 UNet in PEFT's saved layout (no alpha)
    peft_config: dict[str, Any] = field(default_factory=dict)


@pytest.fixture(scope="module")
def env() -> Env:
    src, src_xl = _source(False), _source(True)
    unet_keys = {k: v for k, v in write_adapter(src, "src", "diffusers", components=("unet",)).items()}
    peft = {"base_model.model." + k[len("unet."):]: v for k, v in unet_keys.items() if not k.endswith(".alpha")}
    sd_pipe, xl_pipe = make_sd_pipeline(0), make_sdxl_pipeline(0)
    return Env(sd_pipe, xl_pipe, _state(sd_pipe), _state(xl_pipe), write_adapter(src, "src", "kohya"),
               write_adapter(src_xl, "src", "kohya_ldm"), peft,
               {"peft_type": "LOKR", "r": 2, "alpha": 4.0, "target_modules": UNET_TARGETS})


# --------------------------------------------------------------------------------- bad-file makers
def _save(tmp: Path, sd: dict[str, Tensor], name: str = "style.safetensors", metadata: dict | None = None) -> str:
    path = tmp / name
    save_file(sd, str(path), metadata=metadata)
    return str(path)


def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


def _bytes(tmp: Path, env: Env, change: Callable[[bytes], bytes], name: str = "style.safetensors") -> str:
    """A copy of the valid SD1 file with its bytes changed by `change`."""
    data = Path(_save(tmp, env.good, "valid.safetensors")).read_bytes()
    path = tmp / name
    path.write_bytes(change(data))
    return str(path)


def _header_lie(data: bytes) -> bytes:
    header, body = _split(data)
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [s * 4 for s in header[key]["shape"]] or [4]
    return _join(header, body)


def _offsets_past_end(data: bytes) -> bytes:
    header, body = _split(data)
    key = next(k for k in header if k != "__metadata__")
    start, end = header[key]["data_offsets"]
    header[key]["data_offsets"] = [start + len(body), end + len(body)]
    return _join(header, body)


def _first(env: Env, leaf: str) -> str:
    return next(k for k in env.good if k.endswith("." + leaf))


def _edit(env: Env, key_of: Callable[[Env], str], value: Callable[[Tensor], Any]) -> dict[str, Any]:
    sd = dict(env.good)
    key = key_of(env)
    sd[key] = value(sd[key])
    return sd


def _peft_folder(tmp: Path, env: Env, config: Any = "default", weights: dict[str, Tensor] | None = None) -> str:
    folder = tmp / "peft_adapter"
    folder.mkdir()
    save_file(weights if weights is not None else env.peft, str(folder / "adapter_model.safetensors"))
    if config is not None:
        if config == "default":
            config = env.peft_config
        text = config if isinstance(config, (str, bytes)) else json.dumps(config)
        (folder / "adapter_config.json").write_bytes(text.encode() if isinstance(text, str) else text)
    return str(folder)


# ------------------------------------------------------------------------ loads into a pipeline
@dataclass
class Load:
    """pipe.load_lokr_weights(arg, **kwargs) on the SD1 (or SDXL) pipeline; `names` must appear
    in the message; `watch` are paths that must be byte-identical afterwards."""

    arg: Any
    names: list[str]
    watch: list[str] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    sdxl: bool = False


def _file(path: str, **kwargs: Any) -> Load:
    return Load(path, [os.path.basename(path)], [path], kwargs)


def _folder(path: str, shown: str | None = None, **kwargs: Any) -> Load:
    return Load(path, [shown or os.path.basename(path)], [path], kwargs)


def _sd(sd: dict[str, Any], *names: str, sdxl: bool = False, **kwargs: Any) -> Load:
    return Load(sd, list(names), [], kwargs, sdxl)


def _pickle_with_class(env: Env, tmp: Path) -> Load:
    path = tmp / "style.pt"
    torch.save({**env.good, "trainer_state": Custom()}, path)
    return Load(str(path), ["style.pt", "Custom"], [str(path)])


def _pickle_of(tmp: Path, obj: Any, name: str, pickler: bool = False) -> str:
    path = tmp / name
    if pickler:
        with open(path, "wb") as fh:
            pickle.dump(obj, fh)
    else:
        torch.save(obj, path)
    return str(path)


def _lora_only(env: Env) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name in ("lora_unet_down_blocks_1_attentions_0_proj_out", "lora_te_text_model_encoder_layers_0_mlp_fc1"):
        out[f"{name}.lora_down.weight"] = torch.randn(2, 32, generator=g)
        out[f"{name}.lora_up.weight"] = torch.randn(32, 2, generator=g)
        out[f"{name}.alpha"] = torch.tensor(2.0)
    return out


def _mixed_with_inf(env: Env) -> dict[str, Tensor]:
    lora = _lora_only(env)
    key = next(iter(lora))
    lora[key] = lora[key].clone()
    lora[key][0, 0] = float("inf")
    return {**env.good, **lora}


def _drop_w2(env: Env) -> dict[str, Tensor]:
    module = _first(env, "lokr_w1").rsplit(".", 1)[0]
    return {k: v for k, v in env.good.items() if not k.startswith(module + ".lokr_w2")}


def _two_files(env: Env, tmp: Path) -> Load:
    _save(tmp, env.good, "a.safetensors")
    _save(tmp, env.good, "b.safetensors")
    return Load(str(tmp), [str(tmp)], [str(tmp)])


def _component_folders(env: Env, tmp: Path) -> Load:
    """What save_lokr_weights(format="peft") writes for two components, text_encoder's config lost."""
    for component in ("unet", "text_encoder"):
        (tmp / component).mkdir()
        save_file(env.peft, str(tmp / component / "adapter_model.safetensors"))
    (tmp / "unet" / "adapter_config.json").write_text(json.dumps(env.peft_config))
    return Load(str(tmp), [os.path.join("text_encoder", "adapter_model.safetensors")], [str(tmp)])


def _missing_dir(tmp: Path) -> str:
    return str(tmp / "outputs" / "run1" / "lokr")


def _partial(tmp: Path) -> str:
    (tmp / "my_folder").mkdir()
    return str(tmp / "my_folder" / "x.safetensors")


Builder = Callable[[Env, Path], Load]
NAN, INF = float("nan"), float("inf")

LOAD_CASES: list[Any] = [
    # ---- damaged files
    pytest.param(lambda e, t: _file(_bytes(t, e, lambda d: d[:-17])), InvalidFileError, "not a valid safetensors",
                 id="file-truncated"),
    pytest.param(lambda e, t: _file(_bytes(t, e, lambda d: bytes(range(256)) * 3)), InvalidFileError,
                 "not a valid safetensors", id="file-garbage-bytes"),
    pytest.param(lambda e, t: _file(_bytes(t, e, _header_lie)), InvalidFileError, "not a valid safetensors",
                 id="file-header-shape-lies"),
    pytest.param(lambda e, t: _file(_bytes(t, e, _offsets_past_end)), InvalidFileError, "not a valid safetensors",
                 id="file-header-offsets-past-end"),
    pytest.param(lambda e, t: _file(_bytes(t, e, lambda d: struct.pack("<Q", 10**9) + d[8:])), InvalidFileError,
                 "not a valid safetensors", id="file-header-length-lies"),
    pytest.param(lambda e, t: _file(_bytes(t, e, lambda d: struct.pack("<Q", 12) + b"{not json!!}" + d[20:])),
                 InvalidFileError, "not a valid safetensors", id="file-header-not-json"),
    pytest.param(lambda e, t: _file(_bytes(t, e, lambda d: b"")), InvalidFileError, "empty (0 bytes)",
                 id="file-empty-0-bytes"),
    pytest.param(lambda e, t: _file(_bytes(t, e, lambda d: d[:5])), InvalidFileError, "not a valid safetensors",
                 id="file-5-bytes"),
    pytest.param(lambda e, t: _file(_save(t, {})), InvalidFileError, "holds no tensors", id="file-no-tensors"),
    pytest.param(lambda e, t: _file(_bytes(t, e, lambda d: d, name="style.txt")), InvalidFileError,
                 "not a .safetensors", id="file-unknown-suffix"),
    # ---- pickles (.bin / .pt / .ckpt are read with weights_only=True)
    pytest.param(_pickle_with_class, InvalidFileError, "refused", id="pickle-custom-class"),
    pytest.param(lambda e, t: _file(_pickle_of(t, e.good, "style.bin", pickler=True)), InvalidFileError,
                 "refused", id="pickle-plain-pickle-module",
                 marks=pytest.mark.filterwarnings("ignore:Detected pickle protocol")),
    pytest.param(lambda e, t: _file(_bytes(t, e, lambda d: b"PK\x03\x04" + d[:64], name="style.ckpt")),
                 InvalidFileError, "not a valid PyTorch file", id="pickle-damaged-zip"),
    pytest.param(lambda e, t: _file(_pickle_of(t, list(e.good.values()), "style.pt")), InvalidFileError,
                 "holds a list", id="pickle-a-list"),
    pytest.param(lambda e, t: Load(_pickle_of(t, {**e.good, "epoch": 3}, "style.bin"), ["style.bin", "epoch"],
                                   [str(t / "style.bin")]), InvalidFileError, "not tensors",
                 id="pickle-non-tensor-value"),
    # ---- paths and folders
    pytest.param(lambda e, t: Load("./styel.safetensors", ["no such file or folder: ./styel.safetensors"]),
                 FileNotFoundError, "no such file or folder", id="path-typo-dot-slash"),
    pytest.param(lambda e, t: _file(_partial(t)), FileNotFoundError, "no such file or folder",
                 id="path-folder-exists-file-not"),
    pytest.param(lambda e, t: Load(_missing_dir(t), [_missing_dir(t)]), FileNotFoundError, "no such file or folder",
                 id="path-missing-relative-tree"),
    pytest.param(lambda e, t: Load("~/no_such_lokr_dir_xyz", ["~/no_such_lokr_dir_xyz"]), FileNotFoundError,
                 "no such file or folder", id="path-tilde"),
    pytest.param(lambda e, t: Load("stylelokr", ["stylelokr"]), FileNotFoundError, "no such file or folder",
                 id="path-bare-word"),
    pytest.param(lambda e, t: Load("lokr-org/style-lokr", ["lokr-org/style-lokr", "must exist"]), OSError,
                 "could not reach the Hugging Face Hub", id="path-hub-id-offline"),
    pytest.param(lambda e, t: Load(str(t), [str(t)]), FileNotFoundError, "no LoKr file in folder",
                 id="folder-empty"),
    pytest.param(_two_files, ValueError, "pass weight_name", id="folder-two-files"),
    pytest.param(lambda e, t: Load(str(t), ["nope.safetensors"], [str(t)], {"weight_name": "nope.safetensors"}),
                 FileNotFoundError, "no such file or folder", id="folder-weight-name-missing"),
    pytest.param(lambda e, t: Load(str(t), ["missing_sub"], [str(t)], {"subfolder": "missing_sub"}),
                 FileNotFoundError, "no such file or folder", id="folder-subfolder-missing"),
    # ---- PEFT folders and adapter_config.json
    pytest.param(lambda e, t: _folder(_peft_folder(t, e, config=None), "adapter_model.safetensors"), ValueError,
                 "adapter_config.json", id="peft-no-config"),
    pytest.param(lambda e, t: _component_folders(e, t), ValueError, "adapter_config.json",
                 id="peft-component-folder-no-config"),
    pytest.param(lambda e, t: _folder(_peft_folder(t, e, config='{"r": 2, "alpha": 4,}'), "adapter_config.json"),
                 ValueError, "not valid JSON", id="peft-config-bad-json"),
    pytest.param(lambda e, t: _folder(_peft_folder(t, e, config="[2, 4]"), "adapter_config.json"), ValueError,
                 "not an object", id="peft-config-a-list"),
    pytest.param(lambda e, t: _folder(_peft_folder(t, e, config=b"\xff\xfe\x00r"), "adapter_config.json"),
                 ValueError, "not a UTF-8", id="peft-config-binary"),
    pytest.param(lambda e, t: _folder(_peft_folder(t, e, config={"r": "2", "alpha": 4}), "adapter_config.json"),
                 ValueError, "r must be a positive integer", id="peft-config-r-string"),
    pytest.param(lambda e, t: _folder(_peft_folder(t, e, config={"r": 2, "rank_pattern": ["to_q"]}),
                                      "adapter_config.json"), ValueError, "rank_pattern must be a dict",
                 id="peft-config-pattern-not-dict"),
    pytest.param(lambda e, t: _folder(_peft_folder(t, e, config={"r": 2, "alpha_pattern": {"to_q": "big"}}),
                                      "adapter_config.json"), ValueError, "alpha_pattern['to_q'] must be a number",
                 id="peft-config-alpha-pattern-value"),
    pytest.param(lambda e, t: _folder(_peft_folder(t, e, config={"r": 2, "rank_pattern": {"to_q[": 4}}),
                                      "adapter_config.json"), ValueError, "'to_q[' is not a valid regular",
                 id="peft-config-bad-regex"),
    pytest.param(lambda e, t: _folder(_peft_folder(t, e, config={"peft_type": "LORA", "r": 2}), "adapter_config.json"),
                 ValueError, "peft_type is 'LORA'", id="peft-config-is-lora"),
    pytest.param(lambda e, t: _folder(_peft_folder(t, e, config={"r": 2, "alpha": NAN}), "adapter_config.json"),
                 ValueError, "alpha must be finite", id="peft-config-alpha-nan"),
    # ---- tensors in the file
    pytest.param(lambda e, t: _sd(_edit(e, lambda e: _first(e, "lokr_w1"), lambda v: v * NAN), "lokr_w1"),
                 ValueError, "NaN or infinite", id="tensor-nan-w1"),
    pytest.param(lambda e, t: _sd(_edit(e, lambda e: _first(e, "lokr_w2_b"), lambda v: v * INF), "lokr_w2_b"),
                 ValueError, "NaN or infinite", id="tensor-inf-w2"),
    pytest.param(lambda e, t: _sd(_edit(e, lambda e: _first(e, "alpha"), lambda v: v * NAN), ".alpha"),
                 ValueError, "NaN or infinite", id="tensor-nan-alpha"),
    pytest.param(lambda e, t: _file(_save(t, _edit(e, lambda e: _first(e, "lokr_w1"), lambda v: v * NAN))),
                 ValueError, "NaN or infinite", id="tensor-nan-in-file"),
    pytest.param(lambda e, t: _sd({**e.good, KOHYA_TO_Q + ".dora_scale": torch.full((32, 1), NAN)},
                                  KOHYA_TO_Q + ".dora_scale"), ValueError, "NaN or infinite", id="tensor-nan-dora"),
    pytest.param(lambda e, t: _sd({**e.good, KOHYA_TO_Q + ".lokr_scale": torch.tensor(INF)},
                                  KOHYA_TO_Q + ".lokr_scale"), ValueError, "NaN or infinite",
                 id="tensor-inf-lokr-scale"),
    pytest.param(lambda e, t: _sd(_mixed_with_inf(e), "lora_down.weight"), ValueError, "NaN or infinite",
                 id="tensor-inf-in-lora-part"),
    pytest.param(lambda e, t: _sd(_edit(e, lambda e: _first(e, "lokr_w1"), lambda v: v.flatten()[0]), "lokr_w1"),
                 ValueError, "a 0-D tensor", id="tensor-0d-factor"),
    pytest.param(lambda e, t: _sd(_edit(e, lambda e: _first(e, "lokr_w2_b"), lambda v: v.flatten()), "lokr_w2_b"),
                 ValueError, "must be 2-D", id="tensor-1d-factor"),
    pytest.param(lambda e, t: _sd(_edit(e, lambda e: _first(e, "lokr_w1"), lambda v: v.long()), "lokr_w1"),
                 TypeError, "torch.int64 is not a floating-point", id="tensor-int-factor"),
    pytest.param(lambda e, t: _sd(_edit(e, lambda e: _first(e, "lokr_w2_a"), lambda v: v > 0), "lokr_w2_a"),
                 TypeError, "torch.bool is not a floating-point", id="tensor-bool-factor"),
    pytest.param(lambda e, t: _sd(_edit(e, lambda e: _first(e, "alpha"), lambda v: torch.tensor(True)), ".alpha"),
                 TypeError, "torch.bool", id="tensor-bool-alpha"),
    pytest.param(lambda e, t: _sd(_edit(e, lambda e: _first(e, "alpha"), lambda v: torch.ones(2)), ".alpha"),
                 ValueError, "must be one number", id="tensor-alpha-two-numbers"),
    pytest.param(lambda e, t: _sd(_edit(e, lambda e: _first(e, "lokr_w1"), lambda v: torch.ones(3, v.shape[1])),
                                  _first(e, "lokr_w1").rsplit(".", 1)[0]), ValueError, "does not divide",
                 id="tensor-w1-wrong-shape"),
    pytest.param(lambda e, t: _sd(_drop_w2(e), _first(e, "lokr_w1").rsplit(".", 1)[0]), ValueError, "missing W2",
                 id="tensor-w1-without-w2"),
    pytest.param(lambda e, t: _sd({**e.good, KOHYA_TO_Q + ".lokr_w1_a": torch.ones(4, 2)}, KOHYA_TO_Q), ValueError,
                 "both lokr_w1 and lokr_w1_a", id="tensor-w1-twice"),
    pytest.param(lambda e, t: _sd({**e.good, KOHYA_TO_Q + ".lokr_t1": torch.ones(2, 2, 3, 3)}, KOHYA_TO_Q),
                 ValueError, "lokr_t1", id="tensor-lokr-t1"),
    pytest.param(lambda e, t: _sd({**e.good, "lora_unet_conv_in.alpha": torch.tensor(1.0)}, "lora_unet_conv_in"),
                 ValueError, "no LoKr factors, only alpha", id="keys-alpha-without-factors"),
    pytest.param(lambda e, t: _sd({**e.good, "lora_unet_no_such_block_to_q.lokr_w1": torch.ones(2, 2),
                                   "lora_unet_no_such_block_to_q.lokr_w2": torch.ones(2, 2)},
                                  "lora_unet_no_such_block_to_q.lokr_w1"), ValueError, "2 of",
                 id="keys-unknown-module"),
    pytest.param(lambda e, t: _sd(_lora_only(e), "2 LoRA modules"), ValueError,
                 "no LoKr modules, only 2 LoRA modules: load it with pipe.load_lora_weights", id="keys-lora-only"),
    pytest.param(lambda e, t: _file(_save(t, _lora_only(e))), ValueError, "load it with pipe.load_lora_weights",
                 id="keys-lora-only-file"),
    # ---- a file for another base model
    pytest.param(lambda e, t: _sd(e.sdxl, "lora_te2_"), ValueError,
                 "looks like an SDXL LoKr; the pipeline is SD1.x/SD2.x", id="base-sdxl-file-into-sd1"),
    pytest.param(lambda e, t: _sd(e.good, "lora_te_", sdxl=True), ValueError,
                 "looks like an SD1.x/SD2.x LoKr; the pipeline is SDXL", id="base-sd1-file-into-sdxl"),
]


@pytest.mark.parametrize(("build", "error", "fragment"), LOAD_CASES)
def test_bad_input_to_load_lokr_weights_changes_nothing(env: Env, tmp_path: Path, build: Builder, error: type,
                                                        fragment: str) -> None:
    attempt = build(env, tmp_path)
    pipe, before = (env.xl_pipe, env.xl_state) if attempt.sdxl else (env.sd_pipe, env.sd_state)
    files = {p: _digest(p) for p in attempt.watch}
    with pytest.raises(Exception) as caught:
        pipe.load_lokr_weights(attempt.arg, **attempt.kwargs)
    assert type(caught.value) is error, f"{type(caught.value).__name__}: {caught.value}"
    message = str(caught.value)
    assert fragment in message, message
    for name in attempt.names:
        assert name in message, f"{name!r} not named in: {message}"
    assert "\n" not in message
    _assert_same_state(before, pipe)
    assert {p: _digest(p) for p in attempt.watch} == files


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
    _assert_same_state(env.sd_state, env.sd_pipe)


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
    _assert_same_state(env.sd_state, env.sd_pipe)


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
    src = _save(tmp, env.good if sd is None else sd)
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
    pytest.param(lambda e, t: Cli(["inspect", _bytes(t, e, lambda d: b"")], ["style.safetensors"]),
                 "empty (0 bytes)", id="cli-inspect-empty"),
    pytest.param(lambda e, t: Cli(["inspect", _save(t, _edit(e, lambda e: _first(e, "alpha"), lambda v: v * INF))],
                                  ["style.safetensors", ".alpha"]), "NaN or infinite", id="cli-inspect-inf-alpha"),
    pytest.param(lambda e, t: Cli(["inspect", _peft_folder(t, e, config=None)], ["adapter_config.json"]),
                 "PEFT-layout LoKr weights", id="cli-inspect-peft-no-config"),
    pytest.param(lambda e, t: Cli(["inspect", _peft_folder(t, e, config="{")], ["adapter_config.json"]),
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
    pytest.param(lambda e, t: _named(_convert(e, t, _save(t, e.good, "taken.bin"), "--to", "peft"), "taken.bin"),
                 "existing file", id="cli-convert-peft-out-is-file"),
    pytest.param(lambda e, t: _named(Cli(["convert", _garbage(t), str(t / "o.safetensors"), "--to", "comfyui"], [],
                                         [_garbage(t)], [str(t / "o.safetensors")]), "style.safetensors"),
                 "not a valid safetensors file", id="cli-convert-garbage"),
    pytest.param(lambda e, t: _named(_convert(e, t, str(t / "o.safetensors"), "--to", "comfyui", sd=_lora_only(e)),
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
    pytest.param(lambda e, t: Cli(["merge", "--model", _fake_model(t), "--lokr", _save(t, e.good), "--out",
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
    files = {p: _digest(p) for p in cli.watch}
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
    assert {p: _digest(p) for p in cli.watch} == files
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
    path = _save(tmp_path, env.good, metadata={"lokr_diffusers.peft_config": poisoned})
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
    folder = _peft_folder(tmp_path, env, config={"peft_type": "LOKR", "r": 2, "alpha": 1000.0}, weights=weights)
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
    pipe.load_lokr_weights(_peft_folder(tmp_path, env), adapter_name="x")
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
