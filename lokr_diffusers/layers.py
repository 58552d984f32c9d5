"""LoKr layers: a wrapper around an nn.Linear / nn.Conv1d / nn.Conv2d `base_layer`.

    y = op(x, fold(W_phys, applied))     W_phys: the base weight with the fused adapters in it
    plain adapters: fold(W, applied) = W + Σ_a w_a · scale_a · (W1_a ⊗ W2_a)   (DoRA: docs/adapters.md)

Adapters live in ParameterDicts keyed by adapter name, named like PEFT's (`lokr_w1["default"]`);
what is active, fused or disabled is one `state.LayerState` (docs/adapters.md). The math is in
`functional`; this module holds parameters and picks, per call and per adapter, the cheaper of two
equal computations:
- "merged": one matmul/conv with W + ΔW (cheap for many tokens, and at inference; a Linear in
  training runs it as one autograd Function whose backward forms no full-size weight gradient);
- "bypass": apply the factors to x without building ΔW (cheap when ΔW dwarfs the activations,
  and for a conv in training, where W + ΔW would cost a full-size weight-gradient matmul).
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

from . import commits, paths, quantized, reuse
from . import functional as LF
from . import state as S
from .config import LoKrConfig
from .errors import AdapterFusedError
from .fusing import Frozen, FusedWeight

logger = logging.getLogger(__name__)

ForwardMode = Literal["auto", "merged", "bypass"]
_PLAIN = (nn.Linear, nn.Conv1d, nn.Conv2d)  # base layers whose op `_run` reproduces exactly
Strengths = tuple[tuple[str, "float | Tensor"], ...]  # (adapter, strength): floats, or tensors when traced
_ADAPTER_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")


def check_adapter_name(name: str) -> None:
    if not isinstance(name, str) or not _ADAPTER_NAME.match(name):
        raise ValueError(f"adapter name {name!r} must be a non-empty string of letters, digits, '_' or '-'")


class LoKrLayer(nn.Module):
    """Base of the LoKr wrappers. Subclasses say how the base op runs with a given weight.

    The adapter state (active adapters, weights, enabled, fused) is one `state.LayerState`; every
    operation below is a transition of it, and `commit` makes the base weight follow it.
    """

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
        self.rank_dropout: dict[str, float] = {}
        self.module_dropout: dict[str, float] = {}
        self.rank_dropout_scale: dict[str, bool] = {}
        self.plans: dict[str, LF.LoKrPlan] = {}  # with rows: the plan of the adapter's fused weight
        # A fused original module (Flux's qkv, linear1) split over diffusers' Linears: the adapter's kron is
        # the fused weight, this layer holds `rows` of it (functional.Rows; factors shared between the
        # pieces), `origins` names the original module (what an export writes back)
        self.rows: dict[str, LF.Rows] = {}
        self.origins: dict[str, str] = {}
        self.forward_mode: ForwardMode = "auto"
        self.state = S.LayerState()
        self.version = 0  # bumped by every commit
        self._applied: S.Pairs = ()  # state.applied(), cached for forward
        self._call_scale = 1.0  # diffusers' cross_attention_kwargs["scale"] during one call (scaling.py)
        # The same numbers as 0-dim tensors on the weight's device, for torch.compile: a traced forward
        # reads (scale, weight) per applied adapter and the call scale from tensors, so changing them
        # recompiles nothing (a Python float would be a guarded constant). Rebuilt on every commit.
        self._traced: dict[str, tuple[Tensor, Tensor]] = {}
        self._call_t = torch.ones(())
        self._fused = FusedWeight()  # the weight without our fused adapters, and what each was fused with
        self._qfused = quantized.QuantizedFuse()  # the same for a quantized base, fused by requantizing
        # W + ΔW reused (reuse.py): (key, W + ΔW, the tensors it was built from, detached; the live tensors
        # when it was built for the layer's own strengths, for forward's fast path, else None)
        self._kept: tuple[tuple, Tensor, list[Tensor], list[Tensor] | None] | None = None
        self._kept_t: Tensor | None = None  # W + ΔW stored by a compiled graph (reuse.py)
        self._frozen = True  # _adapters_frozen(), kept for traced code
        self._tensor_list: tuple[tuple, list[Tensor]] | None = None
        if adapter_name is not None and config is not None:
            self.update_layer(adapter_name, config.r if r is None else r, config.alpha if alpha is None else alpha,
                              config)
            self.set_adapter([adapter_name])

    # ------------------------------------------------------------------------------------ state
    @property
    def weight(self) -> Tensor:
        return cast(Tensor, self.base_layer.weight)

    @property
    def bias(self) -> Tensor | None:
        return cast("Tensor | None", self.base_layer.bias)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        """The weight's logical shape (a quantized weight's packed storage may have another)."""
        w = self.weight
        if type(w) is nn.Parameter or type(w) is Tensor:
            return tuple(w.shape)
        return quantized.logical_shape(self.base_layer)

    @property
    def quantization(self) -> str | None:
        """What quantizes the base layer's weight, in words, or None (docs/adapters.md §Quantized base layers)."""
        return quantized.quantization_of(self.base_layer)

    @property
    def requantization_error(self) -> float | None:
        """Max |dequantized weight − exact W + ΔW| left by the last requantizing fuse, while one holds."""
        return self._qfused.error

    def base_weight(self) -> Tensor:
        """The base weight without this layer's fused adapters (the W the adapters are relative to),
        detached, on the weight's device; a quantized weight dequantized."""
        if self.quantization is not None:
            return self._qfused.current_base(self.base_layer, bool(self.state.physical()))
        if self.state.physical():
            return self._fused.recover(self.weight, self.state.physical()).clone()
        return self.weight.detach()

    @property
    def active_adapters(self) -> list[str]:
        return list(self.state.active)

    @property
    def active_adapter(self) -> str | list[str]:
        active = self.active_adapters
        return active[0] if len(active) == 1 else active

    @property
    def merged_adapters(self) -> list[str]:
        return list(self.state.fused_names)

    @property
    def merged(self) -> bool:
        return bool(self.state.fused)

    @property
    def disable_adapters(self) -> bool:
        return not self.state.enabled

    @property
    def adapter_weight(self) -> dict[str, float]:
        """Each adapter's user strength (read-only copy; change it with set_adapter_weight)."""
        return {a: self.state.weight(a) for a in self.state.adapters}

    def adapter_names(self) -> list[str]:
        return list(self.plans)

    def factors(self, adapter_name: str) -> dict[str, Tensor]:
        """The adapter's stored tensors by name ("lokr_w1", ...)."""
        return {n: getattr(self, n)[adapter_name] for n in LF.FACTOR_NAMES if adapter_name in getattr(self, n)}

    def adapter_tensors(self, adapter_name: str) -> dict[str, Tensor]:
        """Factors plus `dora_scale` when the adapter has one (what a file stores)."""
        out = self.factors(adapter_name)
        if adapter_name in self.dora_scale:
            out["dora_scale"] = self.dora_scale[adapter_name]
        return out

    def effective_scale(self, adapter_name: str) -> float:
        return self.scaling[adapter_name] * self.state.weight(adapter_name)

    # ---------------------------------------------------------------------------------- transitions
    def commit(self, new: S.LayerState, keep_original: bool = True, requantize: bool = False) -> None:
        """Take `new` as the layer's state; the base weight is rebuilt when the fused part changes.
        A quantized base weight is never written: fusing into it raises unless `requantize`
        (quantized.py). Non-finite weights are checked before, by the fuse path (commits.py)."""
        old_phys, new_phys = self.state.physical(), new.physical()
        if old_phys != new_phys:
            if self._on_quantized():
                self._qfused.move(self.base_layer, self._describe(), old_phys, new_phys, self._freeze,
                                  keep_original, requantize)
            else:
                self._fused.move(self.weight, old_phys, new_phys, self._freeze, keep_original)
        if not new.fused:
            self._qfused.allowed = False
        self.state = new
        self._applied = new.applied()
        self.version += 1
        self._kept = None
        self._tensor_list = None
        self._sync_traced()

    def _sync_traced(self) -> None:
        """`_traced` for the applied adapters, in order; new tensors (never in-place: a tensor made
        under inference_mode could not be updated or saved for backward outside it)."""
        reuse.forget_traced()
        reuse.TRACED.layers.add(self)
        reuse.watch_optimizers()
        self._frozen = self._adapters_frozen()
        w = self.weight  # on meta too: 0-d tensors, and a later .to_empty() / .to() moves them with the weight
        with torch.inference_mode(False), torch.no_grad():
            self._traced = {a: (torch.full((), self.scaling[a], device=w.device),
                                torch.full((), s, device=w.device)) for a, s in self._applied}
            self._call_t = torch.full((), self._call_scale, device=w.device)

    def _adapters_frozen(self) -> bool:
        """No applied adapter's tensor requires grad: a compiled graph may keep W + ΔW (reuse.py). Read
        as a plain bool in traced code (one cheap guard, not one per factor); refreshed on every
        commit and on train() / eval()."""
        return not any(t.requires_grad for a, _ in self._applied for t in self.adapter_tensors(a).values())

    def set_call_scale(self, scale: float) -> None:
        """diffusers' per-call LoRA scale (scaling.call_scale), as a float and for traced forwards."""
        self._call_scale = scale
        self._kept_t = None  # every layer of the model gets a new call scale: no partial drop
        with torch.inference_mode(False), torch.no_grad():
            self._call_t = torch.full((), scale, device=self.weight.device)

    def set_adapter(self, adapter_names: str | Iterable[str]) -> None:
        """Make these adapters the active ones (those the layer has; others are ignored here)."""
        self.commit(S.activate(self.state, [adapter_names] if isinstance(adapter_names, str) else adapter_names))

    def set_adapter_weight(self, adapter_name: str, weight: float) -> None:
        self.commit(S.set_weight(self.state, adapter_name, weight))

    def enable_adapters(self, enabled: bool) -> None:
        self.commit(S.enable(self.state, enabled))

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None,
              keep_original: bool = True, scale: float = 1.0, requantize: bool = False) -> None:
        """Fuse the active (or given) adapters into the base weight at scale · their weight.
        `unmerge` restores the weight bit for bit (keep_original=False: a fuse never undone, no copy).
        A quantized base refuses unless `requantize` (docs/adapters.md §Quantized base layers)."""
        commits.fuse([(self._describe(), self)], adapter_names, scale, safe=safe_merge, keep_original=keep_original,
                    requantize=requantize, disable=True)

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take every fused adapter out of the base weight (exactly as it was, if nothing else
        changed the weight since; otherwise only our part is taken out)."""
        commits.unfuse([(self._describe(), self)], disable=True)

    # ---------------------------------------------------------------------------- create adapters
    def update_layer(self, adapter_name: str, r: int, alpha: float, config: LoKrConfig) -> None:
        """Create (or recreate) `adapter_name` from a config: plan shapes, initialise, scale alpha / r."""
        check_adapter_name(adapter_name)
        plan = LF.plan_lokr(self.weight_shape, r, config.decompose_factor, config.decompose_both,
                            config.use_effective_conv2d, config.full_matrix)
        w = self.weight
        dtype = w.dtype if self.quantization is None else torch.float32  # beside a quantized base: fp32 factors
        tensors = {n: torch.empty(s, device=w.device, dtype=dtype) for n, s in plan.shapes().items()}
        _initialise(tensors, config.init_weights)
        self.set_adapter_tensors(adapter_name, tensors, LF.peft_scale(alpha, r), r=r, alpha=alpha,
                                 requires_grad=not config.inference_mode)
        self.rank_dropout[adapter_name] = config.rank_dropout
        self.module_dropout[adapter_name] = config.module_dropout
        self.rank_dropout_scale[adapter_name] = config.rank_dropout_scale

    def set_adapter_tensors(self, adapter_name: str, tensors: dict[str, Tensor], scale: float, *,
                            r: int | None = None, alpha: float | None = None, requires_grad: bool = False,
                            dora_scale: Tensor | None = None, rows: LF.Rows | None = None,
                            origin: str | None = None) -> None:
        """Put an adapter's tensors in place; shapes are read off the tensors and checked first.

        rows: the tensors are an adapter of a taller weight (rows.height, in) of which this layer holds
        `rows` (docs/adapters.md §Row pieces). A tensor that is already an nn.Parameter is registered as it
        is, so the pieces of one fused adapter share their factors (gradients accumulate into one set).
        """
        check_adapter_name(adapter_name)
        shape = self.weight_shape
        if rows is not None:
            if len(shape) != 2 or rows.out != shape[0]:
                raise ValueError(f"row pieces {rows.pieces} give {rows.out} rows; this layer's weight is {shape} "
                                 "(row pieces are for Linear layers)")
            shape = (rows.height, shape[1])
        plan = LF.plan_from_tensors(shape, tensors)
        if dora_scale is not None:
            LF.dora_on_output_axis(dora_scale, self.weight_shape)  # raises if it fits no axis
        S.check_strength(scale, f"scale of adapter {adapter_name!r}")
        new_state = S.add(self.state, adapter_name)  # raises if it is fused
        self._drop_tensors(adapter_name)
        for name, t in tensors.items():
            getattr(self, name)[adapter_name] = t if isinstance(t, nn.Parameter) else \
                nn.Parameter(t, requires_grad=requires_grad)
        if rows is not None:
            self.rows[adapter_name] = rows
        if origin is not None:
            self.origins[adapter_name] = origin
        if dora_scale is not None:
            self.dora_scale[adapter_name] = nn.Parameter(dora_scale, requires_grad=requires_grad)
        self.plans[adapter_name] = plan
        self.scaling[adapter_name] = float(scale)
        self.r[adapter_name] = r if r is not None else (plan.rank or 1)
        self.alpha[adapter_name] = alpha if alpha is not None else scale * self.r[adapter_name]
        self.rank_dropout.setdefault(adapter_name, 0.0)
        self.module_dropout.setdefault(adapter_name, 0.0)
        self.rank_dropout_scale.setdefault(adapter_name, False)
        self.commit(new_state)

    def _drop_tensors(self, adapter_name: str) -> None:
        for name in (*LF.FACTOR_NAMES, "dora_scale"):
            store = getattr(self, name)
            if adapter_name in store:
                del store[adapter_name]
        self.rows.pop(adapter_name, None)
        self.origins.pop(adapter_name, None)

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove the adapter; if it was fused, its delta leaves the weight (the others stay fused)."""
        if adapter_name not in self.plans:
            raise KeyError(f"adapter {adapter_name!r} not in this layer (has {self.adapter_names()})")
        self.commit(S.remove(self.state, adapter_name))
        self._drop_tensors(adapter_name)
        for d in (self.r, self.alpha, self.scaling, self.rank_dropout, self.module_dropout,
                  self.rank_dropout_scale, self.plans):
            d.pop(adapter_name, None)

    # ----------------------------------------------------------------------------- fused weights
    def _freeze(self, adapter_name: str) -> Frozen:
        dora = self.dora_scale[adapter_name].detach().clone() if adapter_name in self.dora_scale else None
        return Frozen({k: v.detach().clone() for k, v in self.factors(adapter_name).items()},
                      self.scaling[adapter_name], dora, self.rows.get(adapter_name))

    def check_commit(self, new: S.LayerState, requantize: bool = False, safe: bool = True, where: str = "") -> None:
        """Raise if `new` gives non-finite weights (with `safe`), and what commit(new) would raise about
        quantized weights; change nothing. `where`: the layer's name for the message."""
        old, pairs = self.state.physical(), new.physical()
        if old == pairs:
            return
        if self._on_quantized():
            self._qfused.check(self.base_layer, where or self._describe(), old, pairs, self._freeze, requantize, safe)
        elif safe:
            self._fused.check(self.weight, old, pairs, self._freeze)

    def _on_quantized(self) -> bool:
        """The base weight is quantized, or holds a requantized fuse of ours."""
        q = self._qfused
        return q.original is not None or q.written is not None or self.quantization is not None

    def _describe(self) -> str:
        base = self.base_layer
        return f"a {type(base).__name__} {'x'.join(map(str, self.weight_shape))}"

    def _apply(self, fn: Any, recurse: bool = True) -> LoKrLayer:  # type: ignore[override]
        """Module.to / .half / ...: a dtype change while fused unfuses, casts and fuses again, so the
        weight is what the cast base plus the same fuse gives (and unfusing restores the cast base)."""
        self._kept = self._tensor_list = None
        pairs = self.state.physical()
        w = self.weight
        probe = fn(torch.empty(0, dtype=w.dtype, device=w.device)) if pairs else None
        if probe is None or probe.dtype == w.dtype:
            super()._apply(fn, recurse)
            self._fused.follow(self.weight)
            self._qfused.follow(fn)
            self._sync_traced()
            return self
        saved, allowed = self.state, self._qfused.allowed
        self.commit(S.unfuse(saved))
        super()._apply(fn, recurse)
        self.commit(saved, requantize=allowed)
        return self

    def __setstate__(self, state: dict[str, Any]) -> None:
        """copy.deepcopy / unpickling: a copy keeps no reused weight (reuse.py) and is one of the layers
        that forget_traced() reaches."""
        super().__setstate__(state)
        self._kept = self._kept_t = None
        reuse.TRACED.layers.add(self)

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)  # copies into the tensors in place
        reuse.forget_traced()

    def train(self, mode: bool = True) -> LoKrLayer:
        self._kept = None
        reuse.forget_traced()
        self._frozen = self._adapters_frozen()
        return cast(LoKrLayer, super().train(mode))

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
        if torch.compiler.is_compiling():
            kept_t = self._kept_t
            if kept_t is not None and not args and not kwargs and not self.training and not torch.is_grad_enabled() \
                    and self.forward_mode != "bypass" and reuse.enabled() and \
                    "_hf_hook" not in self._modules["base_layer"].__dict__:
                # W + ΔW an earlier graph built (`_forward_traced`: only for a direct call with frozen
                # adapters, dropped on any change, reuse.py), read here, so that the graph that reuses it
                # guards on no more of the layer than this: not the base weight, the adapters' tensors or
                # the quantization check
                return self._run(x, kept_t, self._modules["base_layer"]._parameters.get("bias"))  # type: ignore[union-attr]
            return self._forward_traced(x, args, kwargs)
        kept = self._kept
        if kept is not None and not args and not kwargs and not torch.is_grad_enabled() and not self.training \
                and self._call_scale == 1.0 and self.forward_mode != "bypass" and reuse._budget != 0:
            # the denoising loop's path: nothing changed since W + ΔW was built (reuse.py). Kept lean: this
            # runs once per layer and denoising step, where the bare layer costs a few µs on a GPU's host.
            # kept[3]: the live tensors, when W + ΔW was built for the layer's own strengths (the call
            # scale 1), so that the state version stands for the strengths; a swapped .data shows in data_ptr
            live = kept[3]
            base = self._modules["base_layer"]
            if live is not None and kept[0][0] == self.version and "_hf_hook" not in base.__dict__ and \
                    kept[0][2] == tuple([(t._version, t.data_ptr()) for t in live]):
                return self._run(x, kept[1], base._parameters.get("bias"))  # type: ignore[union-attr]
        applied = self._applied
        if self.training:
            self._check_fused_frozen()
            applied = tuple(p for p in applied if not self._module_dropped(p[0]))
        if not applied:  # fused, disabled or nothing active
            return self._base(x, args, kwargs)
        if self._call_scale != 1.0:
            applied = tuple((a, s * self._call_scale) for a, s in applied)
        # accelerate's hook, or a quantized weight (the base layer dequantizes it itself): never W + ΔW in one op
        direct = not args and not kwargs and "_hf_hook" not in self.base_layer.__dict__ and \
            quantized.quantization_of(self.base_layer) is None
        if direct and not self.training and self.forward_mode != "bypass" and reuse.enabled() and \
                not torch.is_grad_enabled():
            w_eff = self._reused_weight(applied)
            if w_eff is not None:
                return self._run(x, w_eff, self.bias)
        return self._forward_applied(x, applied, direct, args, kwargs)

    def _forward_traced(self, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        """forward under torch.compile: the same paths without reuse, with each adapter's scale and
        strength and the call scale read from tensors (`_traced`), so that changing them, or the
        factors' values, recompiles nothing (docs/performance.md §torch.compile)."""
        names = tuple(self._traced)
        if self.training:
            self._check_fused_frozen()
            names = tuple(a for a in names if not self._module_dropped(a))
        if not names:
            return self._base(x, args, kwargs)
        direct = not args and not kwargs and "_hf_hook" not in self.base_layer.__dict__ and \
            quantized.quantization_of(self.base_layer) is None
        if direct and not self.training and not torch.is_grad_enabled() and self._frozen and \
                self.forward_mode != "bypass" and reuse.enabled():
            # frozen adapters: W + ΔW built once by the graph, then reused by the next one (forward; reuse.py)
            kept = self._kept_t = self._adapted_weight(self._traced_strengths(names))
            reuse.TRACED.holding = True
            return self._run(x, kept, self.bias)
        return self._forward_applied(x, self._traced_strengths(names), direct, args, kwargs)

    def _traced_strengths(self, names: tuple[str, ...]) -> Strengths:
        return tuple((a, self._traced[a][1] * self._call_t) for a in names)

    def _base(self, x: Tensor, args: tuple, kwargs: dict) -> Tensor:
        """The base op alone, without a second module call where nothing else needs one."""
        base = cast(nn.Module, self._modules["base_layer"])
        if args or kwargs or "_hf_hook" in base.__dict__ or "forward" in base.__dict__ or \
                base._forward_hooks or base._forward_pre_hooks or type(base) not in _PLAIN:
            return cast(Tensor, base(x, *args, **kwargs))
        w, b = cast(Tensor, base._parameters["weight"]), cast("Tensor | None", base._parameters.get("bias"))
        if w.dtype in quantized.FP8:  # fp8 storage with nothing to cast it up: cast up to x's dtype for the op
            w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
        return self._run(x, w, b)

    def _forward_applied(self, x: Tensor, applied: Strengths, direct: bool, args: tuple, kwargs: dict) -> Tensor:
        """The applied adapters at these strengths: each merged into W or applied to x (bypass)."""
        if any(a in self.dora_scale for a, _ in applied):
            return self._forward_in_order(x, applied, direct, args, kwargs)
        tokens = self._tokens(x)
        in_merge: list[tuple[str, float | Tensor]] = []
        in_bypass: list[tuple[str, float | Tensor]] = []
        for a, s in applied:
            (in_bypass if self._choose_bypass(a, x, tokens, direct) else in_merge).append((a, s))
        w = self.weight if direct or self.quantization is None else x  # quantized: ΔW in x's dtype (dtype only)
        if in_merge and direct and not any(self._rank_mask_on(a) for a, _ in in_merge):
            result = self._run_merged(x, tuple(in_merge))  # W + Σ ΔW, then one op
        elif in_merge:
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

    def _run_merged(self, x: Tensor, applied: Strengths) -> Tensor:
        """The base op with W + the applied adapters' changes (no DoRA, no rank dropout)."""
        return self._run(x, self._adapted_weight(applied), self.bias)

    def _scale_of(self, adapter_name: str, strength: float | Tensor) -> float | Tensor:
        """scale · strength: floats in eager, tensors when traced (`_forward_traced`)."""
        if isinstance(strength, Tensor):
            return self._traced[adapter_name][0] * strength
        return self.scaling[adapter_name] * strength

    def _reused_weight(self, applied: S.Pairs) -> Tensor | None:
        """W + ΔW for these strengths, kept from an earlier call while its key holds (reuse.py):
        the state version, the strengths, and each tensor's in-place version and storage. The kept
        entry holds the tensors it was built from, so no storage it names can be freed and reused."""
        tensors = self._tensors_of(applied)
        try:
            key = (self.version, applied, tuple([(t._version, t.data_ptr()) for t in tensors]))
        except RuntimeError:  # an inference-mode tensor: no version counter, nothing to key on
            key = None
        kept = self._kept
        if kept is not None and kept[0] == key:
            return kept[1]
        self._kept = None
        w_eff = self._adapted_weight(applied)
        if key is not None and reuse.admit(w_eff):
            live = tensors if applied is self._applied else None
            self._kept = (key, w_eff, [t.detach() for t in tensors], live)
        return w_eff

    def _tensors_of(self, applied: S.Pairs) -> list[Tensor]:
        """The base weight and the applied adapters' tensors (looked up once per state version)."""
        names = tuple(a for a, _ in applied)
        cached = self._tensor_list
        if cached is not None and cached[0] == (self.version, names):
            return cached[1]
        tensors = [self.weight, *(t for a in names for t in self.adapter_tensors(a).values())]
        self._tensor_list = ((self.version, names), tensors)
        return tensors

    def _forward_in_order(self, x: Tensor, applied: Strengths, direct: bool, args: tuple, kwargs: dict) -> Tensor:
        """With a DoRA adapter active: build W' adapter by adapter, in order (as fuse does). Over a
        quantized base, from its dequantized weight, W' − W beside the base op."""
        w = self.weight if self.quantization is None else quantized.dequantize(self.base_layer, dtype=x.dtype)
        w_eff = self._adapted_weight(applied, w)
        if direct:
            return self._run(x, w_eff, self.bias)
        return self._base(x, args, kwargs) + self._run(x, w_eff - w, None)

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
                                 rows=self.rows.get(a))
        return w_eff

    def _delta(self, adapter_name: str, strength: float | Tensor, w: Tensor) -> Tensor:
        """What one adapter at `strength` adds to the weight `w`: strength·scale·W1⊗W2, or for DoRA
        the change W'' − W (DoRA normalises the weight it is given), in the factors' dtype for a
        plain adapter and in w's for DoRA."""
        f = self.factors(adapter_name)
        scale = self._traced[adapter_name][0] if isinstance(strength, Tensor) else self.scaling[adapter_name]
        rows = self.rows.get(adapter_name)
        if adapter_name not in self.dora_scale:
            return LF.delta_weight(f, self.weight_shape, scale * strength, rows)
        return LF.adapt_weight(w, f, scale, self.dora_scale[adapter_name], strength, rows=rows) - w

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

    def _rank_mask_on(self, adapter_name: str) -> bool:
        return self.training and self.rank_dropout[adapter_name] > 0

    def _module_dropped(self, adapter_name: str) -> bool:
        p = self.module_dropout[adapter_name]
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

    def _choose_bypass(self, adapter_name: str, x: Tensor, tokens: int, direct: bool) -> bool:
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
        if not needs_grad and torch.compiler.is_compiling():
            return False  # a compiled graph builds W + ΔW in one fused pointwise kernel: cheaper than 3-4 GEMMs
        device = self.weight.device
        if paths.path_choice(device.type) == "measure" and not self._rank_mask_on(adapter_name) and \
                paths.can_measure(device):
            key = (type(self), self.weight_shape, self._conv_args(), self.plans[adapter_name],
                   self.rows.get(adapter_name), tuple(x.shape),
                   x.dtype, self.weight.dtype, device, torch.is_autocast_enabled(device.type),
                   torch.get_autocast_dtype(device.type), needs_grad, x.requires_grad)
            return paths.measured(key, lambda: paths.measure_layer(self, x, adapter_name, needs_grad))
        return LF.prefer_bypass(LF.restricted_plan(self.plans[adapter_name], self.rows.get(adapter_name)), tokens,
                                needs_grad)

    def _with_bypass(self, x: Tensor, adapter_name: str, strength: float | Tensor) -> Tensor | None:
        """The base op plus one adapter applied to x as a single node, where the layer has one
        (Linear in training); None: run them apart."""
        return None

    def _bypass(self, x: Tensor, adapter_name: str, strength: float | Tensor) -> Tensor:
        f = {n: t.to(x.dtype) for n, t in self.factors(adapter_name).items()}
        y = LF.apply_lokr(x, f, self.plans[adapter_name], self._scale_of(adapter_name, strength), self._conv_args(),
                          self.rows.get(adapter_name))
        mask = self._rank_mask(adapter_name, y)
        if mask is not None:
            shape = [1] * y.dim()
            shape[-1 if self._conv_args() is None else 1] = -1
            y = y * mask.view(shape)
        return y

    def extra_repr(self) -> str:
        st = self.state
        return f"adapters={list(st.adapters)}, active={list(st.active)}, fused={list(st.fused)}, enabled={st.enabled}"


class Linear(LoKrLayer):
    """LoKr around nn.Linear. x: (..., in) -> (..., out)."""

    def _tokens(self, x: Tensor) -> int:
        return x.numel() // max(x.shape[-1], 1)

    # the base op with a given weight: F.linear itself, no Python frame around it (the reuse fast path
    # runs it once per layer and denoising step; a wrapping method cost about 1.4 µs of a 15 µs call)
    _run = staticmethod(nn.functional.linear)  # type: ignore[assignment]

    def _run_merged(self, x: Tensor, applied: Strengths) -> Tensor:
        """With a gradient wanted and one adapter: one autograd Function (functional.apply_merged_linear:
        its backward forms no weight-sized gradient unless W itself trains); otherwise W + ΔW, then the op."""
        w, b = self.weight, self.bias
        if len(applied) == 1 and torch.is_grad_enabled() and w.is_contiguous() and not _cpu_low_precision(w):
            (a, s), = applied
            f = self.factors(a)
            if (x.requires_grad or w.requires_grad or any(t.requires_grad for t in f.values()) or
                    (b is not None and b.requires_grad)) and self._aligned(a):
                f = {n: t.to(w.dtype) for n, t in f.items()}
                return LF.apply_merged_linear(x, w, b, f, self._scale_of(a, s), self.rows.get(a))
        return super()._run_merged(x, applied)

    def _aligned(self, adapter_name: str) -> bool:
        """No row pieces, or pieces on W1 block edges: the training Functions run on W1's kept rows
        (otherwise the plain ops and a slice)."""
        rows = self.rows.get(adapter_name)
        return rows is None or LF.rows_aligned(rows, self.plans[adapter_name].out_k)

    def _with_bypass(self, x: Tensor, adapter_name: str, strength: float | Tensor) -> Tensor | None:
        """With a gradient wanted: F.linear and the factors as one autograd Function
        (functional.apply_bypass_linear: no full-size sum of outputs, nor of input gradients)."""
        if not torch.is_grad_enabled() or self._rank_mask_on(adapter_name) or not self._aligned(adapter_name):
            return None
        w, b = self.weight, self.bias
        f = self.factors(adapter_name)
        if not (x.requires_grad or w.requires_grad or any(t.requires_grad for t in f.values()) or
                (b is not None and b.requires_grad)):
            return None
        f = {n: t.to(x.dtype) for n, t in f.items()}
        return LF.apply_bypass_linear(x, w, b, f, self._scale_of(adapter_name, strength), self.rows.get(adapter_name))


def _cpu_low_precision(w: Tensor) -> bool:
    """bf16 / fp16 on the CPU (the weight's dtype or autocast's): there the Function's small batched
    matmuls are slower than plain autograd's one weight-sized GEMM (1.2-1.5x on a 2-core CPU at
    SD1.5 widths), while in fp32 and on GPUs it is as fast or faster with fewer ops."""
    if w.device.type != "cpu":
        return False
    low = (torch.bfloat16, torch.float16)
    return w.dtype in low or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in low)


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
