"""The one fuse path (commits.py): every entry point checks `safe` through it.

The table: each row fuses by one entry point, on a pipeline holding a LoKr and a diffusers LoRA whose
LoKr has a NaN factor in the UNet's last LoKr layer (so a fuse that moved layer by layer would have
changed the others first). With safe on, the call raises and nothing changed: weights, every layer's
state, the module tree, `fused_loras`. With safe off, it fuses (the NaN reaches the weight).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from helpers.state_sources import COMPS, base_pipe, lokr_files, lora_file

import lokr_diffusers  # noqa: F401  (attaches the pipeline methods)
from lokr_diffusers import LoKrModel, lokr_layers

Entry = Callable[[Any, bool], Any]
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: see conftest


@pytest.fixture(scope="module")
def base():
    """The tiny pipeline with a LoKr ("kr") and a diffusers LoRA ("lora"), both through load_lora_weights."""
    pipe = base_pipe()
    pipe.load_lora_weights(dict(lokr_files()["a"]), adapter_name="kr")
    pipe.load_lora_weights(dict(lora_file()), adapter_name="lora")
    return pipe


def _last(pipe) -> tuple[str, Any]:
    return list(lokr_layers(pipe.unet))[-1]


def _poisoned(base):
    """A copy of `base` whose LoKr has a NaN factor in the UNet's last LoKr layer."""
    pipe = copy.copy(base)
    for c in COMPS:
        setattr(pipe, c, copy.deepcopy(getattr(base, c)))
    with torch.no_grad():
        next(iter(_last(pipe)[1].factors("kr").values())).fill_(float("nan"))
    return pipe


ENTRIES: list[tuple[str, Entry]] = [
    ("layer.merge", lambda p, safe: _last(p)[1].merge(safe_merge=safe)),
    ("LoKrModel.merge_adapter", lambda p, safe: LoKrModel(p.unet, None).merge_adapter(safe_merge=safe)),
    ("LoKrModel.merge_and_unload", lambda p, safe: LoKrModel(p.unet, None).merge_and_unload(safe_merge=safe)),
    ("pipe.fuse_lokr", lambda p, safe: p.fuse_lokr(safe_fusing=safe)),
    ("pipe.fuse_lokr unet kr", lambda p, safe: p.fuse_lokr(components=["unet"], adapter_names=["kr"],
                                                           safe_fusing=safe)),
    ("pipe.fuse_lora", lambda p, safe: p.fuse_lora(safe_fusing=safe)),
    ("pipe.fuse_lora both named", lambda p, safe: p.fuse_lora(components=["unet", "text_encoder"],
                                                              adapter_names=["kr", "lora"], safe_fusing=safe)),
    ("unet.fuse_lora", lambda p, safe: p.unet.fuse_lora(safe_fusing=safe)),
]


def _snapshot(pipe) -> dict[str, Any]:
    return {"tensors": {f"{c}.{k}": v.clone() for c in COMPS for k, v in getattr(pipe, c).state_dict().items()},
            "states": {(c, path): layer.state for c in COMPS for path, layer in lokr_layers(getattr(pipe, c))},
            "fused": set(pipe.fused_loras)}


def _nan_weight(pipe, path: str) -> bool:
    """Whether the module's base weight holds a NaN (a LoKr layer's base weight, or the plain module's
    once merge_and_unload removed the layer)."""
    return bool(torch.isnan(pipe.unet.get_submodule(path).weight).any())


@pytest.mark.parametrize(("name", "entry"), ENTRIES, ids=[n for n, _ in ENTRIES])
def test_safe_refuses_a_non_finite_fuse_and_changes_nothing(base, name: str, entry: Entry) -> None:
    pipe = _poisoned(base)
    path, before = _last(pipe)[0], _snapshot(pipe)
    with pytest.raises(ValueError, match="non-finite"):
        entry(pipe, True)
    after = _snapshot(pipe)
    assert after["states"] == before["states"] and after["fused"] == before["fused"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        torch.testing.assert_close(after["tensors"][k], v, rtol=0, atol=0, equal_nan=True, msg=k)
    assert not _nan_weight(pipe, path)


@pytest.mark.parametrize(("name", "entry"), ENTRIES, ids=[n for n, _ in ENTRIES])
def test_without_safe_the_same_call_fuses(base, name: str, entry: Entry) -> None:
    pipe = _poisoned(base)
    path = _last(pipe)[0]
    entry(pipe, False)
    assert _nan_weight(pipe, path)
