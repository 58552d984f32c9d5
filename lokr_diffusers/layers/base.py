"""A LoKr layer's storage and transitions: its adapters (tensors and records), its `state.LayerState`,
and `commit`, which makes the base weight follow the state. Forward is in forward.py.

    W_phys = fold(W, fused)       the base weight with the fused adapters in it (docs/adapters.md)
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, Literal, cast

import torch
from torch import Tensor, nn

from .. import commits, quantized, reuse, sharding
from .. import functional as LF
from .. import state as S
from ..config import LoKrConfig
from ..fusing import Frozen
from .adapter import Adapter, View, check_adapter_name, initialise
from .base_weight import BaseStrategy, pick

logger = logging.getLogger(__name__)

ForwardMode = Literal["auto", "merged", "bypass"]  # forward.py


class LayerCore(nn.Module):
    """What every LoKr layer holds around its `base_layer`, and every change of its adapter state.

    The adapter state (active adapters, weights, enabled, fused) is one `state.LayerState`; every
    operation below is a transition of it, and `commit` makes the base weight follow it (through the
    layer's base-weight strategy, base_weight.py).
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str | None = None, config: LoKrConfig | None = None,
                 r: int | None = None, alpha: float | None = None) -> None:
        super().__init__()
        self.base_layer = base_layer
        for name in LF.FACTOR_NAMES:
            setattr(self, name, nn.ParameterDict())
        self.dora_scale = nn.ParameterDict()  # DoRA magnitudes, (out, 1, ...) or (1, in, ...)
        self.adapters: dict[str, Adapter] = {}  # one record per adapter, in load order
        self.forward_mode: ForwardMode = "auto"  # forward.py
        self.state = S.LayerState()
        self.version = 0  # bumped by every commit
        self.base_strategy: BaseStrategy = pick(None, base_layer, ())
        self.kept = reuse.Kept()  # W + ΔW reused across calls (reuse.py)
        self._applied: S.Pairs = ()  # state.applied(), cached for forward
        self._call_scale = 1.0  # diffusers' cross_attention_kwargs["scale"] during one call (scaling.py)
        # The same numbers as 0-dim tensors on the weight's device, for torch.compile: a traced forward
        # reads (scale, weight) per applied adapter and the call scale from tensors, so changing them
        # recompiles nothing (a Python float would be a guarded constant). Rebuilt on every commit.
        # traced forwards read 0-d tensors: per applied adapter (scale, strength), the call scale, and their
        # product per adapter (`_total`: a plain adapter's graph takes it alone, one input per adapter and layer)
        self._traced: dict[str, tuple[Tensor, Tensor]] = {}
        self._call_t = torch.ones(())
        self._total: dict[str, Tensor] = {}
        self._frozen = True  # _adapters_frozen(), kept for traced code
        # forward's path choice per (adapter, input, gradients), made once and kept until the next
        # commit (forward.py `_choose_bypass`): the cost model is not asked again on every call
        self._choices: dict[tuple[Any, ...], bool] = {}
        if adapter_name is not None and config is not None:
            self.update_layer(adapter_name, config.r if r is None else r, config.alpha if alpha is None else alpha,
                              config)
            self.set_adapter([adapter_name])

    # ------------------------------------------------------------------------------------ reading
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
        return self.base_strategy.error

    def base_weight(self) -> Tensor:
        """The base weight without this layer's fused adapters (the W the adapters are relative to),
        detached, on the weight's device; a quantized weight dequantized."""
        with sharding.gathered(self.base_layer, write_back=False) as base:  # FSDP2: the whole weight (sharding.py)
            return self._strategy().without_fused(base, self.state.physical())

    @property
    def call_scale(self) -> float:
        """diffusers' per-call LoRA scale in effect now (1.0 outside a pipeline call; scaling.py)."""
        return self._call_scale

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

    # PEFT's per-adapter dicts, as read-only views of the records (adapter.py). `scaling`: the producer's scale
    # (alpha / r for a fresh adapter); `rows`: the adapters that are row pieces (docs/adapters.md §Row pieces)
    r: View[int] = View("r")
    alpha: View[float] = View("alpha")
    scaling: View[float] = View("scale")
    plans: View[LF.LoKrPlan] = View("plan")
    rows: View[LF.Rows] = View("rows")
    origins: View[str] = View("origin")
    rank_dropout: View[float] = View("rank_dropout")
    module_dropout: View[float] = View("module_dropout")

    def adapter_names(self) -> list[str]:
        return list(self.adapters)

    def factors(self, adapter_name: str) -> dict[str, Tensor]:
        """The adapter's stored tensors by name ("lokr_w1", ...). Read from the ParameterDicts' own
        `_parameters` (where ParameterDict keeps them, keyed by adapter name): forward asks on every
        call, and seven `getattr`s through Module.__getattr__ plus `in` cost several µs a call."""
        mods = self._modules
        out: dict[str, Tensor] = {}
        for n in LF.FACTOR_NAMES:
            t = mods[n]._parameters.get(adapter_name)  # type: ignore[union-attr]
            if t is not None:
                out[n] = t
        return out

    def adapter_tensors(self, adapter_name: str) -> dict[str, Tensor]:
        """Factors plus `dora_scale` when the adapter has one (what a file stores)."""
        out = self.factors(adapter_name)
        if adapter_name in self.dora_scale:
            out["dora_scale"] = self.dora_scale[adapter_name]
        return out

    def effective_scale(self, adapter_name: str) -> float:
        return self.adapters[adapter_name].scale * self.state.weight(adapter_name)

    # ---------------------------------------------------------------------------------- transitions
    def commit(self, new: S.LayerState, keep_original: bool = True, requantize: bool = False) -> None:
        """Take `new` as the layer's state; the base weight is rebuilt when the fused part changes.
        A quantized base weight is never written: fusing into it raises unless `requantize`
        (base_weight.py). Non-finite weights are checked before, by the fuse path (commits.py)."""
        old_phys, new_phys = self.state.physical(), new.physical()
        strategy = self._strategy()
        if old_phys != new_phys:  # under FSDP2: fold into the gathered weight, keep this process's rows
            with sharding.gathered(self.base_layer, write_back=True) as base:
                strategy.move(base, self._describe(), old_phys, new_phys, self._freeze, keep_original, requantize)
        strategy.settle(bool(new.fused))
        self.state = new
        self._applied = new.applied()
        self.version += 1
        self._choices = {}
        self.kept.drop()
        self._sync_traced()

    def check_commit(self, new: S.LayerState, requantize: bool = False, safe: bool = True, where: str = "") -> None:
        """Raise if `new` gives non-finite weights (with `safe`), and what commit(new) would raise about
        quantized weights; change nothing. `where`: the layer's name for the message."""
        old, pairs = self.state.physical(), new.physical()
        if old != pairs:
            with sharding.gathered(self.base_layer, write_back=False) as base:
                self._strategy().check(base, where or self._describe(), old, pairs, self._freeze, requantize, safe)

    def _strategy(self) -> BaseStrategy:
        self.base_strategy = pick(self.base_strategy, self.base_layer, self.state.physical())
        return self.base_strategy

    def forget_fuse(self) -> None:
        """Let go of what undoes the fuse (the weight without our adapters): the fused adapters stay in the
        weight for good (a model unloaded with its fuses kept)."""
        self.base_strategy = pick(None, self.base_layer, ())

    def _sync_traced(self) -> None:
        """`_traced` for the applied adapters, in order; new tensors (never in-place: a tensor made
        under inference_mode could not be updated or saved for backward outside it)."""
        reuse.forget_traced()
        reuse.watch_optimizers()
        self._frozen = self._adapters_frozen()
        w = self.weight  # on meta too: 0-d tensors, and a later .to_empty() / .to() moves them with the weight
        with torch.inference_mode(False), torch.no_grad():
            self._traced = {a: (torch.full((), self.adapters[a].scale, device=w.device),
                                torch.full((), s, device=w.device)) for a, s in self._applied}
            self._call_t = torch.full((), self._call_scale, device=w.device)
            self._make_total()

    def _make_total(self) -> None:
        """`_total`: in eager code one tensor per adapter from the floats (the call-scale hook runs this twice per
        pipeline call); inside a compiled call, where that hook is traced, from the tensors (a float read there
        would be guarded on, and set_adapters would recompile)."""
        if torch.compiler.is_compiling():
            self._total = {a: scale * strength * self._call_t for a, (scale, strength) in self._traced.items()}
            return
        device = self._call_t.device
        self._total = {a: torch.full((), self.adapters[a].scale * s * self._call_scale, device=device)
                       for a, s in self._applied}

    def _adapters_frozen(self) -> bool:
        """No applied adapter's tensor requires grad: a compiled graph may keep W + ΔW (reuse.py). Read
        as a plain bool in traced code (one cheap guard, not one per factor); refreshed on every
        commit and on train() / eval()."""
        return not any(t.requires_grad for a, _ in self._applied for t in self.adapter_tensors(a).values())

    def set_call_scale(self, scale: float) -> None:
        """diffusers' per-call LoRA scale (scaling.call_scale), as a float and for traced forwards."""
        self._call_scale = scale
        self.kept.traced = None  # every layer of the model gets a new call scale: no partial drop
        with torch.inference_mode(False), torch.no_grad():
            self._call_t = torch.full((), scale, device=self.weight.device)
            self._make_total()

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
        initialise(tensors, config.init_weights)
        self.set_adapter_tensors(adapter_name, tensors, LF.peft_scale(alpha, r), r=r, alpha=alpha,
                                 requires_grad=not config.inference_mode)
        rec = self.adapters[adapter_name]
        rec.rank_dropout, rec.module_dropout = config.rank_dropout, config.module_dropout
        rec.rank_dropout_scale = config.rank_dropout_scale

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
        old = self.adapters.get(adapter_name)
        self._drop_tensors(adapter_name)
        for name, t in tensors.items():
            getattr(self, name)[adapter_name] = t if isinstance(t, nn.Parameter) else \
                nn.Parameter(t, requires_grad=requires_grad)
        if dora_scale is not None:
            self.dora_scale[adapter_name] = nn.Parameter(dora_scale, requires_grad=requires_grad)
        rank = r if r is not None else (plan.rank or 1)
        self.adapters[adapter_name] = Adapter(plan, float(scale), rank, alpha if alpha is not None else scale * rank,
                                              rows, origin)
        if old is not None:  # a recreated adapter keeps its dropout settings
            rec = self.adapters[adapter_name]
            rec.rank_dropout, rec.module_dropout = old.rank_dropout, old.module_dropout
            rec.rank_dropout_scale = old.rank_dropout_scale
        self.commit(new_state)

    def set_scale(self, adapter_name: str, scale: float, alpha: float | None = None) -> None:
        """A new producer's scale for the adapter (a hotswap); alpha follows (scale · r unless given)."""
        S.check_strength(scale, f"scale of adapter {adapter_name!r}")
        rec = self.adapters[adapter_name]
        rec.scale = float(scale)
        rec.alpha = alpha if alpha is not None else scale * rec.r
        self.commit(self.state)  # same state: bumps the version, so anything cached is rebuilt

    def _drop_tensors(self, adapter_name: str) -> None:
        for name in (*LF.FACTOR_NAMES, "dora_scale"):
            store = getattr(self, name)
            if adapter_name in store:
                del store[adapter_name]

    def delete_adapter(self, adapter_name: str) -> None:
        """Remove the adapter; if it was fused, its delta leaves the weight (the others stay fused)."""
        if adapter_name not in self.adapters:
            raise KeyError(f"adapter {adapter_name!r} not in this layer (has {self.adapter_names()})")
        self.commit(S.remove(self.state, adapter_name))
        self._drop_tensors(adapter_name)
        del self.adapters[adapter_name]

    # ----------------------------------------------------------------------------- fused weights
    def _freeze(self, adapter_name: str) -> Frozen:
        """The adapter's tensors as they are now (whole: gathered from FSDP2's shards, sharding.full)."""
        dora = sharding.full(self.dora_scale[adapter_name]).clone() if adapter_name in self.dora_scale else None
        rec = self.adapters[adapter_name]
        return Frozen({k: sharding.full(v).clone() for k, v in self.factors(adapter_name).items()}, rec.scale, dora,
                      rec.rows)

    def _describe(self) -> str:
        base = self.base_layer
        return f"a {type(base).__name__} {'x'.join(map(str, self.weight_shape))}"

    def _apply(self, fn: Any, recurse: bool = True) -> LayerCore:  # type: ignore[override]
        """Module.to / .half / ...: a dtype change while fused unfuses, casts and fuses again, so the
        weight is what the cast base plus the same fuse gives (and unfusing restores the cast base)."""
        self.kept.drop()
        self._choices = {}
        pairs = self.state.physical()
        w = self.weight
        probe = fn(torch.empty(0, dtype=w.dtype, device=w.device)) if pairs else None
        if probe is None or probe.dtype == w.dtype:
            super()._apply(fn, recurse)
            self.base_strategy.follow(fn, self.base_layer)
            self._sync_traced()
            return self
        saved, allowed = self.state, self.base_strategy.allowed
        self.commit(S.unfuse(saved))
        super()._apply(fn, recurse)
        self.commit(saved, requantize=allowed)
        return self

    def __setstate__(self, state: dict[str, Any]) -> None:
        """copy.deepcopy / unpickling: a copy keeps no reused weight (reuse.py), and has a `Kept` of its
        own that forget_traced() reaches."""
        super().__setstate__(state)
        self.kept = reuse.Kept()

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(*args, **kwargs)  # copies into the tensors in place
        reuse.forget_traced()

    def train(self, mode: bool = True) -> LayerCore:
        self.kept.entry = None
        reuse.forget_traced()
        self._frozen = self._adapters_frozen()
        return cast(LayerCore, super().train(mode))

    def extra_repr(self) -> str:
        st = self.state
        return f"adapters={list(st.adapters)}, active={list(st.active)}, fused={list(st.fused)}, enabled={st.enabled}"
