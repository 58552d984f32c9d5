"""aten ops counted with a dispatch mode (deterministic, unlike a timer), and one training step as fine-tuning runs
it: frozen base, input requiring grad (an earlier layer's output), gradients set to None first, an MSE loss, whose
gradient is dense as a denoising loss's is. Used by tests/test_reuse.py and tests/test_op_counts.py."""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from lokr_diffusers import LoKrConfig, LoKrModel


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


def ops_of(fn: Callable[[], object]) -> list[str]:
    """The aten ops `fn` runs, in order."""
    with OpCounter() as counter:
        fn()
    return counter.ops


def count_ops(fn: Callable[[], object]) -> int:
    return len(ops_of(fn))


def training_step_ops(base: nn.Module, x: torch.Tensor, cfg: LoKrConfig, mode: str
                      ) -> tuple[list[str], list[str], LoKrModel]:
    """(the bare frozen `base`'s ops, the LoKr model's ops, that model) of one training step on `x` (which requires
    grad), after a warm-up step of each, with `mode` forced ("auto", "merged" or "bypass")."""
    bare = copy.deepcopy(base).requires_grad_(False)
    model = LoKrModel(base, cfg, "a")
    model.set_forward_mode(mode)
    model.train()
    target = torch.randn_like(bare(x))

    def step(m: nn.Module) -> Callable[[], None]:
        def run() -> None:
            x.grad = None
            m.zero_grad(set_to_none=True)
            nn.functional.mse_loss(m(x), target).backward()
        return run

    step(bare)()
    step(model)()
    return ops_of(step(bare)), ops_of(step(model)), model
