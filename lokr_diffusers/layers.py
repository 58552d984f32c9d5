"""LoKr layers: a wrapper around an nn.Linear / nn.Conv1d / nn.Conv2d `base_layer`.

    y = base_layer(x) + Σ_a  w_a · scale_a · (W1_a ⊗ W2_a) x        over the active adapters a

Adapters live in ParameterDicts keyed by adapter name, named like PEFT's (`lokr_w1["default"]`).
The math is in `functional`; this module only holds parameters and picks, per call and per
adapter, the cheaper of two equal computations (DESIGN.md):
- "merged": one matmul/conv with W + ΔW (cheap for many tokens, and at inference);
- "bypass": apply the factors to x without building ΔW (cheap when ΔW dwarfs the activations,
  and in training, where W + ΔW would cost a full-size weight-gradient matmul).
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from . import functional as LF
from .config import LoKrConfig

logger = logging.getLogger(__name__)

ForwardMode = Literal["auto", "merged", "bypass"]
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name):
        raise ValueError(f"adapter name {name!r} must be a non-empty string of letters, digits, '_' or '-'")


class LoKrLayer(nn.Module):
    """Base of the LoKr wrappers. Subclasses say how the base op runs with a given weight."""

    adapter_layer_names: tuple[str, ...] = LF.FACTOR_NAMES
    other_param_names: tuple[str, ...] = ("r", "alpha", "scaling", "rank_dropout", "module_dropout")

    def __init__(self, base_layer: nn.Module, adapter_name: str | None = None, config: LoKrConfig | None = None,
                 r: int | None = None, alpha: float | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        for name in LF.FACTOR_NAMES:
            setattr(self, name, nn.ParameterDict())
        self.dora_scale = nn.ParameterDict()  # DoRA magnitudes, (out, 1, ...) or (1, in, ...)
        self.r: dict[str, int] = {}
        self.alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}  # the producer's scale (alpha / r for a fresh adapter)
        self.adapter_weight: dict[str, float] = {}  # the user's strength, default 1.0
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.plans: dict[str, LF.LoKrPlan] = {}
        self._active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.forward_mode: ForwardMode = "auto"
        self._original_weight: Tensor | None = None  # CPU copy taken at the first merge
        if adapter_name is not None and config is not None:
            self.update_layer(adapter_name, config.r if r is None else r, config.alpha if alpha is None else alpha,
                              config)
            self._active_adapters = [adapter_name]

    # ------------------------------------------------------------------------------------ state
    @property
    def weight(self) -> Tensor:
        return cast(Tensor, self.base_layer.weight)

    @property
    def bias(self) -> Tensor | None:
        return cast("Tensor | None", self.base_layer.bias)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return tuple(self.weight.shape)

    def base_weight(self) -> Tensor:
        """The base weight without this layer's fused adapters (the W the adapters are relative to),
        detached, on the weight's device."""
        if self.merged_adapters and self._original_weight is not None:
            return self._original_weight.to(self.weight.device)
        return self.weight.detach()

    @property
    def active_adapters(self) -> list[str]:
        return list(self._active_adapters)

    @property
    def active_adapter(self) -> str | list[str]:
        return self._active_adapters[0] if len(self._active_adapters) == 1 else self.active_adapters

    @property
    def merged(self) -> bool:
        return bool(self.merged_adapters)

    def adapter_names(self) -> list[str]:
        return list(self.plans)

    def factors(self, adapter_name: str) -> dict[str, Tensor]:
        """The adapter's stored tensors by name ("lokr_w1", ...)."""
        return {n: getattr(self, n)[adapter_name] for n in LF.FACTOR_NAMES if adapter_name in getattr(self, n)}

    def effective_scale(self, adapter_name: str) -> float:
        return self.scaling[adapter_name] * self.adapter_weight[adapter_name]

    # ---------------------------------------------------------------------------- create adapters
    def update_layer(self, adapter_name: str, r: int, alpha: float, config: LoKrConfig) -> None:
        """Create (or recreate) `adapter_name` from a config: plan shapes, initialise, scale alpha / r."""
        check_adapter_name(adapter_name)
        plan = LF.plan_lokr(self.weight_shape, r, config.decompose_factor, config.decompose_both,
                            config.use_effective_conv2d, config.full_matrix)
        w = self.weight
        tensors = {n: torch.empty(s, device=w.device, dtype=w.dtype) for n, s in plan.shapes().items()}
        _initialise(tensors, config.init_weights)
        self.set_adapter_tensors(adapter_name, tensors, LF.peft_scale(alpha, r), r=r, alpha=alpha,
                                 requires_grad=not config.inference_mode)
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.module_dropout[adapter_name] = config.module_dropout
        self.rank_dropout_scale[adapter_name] = config.rank_dropout_scale

    def set_adapter_tensors(self, adapter_name: str, tensors: dict[str, Tensor], scale: float, *,
                            r: int | None = None, alpha: float | None = None, requires_grad: bool = False,
                            dora_scale: Tensor | None = None) -> None:
        """Put an adapter's tensors in place; shapes are read off the tensors and checked first."""
        check_adapter_name(adapter_name)
        plan = LF.plan_from_tensors(self.weight_shape, tensors)
        if dora_scale is not None:
            LF.dora_on_output_axis(dora_scale, self.weight_shape)  # raises if it fits no axis
        if not math.isfinite(scale):
            raise ValueError(f"adapter {adapter_name!r}: scale {scale} is not finite")
        self._drop_tensors(adapter_name)
        for name, t in tensors.items():
            getattr(self, name)[adapter_name] = nn.Parameter(t, requires_grad=requires_grad)
        if dora_scale is not None:
            self.dora_scale[adapter_name] = nn.Parameter(dora_scale, requires_grad=requires_grad)
        self.plans[adapter_name] = plan
        self.scaling[adapter_name] = float(scale)
        self.r[adapter_name] = r if r is not None else (plan.rank or 1)
        self.alpha[adapter_name] = alpha if alpha is not None else scale * self.r[adapter_name]
        self.adapter_weight.setdefault(adapter_name, 1.0)
        self.rank_dropout.setdefault(adapter_name, 0.0)
        self.module_dropout.setdefault(adapter_name, 0.0)
        self.rank_dropout_scale.setdefault(adapter_name, False)

    def _drop_tensors(self, adapter_name: str) -> None:
        for name in (*LF.FACTOR_NAMES, "dora_scale"):
            store = getattr(self, name)
            if adapter_name in store:
                del store[adapter_name]

    def delete_adapter(self, adapter_name: str) -> None:
        if adapter_name not in self.plans:
            raise KeyError(f"adapter {adapter_name!r} not in this layer (has {self.adapter_names()})")
        if adapter_name in self.merged_adapters:
            self.unmerge()
        self._drop_tensors(adapter_name)
        for d in (self.r, self.alpha, self.scaling, self.adapter_weight, self.rank_dropout, self.module_dropout,
                  self.rank_dropout_scale, self.plans):
            d.pop(adapter_name, None)
        self._active_adapters = [a for a in self._active_adapters if a != adapter_name]

    def set_adapter(self, adapter_names: str | Iterable[str]) -> None:
        """Make these adapters the active ones (those the layer has; others are ignored here)."""
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        self._active_adapters = [n for n in names if n in self.plans]

    def set_adapter_weight(self, adapter_name: str, weight: float) -> None:
        self.adapter_weight[adapter_name] = float(weight)

    def enable_adapters(self, enabled: bool) -> None:
        self.disable_adapters = not enabled

    # ------------------------------------------------------------------------------- ΔW and merge
    def adapter_tensors(self, adapter_name: str) -> dict[str, Tensor]:
        """Factors plus `dora_scale` when the adapter has one (what a file stores)."""
        out = self.factors(adapter_name)
        if adapter_name in self.dora_scale:
            out["dora_scale"] = self.dora_scale[adapter_name]
        return out

    def get_delta_weight(self, adapter_name: str, base: Tensor | None = None) -> Tensor:
        """The change one adapter makes to the weight (`base`, default the current base weight),
        with its user weight: s·scale·W1⊗W2, or for DoRA the change W'' − W."""
        if adapter_name not in self.dora_scale:
            return LF.delta_weight(self.factors(adapter_name), self.weight_shape, self.effective_scale(adapter_name))
        delta = LF.delta_weight(self.factors(adapter_name), self.weight_shape, self.scaling[adapter_name])
        w = (self.weight if base is None else base).detach().to(delta.dtype)
        return LF.dora_weight(w, delta, self.dora_scale[adapter_name], self.adapter_weight[adapter_name]) - w

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None,
              keep_original: bool = True) -> None:
        """Add the adapters' ΔW into the base weight (in place). The first merge keeps a CPU copy
        of the original weight, so that `unmerge` restores it bit for bit (keep_original=False
        skips the copy, for a merge that is never undone)."""
        names = [a for a in (adapter_names or self._active_adapters) if a in self.plans]
        names = [a for a in names if a not in self.merged_adapters]
        if not names:
            return
        w = self.weight
        target = w.detach().clone() if safe_merge else w.data  # safe: build aside, check, then copy
        if self._original_weight is None and keep_original:
            self._original_weight = w.detach().to("cpu", copy=True)
        for a in names:  # in order, each on the weight so far (DoRA normalises what it is given)
            if a in self.dora_scale:
                target += self.get_delta_weight(a, base=target).to(target.dtype)
            else:
                LF.add_delta(target, self.factors(a), self.effective_scale(a), inplace=True)
        if safe_merge:
            if not torch.isfinite(target).all():
                raise ValueError(f"merging adapters {names} gives non-finite weights; they were not merged")
            w.data.copy_(target)
        self.merged_adapters.extend(names)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight exactly as it was before the first merge."""
        if not self.merged_adapters:
            return
        if self._original_weight is None:
            raise RuntimeError("this merge was made with keep_original=False and cannot be undone")
        w = self.weight
        w.data.copy_(self._original_weight.to(w.device))
        self._original_weight = None
        self.merged_adapters = []

    # ------------------------------------------------------------------------------------ forward
    def _tokens(self, x: Tensor) -> int:
        raise NotImplementedError

    def _run(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The base op with a given weight (W + ΔW, or ΔW alone with bias=None)."""
        raise NotImplementedError

    def _conv_args(self) -> LF.ConvArgs | None:
        return None

    def _can_bypass(self) -> bool:
        return True

    def _rank_dropping(self, adapter_name: str) -> bool:
        return self.training and self.rank_dropout[adapter_name] > 0

    def _rank_mask(self, adapter_name: str, like: Tensor) -> Tensor | None:
        """(out,) keep-mask of rank dropout for this call, or None outside training."""
        p = self.rank_dropout[adapter_name]
        if not (self.training and p > 0):
            return None
        keep = (torch.rand(self.weight_shape[0], device=like.device) > p).to(like.dtype)
        if self.rank_dropout_scale[adapter_name] and keep.sum() > 0:
            keep = keep / keep.mean()
        return keep

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self._active_adapters if a in self.plans and a not in self.merged_adapters]
        if self.training:
            active = [a for a in active if not self._module_dropped(a)]
        if not active:
            return self.base_layer(x, *args, **kwargs)
        direct = not args and not kwargs and not hasattr(self.base_layer, "_hf_hook")
        tokens = self._tokens(x)
        in_merge, in_bypass = [], []
        for a in active:
            if self._choose_bypass(a, tokens, direct):
                in_bypass.append(a)
            else:
                in_merge.append(a)
        w = self.weight
        plain = direct and not any(a in self.dora_scale or self._rank_dropping(a) for a in in_merge)
        if in_merge and plain:  # W + Σ ΔW built in one pass per adapter, then one op
            w_eff = w
            for a in in_merge:
                w_eff = LF.add_delta(w_eff, self.factors(a), self.effective_scale(a), inplace=w_eff is not w)
            result = self._run(x, w_eff, self.bias)
        elif in_merge:
            delta = self._masked_delta(in_merge[0], w)
            for a in in_merge[1:]:
                delta = delta + self._masked_delta(a, w)
            if direct:
                result = self._run(x, w + delta, self.bias)
            else:  # the base layer must run itself (hooks, extra args): ΔW goes in a second op
                result = self.base_layer(x, *args, **kwargs) + self._run(x, delta, None)
        else:
            result = self.base_layer(x, *args, **kwargs)
        for a in in_bypass:
            result = result + self._bypass(x, a)
        return result

    def _module_dropped(self, adapter_name: str) -> bool:
        p = self.module_dropout[adapter_name]
        return p > 0 and torch.rand(1).item() < p

    def _choose_bypass(self, adapter_name: str, tokens: int, direct: bool) -> bool:
        if not self._can_bypass() or adapter_name in self.dora_scale:  # DoRA needs ‖W + ΔW‖
            return False
        mode = self.forward_mode
        if mode != "auto":
            return mode == "bypass"
        if not direct:  # no cheap W + ΔW path: ΔW would cost a second full matmul
            return True
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in self.factors(adapter_name).values())
        return LF.prefer_bypass(self.plans[adapter_name], tokens, needs_grad)

    def _masked_delta(self, adapter_name: str, w: Tensor) -> Tensor:
        delta = self.get_delta_weight(adapter_name).to(w.dtype)
        mask = self._rank_mask(adapter_name, delta)
        if mask is not None:
            delta = delta * mask.view(-1, *([1] * (delta.dim() - 1)))
        return delta

    def _bypass(self, x: Tensor, adapter_name: str) -> Tensor:
        f = {n: t.to(x.dtype) for n, t in self.factors(adapter_name).items()}
        y = LF.apply_lokr(x, f, self.plans[adapter_name], self.effective_scale(adapter_name), self._conv_args())
        mask = self._rank_mask(adapter_name, y)
        if mask is not None:
            shape = [1] * y.dim()
            shape[-1 if self._conv_args() is None else 1] = -1
            y = y * mask.view(shape)
        return y

    def extra_repr(self) -> str:
        return f"adapters={self.adapter_names()}, active={self._active_adapters}, merged={self.merged_adapters}"


class Linear(LoKrLayer):
    """LoKr around nn.Linear. x: (..., in) -> (..., out)."""

    def _tokens(self, x: Tensor) -> int:
        return x.numel() // max(x.shape[-1], 1)

    def _run(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return nn.functional.linear(x, weight, bias)


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


def _initialise(tensors: dict[str, Tensor], init_weights: bool | str) -> None:
    """True: W1 zero; "lycoris": W2 zero; False: random. The rest Kaiming-uniform, as PEFT/LyCORIS."""
    zero: set[str] = set()
    if init_weights is True:
        zero = {"lokr_w1", "lokr_w1_a"}
    elif init_weights == "lycoris":
        zero = {"lokr_w2", "lokr_w2_b"}
    with torch.no_grad():
        for name, t in tensors.items():
            if name in zero:
                nn.init.zeros_(t)
            else:
                nn.init.kaiming_uniform_(t, a=math.sqrt(5))
