"""LoKr around nn.Linear, with the training Functions that spare a weight-sized gradient."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import functional as LF
from .forward import LoKrLayer, Strengths


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
            if _wants_grad(x, w, b, f) and self._aligned(a) and not self._plain_pays(a, x):
                f = {n: t.to(w.dtype) for n, t in f.items()}
                return LF.apply_merged_linear(x, w, b, f, self._scale_of(a, s), self.adapters[a].rows)
        return super()._run_merged(x, applied)

    def _plain_pays(self, adapter_name: str, x: Tensor) -> bool:
        """W + ΔW by plain autograd (one addcmul, F.linear: autograd forms the full dL/d(W + ΔW), a GEMM, and
        reduces it onto the factors) instead of the Function: for a small weight with full factors
        (functional.small_full_linear), whose Kronecker blocks are too small for the Function's per-token batched
        GEMMs to pay. Compiled: always there (inductor fuses each reduction into one kernel: 5 kernels a step
        against the Function's 8); eager: from one token per SMALL_TOKENS_PER weight elements (below, the two are
        within 10 % and the Function runs fewer ops). Measured on a 2-core CPU, fp32, training steps of 32- to
        128-wide layers (docs/performance.md §Op counts)."""
        plan = self.adapters[adapter_name].plan
        if not LF.small_full_linear(plan):
            return False
        return torch.compiler.is_compiling() or \
            self._tokens(x) * LF.SMALL_TOKENS_PER >= plan.out_l * plan.out_k * plan.in_m * plan.in_n

    def _aligned(self, adapter_name: str) -> bool:
        """No row pieces, or pieces on W1 block edges: the training Functions run on W1's kept rows
        (otherwise the plain ops and a slice)."""
        rec = self.adapters[adapter_name]
        return rec.rows is None or LF.rows_aligned(rec.rows, rec.plan.out_k)

    def _with_bypass(self, x: Tensor, adapter_name: str, strength: float | Tensor) -> Tensor | None:
        """With a gradient wanted: F.linear and the factors as one autograd Function
        (functional.apply_bypass_linear: no full-size sum of outputs, nor of input gradients)."""
        if not torch.is_grad_enabled() or self._rank_mask_on(adapter_name) or not self._aligned(adapter_name):
            return None
        w, b = self.weight, self.bias
        f = self.factors(adapter_name)
        if not _wants_grad(x, w, b, f):
            return None
        f = {n: t.to(x.dtype) for n, t in f.items()}
        return LF.apply_bypass_linear(x, w, b, f, self._scale_of(adapter_name, strength),
                                      self.adapters[adapter_name].rows)


def _wants_grad(x: Tensor, w: Tensor, b: Tensor | None, factors: dict[str, Tensor]) -> bool:
    return x.requires_grad or w.requires_grad or any(t.requires_grad for t in factors.values()) or \
        (b is not None and b.requires_grad)


def _cpu_low_precision(w: Tensor) -> bool:
    """bf16 / fp16 on the CPU (the weight's dtype or autocast's): there the Function's small batched
    matmuls are slower than plain autograd's one weight-sized GEMM (1.2-1.5x on a 2-core CPU at
    SD1.5 widths), while in fp32 and on GPUs it is as fast or faster with fewer ops."""
    if w.device.type != "cpu":
        return False
    low = (torch.bfloat16, torch.float16)
    return w.dtype in low or (torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") in low)
