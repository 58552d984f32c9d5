"""Many layers moved to new states at once, and the one fuse / unfuse path (docs/adapters.md §Where it lives).

`commit_all` commits a list of (layer, new state), all-or-nothing. `fuse` and `unfuse` are the one
sequence every fuse and unfuse takes, whatever the entry point (`LoKrLayer.merge`, `LoKrModel.merge_adapter`,
`merge_and_unload`, `pipe.fuse_lokr`, diffusers' `pipe.fuse_lora` and `unet.fuse_lora`, and their unfuses):

    new states (state.fuse) -> quantized bases checked -> `safe` checked -> commit_all -> `then` -> report

`then` runs inside the transaction, after every layer moved: if it raises, every layer goes back (the
diffusers API runs diffusers' own LoRA part there). The layers come named (`model.named_lokr_layers`):
the names are what errors and the requantization report say.

Below `layers/` (it fuses through here); the layers are used by their methods only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, TypeVar

from . import state as S
from .logs import progress

if TYPE_CHECKING:
    from .layers.base import LayerCore as LoKrLayer

logger = logging.getLogger(__name__)
T = TypeVar("T")
Named = tuple[str, "LoKrLayer"]
Planned = tuple[str, "LoKrLayer", S.LayerState]


def commit_all(changes: Sequence[tuple[LoKrLayer, S.LayerState]], keep_original: bool = True, desc: str = "",
               disable: bool | None = None, requantize: bool = False,
               then: Callable[[], T] | None = None) -> T | None:
    """Move each layer to its new state, all or nothing: if any commit fails, or `then` (run once every
    layer moved) raises, the layers already moved go back to their old states. Returns what `then` returns.
    A progress bar (logs.progress) when many layers change their weights (`desc`, `disable`).
    requantize: fusing into a quantized base weight dequantizes, adds and requantizes (quantized.py)."""
    done: list[tuple[LoKrLayer, S.LayerState]] = []
    work = sum(layer.weight.numel() for layer, new in changes if layer.state.physical() != new.physical())
    try:
        for layer, new in progress(changes, desc=desc or "LoKr weights", disable=disable, work=work):
            old = layer.state
            layer.commit(new, keep_original=keep_original, requantize=requantize)
            done.append((layer, old))
        return then() if then is not None else None
    except BaseException:
        for layer, old in reversed(done):
            layer.commit(old)
        raise


def check_quantized(planned: Iterable[Planned], requantize: bool) -> None:
    """Before any layer changes: refuse, naming the module, a change that would write into a
    quantized base weight without `requantize`, or that its quantizer cannot requantize."""
    for name, layer, new in planned:
        layer.check_commit(new, requantize, safe=False, where=name)


def check_finite(planned: Iterable[Planned], requantize: bool) -> None:
    """Before any layer changes: raise if a new fused weight anywhere is not finite (safe fusing)."""
    for name, layer, new in planned:
        layer.check_commit(new, requantize, where=name)


def report_requantized(planned: Iterable[Planned]) -> None:
    """One warning for a fuse that requantized quantized weights: how many, and the largest error."""
    errors = [(layer.requantization_error, name) for name, layer, _ in planned
              if layer.requantization_error is not None]
    if errors:
        worst, where = max(errors)
        logger.warning("LoKr fused into %d quantized weights by requantizing them; the largest max abs error "
                       "introduced is %.3g (%s). Unfusing puts the original quantized weights back exactly",
                       len(errors), worst, where)


def fuse(layers: Iterable[Named], adapter_names: Sequence[str] | None = None, scale: float = 1.0, *,
         safe: bool = False, keep_original: bool = True, requantize: bool = False, desc: str = "fusing LoKr",
         disable: bool | None = None, then: Callable[[], T] | None = None) -> T | None:
    """Fuse the given (default: each layer's active) adapters at scale · their weight into every layer.

    All-or-nothing: an adapter fused at another strength, a quantized base weight without `requantize`
    (docs/adapters.md §Quantized base layers) or, with `safe`, a non-finite weight anywhere raises before
    any layer changes; a failing commit or `then` puts every layer back.

    Args:
        layers: (name, layer) pairs; the names are what errors and the requantization warning say.
        keep_original: keep the weight without the adapters, so that `unfuse` restores it bit for bit
            (False: a fuse never undone, `merge_and_unload`).
        desc, disable: the progress bar's label, and True to keep it off (a pipeline's bar setting).
        then: run once every layer is fused, inside the transaction (diffusers' own LoRA part).
    Returns:
        what `then` returns (None without it).
    """
    planned = [(name, layer, S.fuse(layer.state, adapter_names, scale)) for name, layer in layers]
    check_quantized(planned, requantize)
    if safe:
        check_finite(planned, requantize)
    result = commit_all([(layer, new) for _, layer, new in planned], keep_original=keep_original, desc=desc,
                        disable=disable, requantize=requantize, then=then)
    if requantize:
        report_requantized(planned)
    return result


def unfuse(layers: Iterable[Named], *, desc: str = "unfusing LoKr", disable: bool | None = None,
           then: Callable[[], T] | None = None) -> T | None:
    """Take every fused adapter out of every layer's weight (bit for bit if nothing else changed it since);
    all-or-nothing as `fuse`, `then` likewise inside the transaction."""
    return commit_all([(layer, S.unfuse(layer.state)) for _, layer in layers], desc=desc, disable=disable,
                      then=then)
