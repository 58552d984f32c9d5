"""A catalogue of bad inputs for reading files into a pipeline (issue 8): damaged safetensors files, pickles,
paths and folders, PEFT folders and their adapter_config.json, tensors in the file (NaN, 0-d, dtypes, shapes), keys,
a file for another base model.

Each case is one row of a table: it builds a bad input from a valid one (tests/helpers/bad_files.py, through
tests/helpers/writers.py, writes the valid LoKr files of a source pipeline made with add_lokr), calls
`pipe.load_lokr_weights`, and checks
- the error class, exactly, and a message fragment that says what is wrong;
- that the message names the file, key or argument at fault;
- that nothing changed: every file and folder involved is byte-identical afterwards, and every parameter and
  buffer of every component is bit-identical, no module was replaced, no requires_grad flag moved and no LoKr
  adapter is registered.
lokr_state_dict's arguments, configs, the CLI and the meanings ComfyUI / A1111 define (alpha 0 or negative):
tests/test_reliability_arguments.py.
"""

from __future__ import annotations

import json
import os
import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from helpers.bad_files import (
    INF,
    KOHYA_TO_Q,
    NAN,
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
from safetensors.torch import save_file
from torch import Tensor

from lokr_diffusers.io import InvalidFileError

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest


class Custom:  # a class that a weights_only pickle must refuse
    def __init__(self) -> None:
        self.payload = [1, 2, 3]


# --------------------------------------------------------------------------------- bad-file makers
def _split(data: bytes) -> tuple[dict[str, Any], bytes]:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header: dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


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


def _mixed_with_inf(env: Env) -> dict[str, Tensor]:
    lora = lora_only(env)
    key = next(iter(lora))
    lora[key] = lora[key].clone()
    lora[key][0, 0] = float("inf")
    return {**env.good, **lora}


def _drop_w2(env: Env) -> dict[str, Tensor]:
    module = first_key(env, "lokr_w1").rsplit(".", 1)[0]
    return {k: v for k, v in env.good.items() if not k.startswith(module + ".lokr_w2")}


def _two_files(env: Env, tmp: Path) -> Load:
    save_sd(tmp, env.good, "a.safetensors")
    save_sd(tmp, env.good, "b.safetensors")
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

LOAD_CASES: list[Any] = [
    # ---- damaged files
    pytest.param(lambda e, t: _file(altered(t, e, lambda d: d[:-17])), InvalidFileError, "not a valid safetensors",
                 id="file-truncated"),
    pytest.param(lambda e, t: _file(altered(t, e, lambda d: bytes(range(256)) * 3)), InvalidFileError,
                 "not a valid safetensors", id="file-garbage-bytes"),
    pytest.param(lambda e, t: _file(altered(t, e, _header_lie)), InvalidFileError, "not a valid safetensors",
                 id="file-header-shape-lies"),
    pytest.param(lambda e, t: _file(altered(t, e, _offsets_past_end)), InvalidFileError, "not a valid safetensors",
                 id="file-header-offsets-past-end"),
    pytest.param(lambda e, t: _file(altered(t, e, lambda d: struct.pack("<Q", 10**9) + d[8:])), InvalidFileError,
                 "not a valid safetensors", id="file-header-length-lies"),
    pytest.param(lambda e, t: _file(altered(t, e, lambda d: struct.pack("<Q", 12) + b"{not json!!}" + d[20:])),
                 InvalidFileError, "not a valid safetensors", id="file-header-not-json"),
    pytest.param(lambda e, t: _file(altered(t, e, lambda d: b"")), InvalidFileError, "empty (0 bytes)",
                 id="file-empty-0-bytes"),
    pytest.param(lambda e, t: _file(altered(t, e, lambda d: d[:5])), InvalidFileError, "not a valid safetensors",
                 id="file-5-bytes"),
    pytest.param(lambda e, t: _file(save_sd(t, {})), InvalidFileError, "holds no tensors", id="file-no-tensors"),
    pytest.param(lambda e, t: _file(altered(t, e, lambda d: d, name="style.txt")), InvalidFileError,
                 "not a .safetensors", id="file-unknown-suffix"),
    # ---- pickles (.bin / .pt / .ckpt are read with weights_only=True)
    pytest.param(_pickle_with_class, InvalidFileError, "refused", id="pickle-custom-class"),
    pytest.param(lambda e, t: _file(_pickle_of(t, e.good, "style.bin", pickler=True)), InvalidFileError,
                 "refused", id="pickle-plain-pickle-module",
                 marks=pytest.mark.filterwarnings("ignore:Detected pickle protocol")),
    pytest.param(lambda e, t: _file(altered(t, e, lambda d: b"PK\x03\x04" + d[:64], name="style.ckpt")),
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
    pytest.param(lambda e, t: _folder(peft_folder(t, e, config=None), "adapter_model.safetensors"), ValueError,
                 "adapter_config.json", id="peft-no-config"),
    pytest.param(lambda e, t: _component_folders(e, t), ValueError, "adapter_config.json",
                 id="peft-component-folder-no-config"),
    pytest.param(lambda e, t: _folder(peft_folder(t, e, config='{"r": 2, "alpha": 4,}'), "adapter_config.json"),
                 ValueError, "not valid JSON", id="peft-config-bad-json"),
    pytest.param(lambda e, t: _folder(peft_folder(t, e, config="[2, 4]"), "adapter_config.json"), ValueError,
                 "not an object", id="peft-config-a-list"),
    pytest.param(lambda e, t: _folder(peft_folder(t, e, config=b"\xff\xfe\x00r"), "adapter_config.json"),
                 ValueError, "not a UTF-8", id="peft-config-binary"),
    pytest.param(lambda e, t: _folder(peft_folder(t, e, config={"r": "2", "alpha": 4}), "adapter_config.json"),
                 ValueError, "r must be a positive integer", id="peft-config-r-string"),
    pytest.param(lambda e, t: _folder(peft_folder(t, e, config={"r": 2, "rank_pattern": ["to_q"]}),
                                      "adapter_config.json"), ValueError, "rank_pattern must be a dict",
                 id="peft-config-pattern-not-dict"),
    pytest.param(lambda e, t: _folder(peft_folder(t, e, config={"r": 2, "alpha_pattern": {"to_q": "big"}}),
                                      "adapter_config.json"), ValueError, "alpha_pattern['to_q'] must be a number",
                 id="peft-config-alpha-pattern-value"),
    pytest.param(lambda e, t: _folder(peft_folder(t, e, config={"r": 2, "rank_pattern": {"to_q[": 4}}),
                                      "adapter_config.json"), ValueError, "'to_q[' is not a valid regular",
                 id="peft-config-bad-regex"),
    pytest.param(lambda e, t: _folder(peft_folder(t, e, config={"peft_type": "LORA", "r": 2}), "adapter_config.json"),
                 ValueError, "peft_type is 'LORA'", id="peft-config-is-lora"),
    pytest.param(lambda e, t: _folder(peft_folder(t, e, config={"r": 2, "alpha": NAN}), "adapter_config.json"),
                 ValueError, "alpha must be finite", id="peft-config-alpha-nan"),
    # ---- tensors in the file
    pytest.param(lambda e, t: _sd(edit(e, lambda e: first_key(e, "lokr_w1"), lambda v: v * NAN), "lokr_w1"),
                 ValueError, "NaN or infinite", id="tensor-nan-w1"),
    pytest.param(lambda e, t: _sd(edit(e, lambda e: first_key(e, "lokr_w2_b"), lambda v: v * INF), "lokr_w2_b"),
                 ValueError, "NaN or infinite", id="tensor-inf-w2"),
    pytest.param(lambda e, t: _sd(edit(e, lambda e: first_key(e, "alpha"), lambda v: v * NAN), ".alpha"),
                 ValueError, "NaN or infinite", id="tensor-nan-alpha"),
    pytest.param(lambda e, t: _file(save_sd(t, edit(e, lambda e: first_key(e, "lokr_w1"), lambda v: v * NAN))),
                 ValueError, "NaN or infinite", id="tensor-nan-in-file"),
    pytest.param(lambda e, t: _sd({**e.good, KOHYA_TO_Q + ".dora_scale": torch.full((32, 1), NAN)},
                                  KOHYA_TO_Q + ".dora_scale"), ValueError, "NaN or infinite", id="tensor-nan-dora"),
    pytest.param(lambda e, t: _sd({**e.good, KOHYA_TO_Q + ".lokr_scale": torch.tensor(INF)},
                                  KOHYA_TO_Q + ".lokr_scale"), ValueError, "NaN or infinite",
                 id="tensor-inf-lokr-scale"),
    pytest.param(lambda e, t: _sd(_mixed_with_inf(e), "lora_down.weight"), ValueError, "NaN or infinite",
                 id="tensor-inf-in-lora-part"),
    pytest.param(lambda e, t: _sd(edit(e, lambda e: first_key(e, "lokr_w1"), lambda v: v.flatten()[0]), "lokr_w1"),
                 ValueError, "a 0-D tensor", id="tensor-0d-factor"),
    pytest.param(lambda e, t: _sd(edit(e, lambda e: first_key(e, "lokr_w2_b"), lambda v: v.flatten()), "lokr_w2_b"),
                 ValueError, "must be 2-D", id="tensor-1d-factor"),
    pytest.param(lambda e, t: _sd(edit(e, lambda e: first_key(e, "lokr_w1"), lambda v: v.long()), "lokr_w1"),
                 TypeError, "torch.int64 is not a floating-point", id="tensor-int-factor"),
    pytest.param(lambda e, t: _sd(edit(e, lambda e: first_key(e, "lokr_w2_a"), lambda v: v > 0), "lokr_w2_a"),
                 TypeError, "torch.bool is not a floating-point", id="tensor-bool-factor"),
    pytest.param(lambda e, t: _sd(edit(e, lambda e: first_key(e, "alpha"), lambda v: torch.tensor(True)), ".alpha"),
                 TypeError, "torch.bool", id="tensor-bool-alpha"),
    pytest.param(lambda e, t: _sd(edit(e, lambda e: first_key(e, "alpha"), lambda v: torch.ones(2)), ".alpha"),
                 ValueError, "must be one number", id="tensor-alpha-two-numbers"),
    pytest.param(lambda e, t: _sd(edit(e, lambda e: first_key(e, "lokr_w1"), lambda v: torch.ones(3, v.shape[1])),
                                  first_key(e, "lokr_w1").rsplit(".", 1)[0]), ValueError, "does not divide",
                 id="tensor-w1-wrong-shape"),
    pytest.param(lambda e, t: _sd(_drop_w2(e), first_key(e, "lokr_w1").rsplit(".", 1)[0]), ValueError, "missing W2",
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
    pytest.param(lambda e, t: _sd(lora_only(e), "2 LoRA modules"), ValueError,
                 "no LoKr modules, only 2 LoRA modules: load it with pipe.load_lora_weights", id="keys-lora-only"),
    pytest.param(lambda e, t: _file(save_sd(t, lora_only(e))), ValueError, "load it with pipe.load_lora_weights",
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
    files = {p: digest(p) for p in attempt.watch}
    with pytest.raises(Exception) as caught:
        pipe.load_lokr_weights(attempt.arg, **attempt.kwargs)
    assert type(caught.value) is error, f"{type(caught.value).__name__}: {caught.value}"
    message = str(caught.value)
    assert fragment in message, message
    for name in attempt.names:
        assert name in message, f"{name!r} not named in: {message}"
    assert "\n" not in message
    assert_same_state(before, pipe)
    assert {p: digest(p) for p in attempt.watch} == files
