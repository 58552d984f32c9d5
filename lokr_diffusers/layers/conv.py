"""LoKr around nn.Conv1d / nn.Conv2d (a Conv2d adapter may carry a Tucker core: functional.plan)."""

from __future__ import annotations

import math
from typing import cast

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


class Conv1d(_Conv):
    """LoKr around nn.Conv1d."""


class Conv2d(_Conv):
    """LoKr around nn.Conv2d."""
