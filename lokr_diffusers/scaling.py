"""diffusers' per-call LoRA scale, for LoKr: `pipe(..., cross_attention_kwargs={"scale": s})`.

diffusers scales every unfused LoRA by s for one call: the denoiser through the kwarg its forward
takes (`cross_attention_kwargs`, `joint_attention_kwargs` or `attention_kwargs`), the text encoders
through `encode_prompt(lora_scale=s)`. LoKr means the same (docs/adapters.md §What a layer computes): a
forward pre-hook on each component holding LoKr layers reads the kwarg, and the `encode_prompt` of a
pipeline class that LoKr was loaded into is wrapped to scale its text encoders. Fused
adapters are in the weights and are not scaled, as with LoRA.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from . import patches
from .formats.names import TEXT_ENCODERS
from .layers import LoKrLayer

SCALE_KWARGS: tuple[str, ...] = ("cross_attention_kwargs", "joint_attention_kwargs", "attention_kwargs")
_HOOKS = "_lokr_scale_hooks"


def _check(scale: Any) -> float:
    # abs(s) < inf, not math.isfinite: under torch.compile a scale that changed between calls is a
    # symbolic float, which a comparison keeps symbolic (no recompilation per value) and isfinite cannot take
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not abs(scale) < math.inf:
        raise ValueError(f"the LoRA/LoKr call scale must be a finite number, got {scale!r}")
    return scale


def _scale_layers(models: Iterable[nn.Module], scale: float) -> list[tuple[LoKrLayer, float]]:
    """Multiply the call scale of the LoKr layers of `models` by `scale`; returns what to restore.
    Plain lists and calls, no context-manager object: the hooks below run inside torch.compile."""
    layers = [m for model in models for m in model.modules() if isinstance(m, LoKrLayer)] if scale != 1.0 else []
    saved = [(layer, layer.call_scale) for layer in layers]
    for layer, s in saved:
        layer.set_call_scale(s * scale)
    return saved


def _restore(saved: list[tuple[LoKrLayer, float]]) -> None:
    for layer, s in saved:
        layer.set_call_scale(s)


@contextmanager
def call_scale(models: Iterable[nn.Module], scale: float) -> Iterator[None]:
    """Scale the unfused LoKr adapters of `models` by `scale` inside the block."""
    saved = _scale_layers(models, _check(scale))
    try:
        yield
    finally:
        _restore(saved)


def _scale_from(kwargs: dict[str, Any]) -> float:
    for name in SCALE_KWARGS:
        value = kwargs.get(name)
        if isinstance(value, dict) and "scale" in value:
            return _check(value["scale"])
    return 1.0


def _pre_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
    module.__dict__.setdefault("_lokr_scale_stack", []).append(_scale_layers([module], _scale_from(kwargs)))


def _post_hook(module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
    stack = module.__dict__.get("_lokr_scale_stack")
    if stack:
        _restore(stack.pop())


def install(model: nn.Module) -> None:
    """Let `model`'s forward kwargs scale its LoKr layers (once per model; a no-op if its forward
    takes none of SCALE_KWARGS)."""
    if _HOOKS in model.__dict__:
        return
    params = inspect.signature(model.forward).parameters
    if not any(name in params for name in SCALE_KWARGS):
        return
    model.__dict__[_HOOKS] = (model.register_forward_pre_hook(_pre_hook, with_kwargs=True),
                              model.register_forward_hook(_post_hook, with_kwargs=True, always_call=True))


def uninstall(model: nn.Module) -> None:
    for handle in model.__dict__.pop(_HOOKS, ()):
        handle.remove()


def wrap_encode_prompt(pipe: Any) -> None:
    """Make `encode_prompt(..., lora_scale=s)` of the pipeline's class scale the LoKr layers of the
    text encoders for that call, as diffusers does for LoRA. Done once per class, on the class (so a
    copied pipeline behaves the same), through the patch registry (patches.py: `detach()` undoes it)."""
    cls = type(pipe)
    method = getattr(cls, "encode_prompt", None)
    if method is None or hasattr(method, patches.ORIGINAL) or \
            "lora_scale" not in inspect.signature(method).parameters:
        return
    patches.patch(cls, "encode_prompt", _scaled_encode_prompt)


def _scaled_encode_prompt(method: Any) -> Any:
    signature = inspect.signature(method)

    @functools.wraps(method)
    def encode_prompt(self: Any, *args: Any, **kwargs: Any) -> Any:
        scale = signature.bind(self, *args, **kwargs).arguments.get("lora_scale")
        models = [m for n in TEXT_ENCODERS if isinstance(m := getattr(self, n, None), nn.Module)]
        with call_scale(models, 1.0 if scale is None else scale):
            return method(self, *args, **kwargs)

    return patches.wraps(encode_prompt, method)
