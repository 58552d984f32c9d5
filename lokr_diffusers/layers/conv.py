"""LoKr around nn.Conv1d / nn.Conv2d (a Conv2d adapter may carry a Tucker core: functional.plan)."""

from __future__ import annotations

import math
from typing import cast

import torch
from torch import Tensor
from torch.nn.modules.conv import _ConvNd

from .. import functional as LF
from .forward import LoKrLayer


class _Conv(LoKrLayer):
    """LoKr around nn.Conv1d / nn.Conv2d. x: (B, in, *S) -> (B, out, *S')."""

    @property
    def conv(self) -> _ConvNd:
        return cast(_ConvNd, self.base_layer)

    def _tokens(self, x: Tensor) -> int:
        stride = math.prod(self.conv.stride)
        return max(1, x.shape[0] * math.prod(x.shape[2:]) // stride)

    def _run(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return cast(Tensor, self.conv._conv_forward(x, weight, bias))  # type: ignore[operator]  # honours padding_mode

    def _conv_args(self) -> LF.ConvArgs:
        b = self.conv
        padding = b.padding if isinstance(b.padding, str) else tuple(b.padding)
        return LF.ConvArgs(stride=tuple(b.stride), padding=padding, dilation=tuple(b.dilation))

    def _can_bypass(self) -> bool:
        return self.conv.groups == 1 and self.conv.padding_mode == "zeros"

    def _with_bypass(self, x: Tensor, adapter_name: str, strength: float | Tensor) -> Tensor | None:
        """With a gradient wanted: the conv and the factors as one autograd Function
        (functional.apply_bypass_conv: about 20 aten ops a training step fewer than plain autograd).
        Numeric padding, a float strength (eager), no rank dropout, contiguous x and W; otherwise None
        (the plain ops)."""
        b = self.conv
        if not torch.is_grad_enabled() or isinstance(b.padding, str) or isinstance(strength, Tensor) or \
                self._rank_mask_on(adapter_name):
            return None
        w, bias = self.weight, self.bias
        if not (x.is_contiguous() and w.is_contiguous()):  # channels_last: the Function's views need NCHW
            return None
        f = self.factors(adapter_name)
        if not (x.requires_grad or w.requires_grad or any(t.requires_grad for t in f.values()) or
                (bias is not None and bias.requires_grad)):
            return None
        rec = self.adapters[adapter_name]
        f = {n: t.to(x.dtype) for n, t in f.items()}
        return LF.apply_bypass_conv(x, w, bias, f, rec.plan, rec.scale * strength, tuple(b.stride),
                                    tuple(b.padding), tuple(b.dilation))


class Conv1d(_Conv):
    """LoKr around nn.Conv1d."""


class Conv2d(_Conv):
    """LoKr around nn.Conv2d."""
