"""A LoKr layer's forward: per call and per adapter, the cheaper of two equal computations.

    y = op(x, fold(W_phys, applied))     plain adapters: fold(W, applied) = W + Σ_a w_a · scale_a · (W1_a ⊗ W2_a)

- "merged": one matmul/conv with W + ΔW (cheap for many tokens, and at inference, where W + ΔW is
  reused across calls: reuse.py; a Linear in training runs it as one autograd Function whose backward
  forms no full-size weight gradient);
- "bypass": apply the factors to x without building ΔW (cheap when ΔW dwarfs the activations, and
  for a conv in training, where W + ΔW would cost a full-size weight-gradient matmul).
The math is in `functional`; the choice in `_choose_bypass` (functional.prefer_bypass, or measured:
paths.py). The subclasses (linear.py, conv.py) say how the base op runs with a given weight.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn

from .. import functional as LF
from .. import paths, quantized, reuse
from .. import state as S
from ..errors import AdapterFusedError
from .base import LayerCore

Strengths = tuple[tuple[str, "float | Tensor"], ...]  # (adapter, strength): floats, or tensors when traced
_PLAIN = (nn.Linear, nn.Conv1d, nn.Conv2d)  # base layers whose op `_run` reproduces exactly


def plain_call(base: nn.Module, args: tuple, kwargs: dict) -> bool:
    """The wrapper may run the base op itself with another weight (W + ΔW): no extra arguments and no
    accelerate hook (offloading moves the weight in its pre-forward)."""
    return not args and not kwargs and "_hf_hook" not in base.__dict__


class LoKrLayer(LayerCore):
    """Base of the LoKr wrappers (storage and transitions: base.py). Subclasses say how the base op runs."""

    # ------------------------------------------------------------------ what subclasses provide
    def _tokens(self, x: Tensor) -> int:
        raise NotImplementedError

    def _run(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """The base op with a given weight (W + ΔW, or ΔW alone with bias=None)."""
        raise NotImplementedError

    def _conv_args(self) -> LF.ConvArgs | None:
        return None

    def _can_bypass(self) -> bool:
        return True

    def _with_bypass(self, x: Tensor, adapter_name: str, strength: float | Tensor) -> Tensor | None:
        """The base op plus one adapter applied to x as a single node, where the layer has one
        (Linear in training); None: run them apart."""
        return None

    # ---------------------------------------------------------------------------------- dispatch
    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        if torch.compiler.is_compiling():
            return self._forward_traced(x, args, kwargs)
        e = self.kept.entry
        if e is not None and e.live is not None and e.version == self.version and not torch.is_grad_enabled() and \
                not self.training and self._call_scale == 1.0 and self.forward_mode != "bypass":
            # the denoising loop's path: nothing changed since W + ΔW was built for the layer's own strengths
            # (reuse.py; no entry exists while reuse is off). Kept lean: this runs once per layer and
            # denoising step, where the bare layer costs a few µs on a GPU's host; a swapped .data shows in
            # the stamps' data_ptr
            base = self._modules["base_layer"]
            if plain_call(base, args, kwargs) and e.stamps == reuse.stamps(e.live):  # type: ignore[arg-type]
                return self._run(x, e.weight, base._parameters.get("bias"))  # type: ignore[union-attr]
        applied = self._applied
        if self.training:
            self._check_fused_frozen()
            applied = tuple(p for p in applied if not self._module_dropped(p[0]))
        if not applied:  # fused, disabled or nothing active
            return self._base(x, args, kwargs)
        if self._call_scale != 1.0:
            applied = tuple((a, s * self._call_scale) for a, s in applied)
        direct = self._direct(args, kwargs)
        if direct and not self.training and self.forward_mode != "bypass" and reuse.enabled() and \
                not torch.is_grad_enabled():
            tensors = self.kept.tensors((self.version, applied), lambda: self._tensors_of(applied))
            w_eff = self.kept.weight(self.version, applied, tensors, lambda: self._adapted_weight(applied),
                                     own=applied is self._applied)
            return self._run(x, w_eff, self.bias)
        return self._forward_applied(x, applied, direct, args, kwargs)

    def _direct(self, args: tuple, kwargs: dict) -> bool:
        """W + ΔW can go into the base op: a plain call, and a weight that is not quantized (a quantized
        base layer dequantizes its weight itself)."""
        return plain_call(self.base_layer, args, kwargs) and quantized.quantization_of(self.base_layer) is None

    def _forward_traced(self, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        """forward under torch.compile: the same paths, with each adapter's scale and strength and the
        call scale read from tensors (`_traced`), so that changing them, or the factors' values,
        recompiles nothing (docs/performance.md §torch.compile). With frozen adapters, W + ΔW is built
        by one graph and stored in `kept.traced`, then reused by the next (reuse.py)."""
        kept = self.kept.traced
        if kept is not None and not self.training and not torch.is_grad_enabled() and \
                self.forward_mode != "bypass" and reuse.enabled() and \
                plain_call(self._modules["base_layer"], args, kwargs):  # type: ignore[arg-type]
            # read here, so that the graph that reuses it guards on no more of the layer than this: not
            # the base weight, the adapters' tensors or the quantization check
            return self._run(x, kept, self._modules["base_layer"]._parameters.get("bias"))  # type: ignore[union-attr]
        names = tuple(self._traced)
        if self.training:
            self._check_fused_frozen()
            names = tuple(a for a in names if not self._module_dropped(a))
        if not names:
            return self._base(x, args, kwargs)
        direct = self._direct(args, kwargs)
        strengths = tuple((a, self._total[a]) for a in names)  # scale · strength · call scale, one tensor
        if direct and not self.training and not torch.is_grad_enabled() and self._frozen and \
                self.forward_mode != "bypass" and reuse.enabled():
            w = self.kept.traced = self._adapted_weight(strengths)
            reuse.TRACED.holding = True
            return self._run(x, w, self.bias)
        return self._forward_applied(x, strengths, direct, args, kwargs)

    def _tensors_of(self, applied: S.Pairs) -> list[Tensor]:
        """The base weight and the applied adapters' tensors (what W + ΔW is built from)."""
        return [self.weight, *(t for a, _ in applied for t in self.adapter_tensors(a).values())]

    def _base(self, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        """The base op alone, without a second module call where nothing else needs one."""
        base = cast(nn.Module, self._modules["base_layer"])
        if not plain_call(base, args, kwargs) or "forward" in base.__dict__ or \
                base._forward_hooks or base._forward_pre_hooks or type(base) not in _PLAIN:
            return cast(Tensor, base(x, *args, **kwargs))
        w, b = cast(Tensor, base._parameters["weight"]), cast("Tensor | None", base._parameters.get("bias"))
        if w.dtype in quantized.FP8:  # fp8 storage with nothing to cast it up: cast up to x's dtype for the op
            w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
        return self._run(x, w, b)

    def _forward_applied(self, x: Tensor, applied: Strengths, direct: bool, args: tuple, kwargs: dict) -> Tensor:
        """The applied adapters at these strengths: each merged into W or applied to x (bypass)."""
        dora = self._modules["dora_scale"]._parameters  # type: ignore[union-attr]  # ParameterDict's own store
        if dora and any(a in dora for a, _ in applied):
            return self._forward_in_order(x, applied, direct, args, kwargs)
        in_merge: list[tuple[str, float | Tensor]] = []
        in_bypass: list[tuple[str, float | Tensor]] = []
        for a, s in applied:
            (in_bypass if self._choose_bypass(a, x, direct) else in_merge).append((a, s))
        if in_merge and direct and not any(self._rank_mask_on(a) for a, _ in in_merge):
            result = self._run_merged(x, tuple(in_merge))  # W + Σ ΔW, then one op
        elif in_merge:
            w = self.weight if direct or self.quantization is None else x  # quantized: ΔW in x's dtype (dtype only)
            delta = sum((self._contribution(a, s, w) for a, s in in_merge[1:]), self._contribution(*in_merge[0], w))
            if direct:
                result = self._run(x, w + delta, self.bias)
            else:  # the base layer must run itself (hooks, extra args): ΔW goes in a second op
                result = self.base_layer(x, *args, **kwargs) + self._run(x, delta, None)
        elif direct and len(in_bypass) == 1 and (joint := self._with_bypass(x, *in_bypass[0])) is not None:
            return joint  # the base op and the adapter as one node (Linear, training)
        else:
            result = self._base(x, args, kwargs)
        for a, s in in_bypass:
            result = result + self._bypass(x, a, s)
        return result

    def _forward_in_order(self, x: Tensor, applied: Strengths, direct: bool, args: tuple, kwargs: dict) -> Tensor:
        """With a DoRA adapter active: build W' adapter by adapter, in order (as fuse does). Over a
        quantized base, from its dequantized weight, W' − W beside the base op."""
        w = self.weight if self.quantization is None else quantized.dequantize(self.base_layer, dtype=x.dtype)
        w_eff = self._adapted_weight(applied, w)
        if direct:
            return self._run(x, w_eff, self.bias)
        return self._base(x, args, kwargs) + self._run(x, w_eff - w, None)

    # ------------------------------------------------------------------------------ the two paths
    def _run_merged(self, x: Tensor, applied: Strengths) -> Tensor:
        """The base op with W + the applied adapters' changes (no DoRA, no rank dropout)."""
        return self._run(x, self._adapted_weight(applied), self.bias)

    def _scale_of(self, adapter_name: str, strength: float | Tensor) -> float | Tensor:
        """scale · strength: floats in eager; when traced (`_forward_traced`), the tensor given is that product
        already (with the call scale in it)."""
        if isinstance(strength, Tensor):
            return strength
        return self.adapters[adapter_name].scale * strength

    def _adapted_weight(self, applied: Strengths, w: Tensor | None = None) -> Tensor:
        """W (default the base weight) + the applied adapters' changes, a new tensor: with a DoRA
        adapter, adapter by adapter in order (each normalises the weight it is given, as fuse does);
        otherwise one pass per adapter (functional.add_delta, no kron materialised)."""
        w = self.weight if w is None else w
        w_eff = w
        if any(a in self.dora_scale for a, _ in applied):
            for a, s in applied:
                w_eff = w_eff + self._contribution(a, s, w_eff)
            return w_eff
        for a, s in applied:
            w_eff = LF.add_delta(w_eff, self.factors(a), self._scale_of(a, s), inplace=w_eff is not w,
                                 rows=self.adapters[a].rows)
        return w_eff

    def _delta(self, adapter_name: str, strength: float | Tensor, w: Tensor) -> Tensor:
        """What one adapter at `strength` adds to the weight `w`: strength·scale·W1⊗W2, or for DoRA
        the change W'' − W (DoRA normalises the weight it is given), in the factors' dtype for a
        plain adapter and in w's for DoRA."""
        f = self.factors(adapter_name)
        rec = self.adapters[adapter_name]
        if adapter_name not in self.dora_scale:
            return LF.delta_weight(f, self.weight_shape, self._scale_of(adapter_name, strength), rec.rows)
        scale: float | Tensor = rec.scale
        if isinstance(strength, Tensor):  # traced: DoRA takes scale and strength apart
            scale, strength = self._traced[adapter_name][0], self._traced[adapter_name][1] * self._call_t
        return LF.adapt_weight(w, f, scale, self.dora_scale[adapter_name], strength, rows=rec.rows) - w

    def _contribution(self, adapter_name: str, strength: float | Tensor, w: Tensor) -> Tensor:
        """`_delta` in w's dtype, with this call's rank-dropout mask on its output rows."""
        delta = self._delta(adapter_name, strength, w).to(w.dtype)
        mask = self._rank_mask(adapter_name, delta)
        if mask is not None:
            delta = delta * mask.view(-1, *([1] * (delta.dim() - 1)))
        return delta

    def get_delta_weight(self, adapter_name: str, base: Tensor | None = None) -> Tensor:
        """The change one adapter makes to the weight (`base`, default the base weight) at its
        user weight: s·scale·W1⊗W2, or for DoRA the change W'' − W."""
        w = self.weight if base is None and adapter_name not in self.dora_scale else \
            (self.base_weight() if base is None else base)
        return self._delta(adapter_name, self.state.weight(adapter_name), w.detach())

    def _bypass(self, x: Tensor, adapter_name: str, strength: float | Tensor) -> Tensor:
        f = {n: t.to(x.dtype) for n, t in self.factors(adapter_name).items()}
        rec = self.adapters[adapter_name]
        y = LF.apply_lokr(x, f, rec.plan, self._scale_of(adapter_name, strength), self._conv_args(), rec.rows)
        mask = self._rank_mask(adapter_name, y)
        if mask is not None:
            shape = [1] * y.dim()
            shape[-1 if self._conv_args() is None else 1] = -1
            y = y * mask.view(shape)
        return y

    # ------------------------------------------------------------------------ training: dropout
    def _rank_mask_on(self, adapter_name: str) -> bool:
        return self.training and self.adapters[adapter_name].rank_dropout > 0

    def _rank_mask(self, adapter_name: str, like: Tensor) -> Tensor | None:
        """(out,) keep-mask of rank dropout for this call, or None outside training."""
        rec = self.adapters[adapter_name]
        if not (self.training and rec.rank_dropout > 0):
            return None
        keep = (torch.rand(self.weight_shape[0], device=like.device) > rec.rank_dropout).to(like.dtype)
        if rec.rank_dropout_scale and keep.sum() > 0:
            keep = keep / keep.mean()
        return keep

    def _module_dropped(self, adapter_name: str) -> bool:
        p = self.adapters[adapter_name].module_dropout
        return p > 0 and torch.rand(1).item() < p

    def _check_fused_frozen(self) -> None:
        """Training through a fused adapter cannot reach its factors: say so instead of a backward error."""
        if not self.state.fused or not torch.is_grad_enabled():
            return
        for a in self.state.fused_names:
            if any(t.requires_grad for t in self.factors(a).values()):
                raise AdapterFusedError(f"adapter {a!r} is fused into the base weights, so training cannot reach "
                                        "its factors; unfuse it first (pipe.unfuse_lokr() / model.unmerge_adapter()) "
                                        "or freeze it (requires_grad_(False))")

    # ------------------------------------------------------------------------------ the choice
    def _choose_bypass(self, adapter_name: str, x: Tensor, direct: bool) -> bool:
        """True: apply this adapter to x (bypass); False: W + ΔW (merged). Forced modes and the cases with
        one possible path answer at once; `auto` asks the cost model (or the timing, paths.py) once per
        (adapter, input shape and dtype, device, gradients, autocast) and keeps the answer in `_choices`
        until the next commit, so that a training loop pays a dict lookup per call, not the model."""
        if not self._can_bypass():
            return False
        if not direct and self.quantization is not None:
            return True  # a quantized weight is never combined with ΔW, whatever the forward mode
        mode = self.forward_mode
        if mode != "auto":
            return mode == "bypass"
        if not direct:  # no cheap W + ΔW path: ΔW would cost a second full matmul
            return True
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in self.factors(adapter_name).values())
        if torch.compiler.is_compiling():
            if not needs_grad:
                return False  # a compiled graph builds W + ΔW in one fused pointwise kernel: cheaper than 3-4 GEMMs
            return self._choose(adapter_name, x, needs_grad)  # traced once: no cache to guard on
        dev = x.device
        autocast = torch.is_autocast_enabled(dev.type) and torch.get_autocast_dtype(dev.type)
        key = (adapter_name, x.shape, x.dtype, dev, needs_grad, x.requires_grad, self.training, autocast,
               paths.generation)
        hit = self._choices.get(key)
        if hit is None:
            hit = self._choices[key] = self._choose(adapter_name, x, needs_grad)
        return hit

    def _choose(self, adapter_name: str, x: Tensor, needs_grad: bool) -> bool:
        """The `auto` choice, uncached: measured (paths.py) where the device type says so, else the cost model."""
        rec = self.adapters[adapter_name]
        device = self.weight.device
        if paths.path_choice(device.type) == "measure" and not self._rank_mask_on(adapter_name) and \
                paths.can_measure(device):
            key = (type(self), self.weight_shape, self._conv_args(), rec.plan, rec.rows, tuple(x.shape),
                   x.dtype, self.weight.dtype, device, torch.is_autocast_enabled(device.type),
                   torch.get_autocast_dtype(device.type), needs_grad, x.requires_grad)
            return paths.measured(key, lambda: self._measure(x, adapter_name, needs_grad))
        return LF.prefer_bypass(LF.restricted_plan(rec.plan, rec.rows), self._tokens(x), needs_grad)

    def _measure(self, x: Tensor, adapter_name: str, needs_grad: bool) -> bool:
        """Time this adapter's two paths on x (paths.measure_paths); True: bypass wins."""
        one = ((adapter_name, 1.0),)

        def bypass(xs: Tensor) -> Tensor:
            joint = self._with_bypass(xs, adapter_name, 1.0)
            return self._run(xs, self.weight, self.bias) + self._bypass(xs, adapter_name, 1.0) if joint is None \
                else joint

        return paths.measure_paths(lambda xs: self._run_merged(xs, one), bypass, x,
                                   list(self.factors(adapter_name).values()), needs_grad, self.weight.device)
