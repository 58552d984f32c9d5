"""The autograd Functions of a Linear's two paths in training, each one node with lean saved tensors:
`_LinearBypass` (ΔW·x by the vec trick, with or without the base op: `apply_bypass_linear`, and
`apply_lokr` in `bypass.py` through `linear_bypass_fn`) and `_LinearMerged` (one linear with
W + ΔW, the factors' gradients by the vec trick: `apply_merged_linear`); and a conv's bypass with its
base op, `_ConvBypass` (`apply_bypass_conv`). Autocast and a traced (tensor) scale are handled before
the Function runs."""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .plan import Factors, LoKrPlan
from .rows import Rows, restrict_rows, row_blocks, w2_rows


def linear_bypass_fn(x: Tensor, f: Factors, scale: float | Tensor) -> Tensor:
    """`bypass._apply_lokr_linear` through `_LinearBypass` (for training: fewer ops, lean saved tensors;
    autocast as `_apply_cast` says)."""
    if isinstance(scale, Tensor):  # traced (torch.compile): the Function's scale must be a number
        return linear_bypass_fn(x, f, 1.0) * scale
    return _apply_cast(_LinearBypass, [x, None, None, *(f.get(n) for n in _LINEAR_NAMES)], scale)


def apply_bypass_linear(x: Tensor, weight: Tensor, bias: Tensor | None, f: Factors,
                        scale: float | Tensor, rows: Rows | None = None) -> Tensor:
    """F.linear(x, W, bias) + scale · ΔW x for training, as one autograd Function (`_LinearBypass`
    with the base op inside): the adapter's output is accumulated into the base output's buffer and
    its input gradient into the base's, so neither the forward nor the backward adds two full-size
    tensors. A tensor scale (torch.compile) multiplies W1's small factor first, as in
    `apply_merged_linear`. `rows` must lie on W1 block edges (`rows_aligned`): W1 is cut to them."""
    f = _aligned(f, rows)
    w1, w1_a, scale = _fold_scale(f, scale)
    return _apply_cast(_LinearBypass, [x, weight, bias, w1, w1_a, f.get("lokr_w1_b"), f.get("lokr_w2"),
                                       f.get("lokr_w2_a"), f.get("lokr_w2_b")], scale)


def _aligned(f: Factors, rows: Rows | None) -> Factors:
    """The factors cut to `rows`, which must lie on W1 block edges (ValueError otherwise)."""
    if rows is None:
        return f
    rb = row_blocks(rows, w2_rows(f))
    if rb.keep is not None:
        raise ValueError(f"row pieces {rows.pieces} do not lie on W1 block edges (out_k {w2_rows(f)}); "
                         "use apply_lokr(..., rows=) and the base op apart")
    return restrict_rows(f, rb.blocks)


def _fold_scale(f: Factors, scale: float | Tensor) -> tuple[Tensor | None, Tensor | None, float]:
    """(W1 or None, w1_a or None, the Function's scale): a tensor scale (its value must not be a
    number the graph guards on) multiplies W1's small factor, and the Function's scale is then 1."""
    w1, w1_a = f.get("lokr_w1"), f.get("lokr_w1_a")
    if not isinstance(scale, Tensor):
        return w1, w1_a, scale
    if w1 is not None:
        return w1 * scale.to(w1.dtype), w1_a, 1.0
    return w1, cast(Tensor, w1_a) * scale.to(cast(Tensor, w1_a).dtype), 1.0


def _apply_cast(function: type[torch.autograd.Function], tensors: list[Tensor | None], *extra: Any) -> Tensor:
    """function.apply(*tensors, *extra) (extra: the scale, ...); under autocast the tensors are cast
    first, as autocast would cast them for each matmul (floating tensors but float64), and the
    Function runs with autocast off, so its backward sees one dtype; the casts are recorded outside,
    so gradients come back in each tensor's own dtype."""
    device_type = cast(Tensor, tensors[0]).device.type
    if not torch.is_autocast_enabled(device_type):
        return cast(Tensor, function.apply(*tensors, *extra))
    dt = torch.get_autocast_dtype(device_type)
    tensors = [t.to(dt) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t
               for t in tensors]
    with torch.autocast(device_type, enabled=False):
        return cast(Tensor, function.apply(*tensors, *extra))


def _halves(g: Tensor, a: Tensor | None, b: Tensor | None, need_a: bool, need_b: bool
            ) -> tuple[Tensor | None, Tensor | None]:
    """The gradients of a (m, r) and b (r, n) from g = dL/d(a @ b) (m, n), those wanted only."""
    return (g @ cast(Tensor, b).t() if need_a else None, cast(Tensor, a).t() @ g if need_b else None)


_LINEAR_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


class _LinearBypass(torch.autograd.Function):
    """y = [x Wᵀ + b] + scale · flatten(W1 · X · W2ᵀ) per token, X (in_m, in_n) the token's input, as
    one node; the bracket only when W is given (`apply_bypass_linear`), else the adapter alone.

    Forward: A = X W2ᵀ (X w2_bᵀ for a low-rank W2) is one tall GEMM over all (token, input group)
    rows; W1 mixes the groups by one bmm against W1 expanded over the tokens (a stride-0 view, no
    copy); a low-rank W2 ends with a tall GEMM by w2_a. With W, the last product accumulates into
    the base output (baddbmm / addmm_), and backward the adapter's dx into the base's dx = g W.
    The scale rides on a tiny tensor, the W2 factor on the output side of A's GEMM (w2, or w2_a),
    so every other gradient carries it for free and that factor's own gradient takes it back
    through addmm's alpha. Saved: only what the wanted gradients read (`needs_input_grad`), never
    a weight-sized tensor but W itself when x wants a gradient. Backward is once-differentiable.
    Inputs are numbered as `_LinearMerged`'s: x, W, b, w1, w1_a, w1_b, w2, w2_a, w2_b.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, w1: Tensor | None,
                w1_a: Tensor | None, w1_b: Tensor | None, w2: Tensor | None, w2_a: Tensor | None,
                w2_b: Tensor | None, scale: float) -> Tensor:
        need = ctx.needs_input_grad
        lowrank1, lowrank2 = w1 is None, w2 is None
        w1f = cast(Tensor, w1_a) @ cast(Tensor, w1_b) if lowrank1 else cast(Tensor, w1)  # (out_l, in_m)
        out_l, in_m = w1f.shape
        first = cast(Tensor, w2_b if lowrank2 else w2)  # (c, in_n), c = r (low-rank W2) or out_k
        if not lowrank2 and scale != 1.0:
            first = first * scale
        c, in_n = first.shape
        tokens = x.numel() // (in_m * in_n)
        x2 = x.reshape(tokens * in_m, in_n)  # one row per (token, input group)
        a3 = (x2 @ first.t()).view(tokens, in_m, c)
        w1e = w1f.expand(tokens, out_l, in_m)
        base = None
        if weight is not None:  # F.linear's own kernel on the flattened rows: (T, out)
            xf = x2.view(tokens, in_m * in_n)
            base = xf @ weight.t() if bias is None else torch.addmm(bias, xf, weight.t())
        last = None
        if lowrank2:
            b3 = torch.bmm(w1e, a3)  # (T, out_l, r)
            last = cast(Tensor, w2_a) if scale == 1.0 else cast(Tensor, w2_a) * scale  # (out_k, r)
            b2 = b3.view(tokens * out_l, c)
            # (T·out_l, out_k): the rows of (T, out) in the same order, so the base buffer takes it
            y = b2 @ last.t() if base is None else base.view(tokens * out_l, -1).addmm_(b2, last.t())
        else:
            b2 = None
            y = torch.bmm(w1e, a3) if base is None else base.view(tokens, out_l, c).baddbmm_(w1e, a3)
        grad_w1 = need[3] or need[4] or need[5]
        grad_w2 = need[8] if lowrank2 else need[6]  # w2_b or w2: the factor next to X
        grad_a = need[0] or grad_w2  # these need dL/dA
        rescale = scale != 1.0 and (need[7] if lowrank2 else need[6])  # addmm's shape argument
        ctx.dims = (tokens, out_l, in_m, c, c if last is None else last.shape[0])  # ..., out_k
        ctx.lowrank, ctx.scale, ctx.x_shape = (lowrank1, lowrank2), scale, x.shape
        ctx.save_for_backward(
            x2 if grad_w2 or need[1] else None,  # dW2 = dAᵀ X; dW = gᵀ x
            first if need[0] or (rescale and not lowrank2) else None,  # dX = dA · W2
            a3 if grad_w1 else None,  # dW1 = Σ_t dB_t A_tᵀ
            w1e if grad_a else None,  # dA_t = W1ᵀ dB_t
            w1_a if lowrank1 and need[5] else None,
            w1_b if lowrank1 and need[4] else None,
            b2 if lowrank2 and need[7] else None,  # dw2_a = dYᵀ B, B as (T·out_l, r)
            last if lowrank2 and (grad_a or grad_w1 or rescale) else None,  # dB = dY · w2_a
            weight if need[0] else None,  # the base's dx = g W
        )
        if base is not None and x.dim() == 2:  # y accumulated into `base`: (T, out) itself, not a view of it
            return base  # (a view would make FSDP2 warn where the bare F.linear does not: sharding.py)
        return y.view(*x.shape[:-1], out_l * ctx.dims[4])

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        need = ctx.needs_input_grad
        x2, first, a3, w1e, w1_a, w1_b, b2, last, weight = ctx.saved_tensors
        tokens, out_l, in_m, c, out_k = ctx.dims
        lowrank1, lowrank2 = ctx.lowrank
        scale = ctx.scale
        gx = gw = gb = gw1 = gw1_a = gw1_b = gw2 = gw2_a = gw2_b = None
        gy = gy.contiguous()  # a loss like y.sum() sends a stride-0 grad: bmm on it is ~25x slower
        if need[1] or need[2] or weight is not None:
            g_flat = gy.view(tokens, out_l * out_k)
            gw = g_flat.t() @ x2.view(tokens, -1) if need[1] else None
            gb = g_flat.sum(0) if need[2] else None
            gx = g_flat @ weight if weight is not None else None  # (T, in): the base's dx
        if lowrank2:
            g2 = gy.view(tokens * out_l, out_k)
            if need[7]:  # dw2_a = scale · dYᵀ B
                gw2_a = g2.t() @ b2 if scale == 1.0 else torch.addmm(last, g2.t(), b2, beta=0, alpha=scale)
            if w1e is None and a3 is None:
                return gx, gw, gb, None, None, None, None, gw2_a, None, None
            gb3 = (g2 @ last).view(tokens, out_l, c)  # dL/dB
        else:
            gb3 = gy.view(tokens, out_l, c)
        if a3 is not None:  # dW1 = Σ_t dB_t A_tᵀ (the scale is in dB or in A already)
            g_w1 = torch.bmm(gb3, a3.transpose(1, 2)).sum(0)  # (out_l, in_m)
            if not lowrank1:
                gw1 = g_w1
            gw1_a, gw1_b = _halves(g_w1, w1_a, w1_b, need[4], need[5])
        if w1e is not None:
            ga = torch.bmm(w1e.transpose(1, 2), gb3).view(tokens * in_m, c)  # dL/dA
            if need[0]:  # dX = dA · W2, into the base's dx where there is one
                gx = (ga @ first if gx is None else gx.view(tokens * in_m, -1).addmm_(ga, first)).view(ctx.x_shape)
            if lowrank2 and need[8]:
                gw2_b = ga.t() @ x2
            elif not lowrank2 and need[6]:  # A = X (scale·w2)ᵀ: dw2 = scale · dAᵀ X
                gw2 = ga.t() @ x2 if scale == 1.0 else torch.addmm(first, ga.t(), x2, beta=0, alpha=scale)
        return gx, gw, gb, gw1, gw1_a, gw1_b, gw2, gw2_a, gw2_b, None


def apply_merged_linear(x: Tensor, weight: Tensor, bias: Tensor | None, f: Factors,
                        scale: float | Tensor, rows: Rows | None = None) -> Tensor:
    """F.linear(x, W + scale · W1 ⊗ W2, bias) for training, as one autograd Function (`_LinearMerged`).

    Forward builds W + ΔW in one pass (add_delta's addcmul view, no kron) and runs one linear;
    backward forms dx from that weight and the factors' gradients by the vec trick, never the
    full-size dL/d(W + ΔW) = gᵀx. W must be contiguous (the view). Under autocast the inputs are
    cast here, as autocast casts a linear's (floating tensors but float64), and the Function runs
    with autocast off; the casts are recorded outside, so gradients come back in each tensor's dtype.
    A tensor scale (torch.compile) multiplies W1's small factor before the Function (its value must
    not be a number the graph guards on), so the Function's own scale is then 1. `rows` must lie on
    W1 block edges (`rows_aligned`): the Function then runs on W1's kept rows."""
    f = _aligned(f, rows)
    w1, w1_a, scale = _fold_scale(f, scale)  # W + ΔW is not linear in the scale: fold it into W1's factor
    return _apply_cast(_LinearMerged, [x, weight, bias, w1, w1_a, f.get("lokr_w1_b"), f.get("lokr_w2"),
                                       f.get("lokr_w2_a"), f.get("lokr_w2_b")], scale)


class _LinearMerged(torch.autograd.Function):
    """y = x · (W + scale · W1 ⊗ W2)ᵀ + b as one node: the merged path in training.

    With X_t (in_m, in_n) a token's input and G_t (out_l, out_k) its output gradient, the factors'
    gradients need only small contractions (no (out, in) gᵀx):
        dW1 = scale · Σ_t G_t W2 X_tᵀ      C = G W2: one tall GEMM (T·out_l, out_k)·(out_k, in_n),
                                           then a bmm against Xᵀ summed over the tokens
        dW2 = scale · Σ_t G_tᵀ W1 X_t      B = W1 X_t: one bmm (W1 expanded, a view), then one GEMM
                                           contracting (token, out_l) rows
    and a low-rank factor takes its two halves from these by two small GEMMs. The scale rides in
    the GEMMs' alpha (beta = 0 with any tensor of the output's shape: its values are not read).
    dx = g · (W + ΔW), from the weight forward built: one GEMM, as the bare layer's backward.

    Saved, by `needs_input_grad`: W + ΔW only when x wants a gradient (one weight-sized tensor per
    layer, as PEFT keeps ΔW for its second linear and F.linear(x, W + ΔW) keeps W + ΔW; rebuilding
    it in backward instead would cost two more ops and a pass over the weight), x only when a
    factor or W wants a gradient, and the small factors.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, w1: Tensor | None,
                w1_a: Tensor | None, w1_b: Tensor | None, w2: Tensor | None, w2_a: Tensor | None,
                w2_b: Tensor | None, scale: float) -> Tensor:
        need = ctx.needs_input_grad
        lowrank1, lowrank2 = w1 is None, w2 is None
        w1f = cast(Tensor, w1_a) @ cast(Tensor, w1_b) if lowrank1 else cast(Tensor, w1)  # (out_l, in_m)
        w2f = cast(Tensor, w2_a) @ cast(Tensor, w2_b) if lowrank2 else cast(Tensor, w2)  # (out_k, in_n)
        out_l, in_m = w1f.shape
        out_k, in_n = w2f.shape
        out_dim, in_dim = weight.shape
        # W viewed (out_l, out_k, in_m, in_n) + W1[l, m] · W2[k, n]: W2 as (out_k, 1, in_n) broadcasts
        # as (1, out_k, 1, in_n), one view fewer than spelling the leading 1 out
        w_eff = torch.addcmul(weight.view(out_l, out_k, in_m, in_n), w1f.view(out_l, 1, in_m, 1),
                              w2f.view(out_k, 1, in_n), value=scale).view(out_dim, in_dim)
        x2 = x.reshape(-1, in_dim)  # (T, in): a view unless x is strided
        # F.linear's own kernel for a >2-D input (addmm on the flattened rows): the same numbers
        y = x2 @ w_eff.t() if bias is None else torch.addmm(bias, x2, w_eff.t())
        grad_w1 = need[3] or need[4] or need[5]
        grad_w2 = need[6] or need[7] or need[8]
        ctx.dims = (out_l, in_m, out_k, in_n)
        ctx.lowrank, ctx.scale, ctx.x_shape = (lowrank1, lowrank2), scale, x.shape
        ctx.save_for_backward(
            w_eff if need[0] else None,  # dx = g (W + ΔW)
            x2 if need[1] or grad_w1 or grad_w2 else None,
            w1f if grad_w2 or (grad_w1 and scale != 1.0) else None,  # B = W1 X; baddbmm's shape argument
            w2f if grad_w1 or grad_w2 else None,  # C = G W2; addmm's shape argument
            w1_a if lowrank1 and need[5] else None,
            w1_b if lowrank1 and need[4] else None,
            w2_a if lowrank2 and need[8] else None,
            w2_b if lowrank2 and need[7] else None,
        )
        return y if x.dim() == 2 else y.view(*x.shape[:-1], out_dim)  # 2-D: no view, as F.linear's own output

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        need = ctx.needs_input_grad
        w_eff, x2, w1f, w2f, w1_a, w1_b, w2_a, w2_b = ctx.saved_tensors
        out_l, in_m, out_k, in_n = ctx.dims
        lowrank1, lowrank2 = ctx.lowrank
        scale = ctx.scale
        gx = gw = gb = gw1 = gw1_a = gw1_b = gw2 = gw2_a = gw2_b = None
        # no .contiguous(): every GEMM below takes gy through mm, which copes with the stride-0
        # gradient of a loss like y.sum(); the bmms run on tensors made here
        g2 = gy.reshape(-1, out_l * out_k)  # (T, out)
        if need[0]:
            gx = (g2 @ w_eff).view(ctx.x_shape)
        if need[1]:
            gw = g2.t() @ x2
        if need[2]:
            gb = g2.sum(0)
        grad_w1 = need[3] or need[4] or need[5]
        grad_w2 = need[6] or need[7] or need[8]
        if grad_w1 or grad_w2:
            tokens = x2.shape[0]
            gk = gy.reshape(tokens * out_l, out_k)  # one row per (token, output group)
            x3 = x2.view(tokens, in_m, in_n)
            if grad_w1:  # dW1 = scale · Σ_t (G_t W2) X_tᵀ
                c3 = (gk @ w2f).view(tokens, out_l, in_n)
                if scale == 1.0:
                    per_token = torch.bmm(c3, x3.transpose(1, 2))
                else:
                    per_token = torch.baddbmm(w1f, c3, x3.transpose(1, 2), beta=0, alpha=scale)
                g_w1 = per_token.sum(0)  # (out_l, in_m)
                if not lowrank1:
                    gw1 = g_w1
                gw1_a, gw1_b = _halves(g_w1, w1_a, w1_b, need[4], need[5])
            if grad_w2:  # dW2 = scale · Σ_(t, l) G[t, l]ᵀ (W1 X_t)[l]
                b2 = torch.bmm(w1f.expand(tokens, out_l, in_m), x3).view(tokens * out_l, in_n)
                g_w2 = gk.t() @ b2 if scale == 1.0 else torch.addmm(w2f, gk.t(), b2, beta=0, alpha=scale)
                if not lowrank2:
                    gw2 = g_w2
                gw2_a, gw2_b = _halves(g_w2, w2_a, w2_b, need[7], need[8])
        return gx, gw, gb, gw1, gw1_a, gw1_b, gw2, gw2_a, gw2_b, None


# ---- a conv layer's bypass in training: the conv and the adapter's chain of small convs and W1 mix as one
# node. Plain autograd over the same ops (bypass.apply_lokr beside the base op) records every reshape,
# transpose and copy and sums two full-size outputs: + 50 aten ops over the bare conv per training step for
# a Tucker adapter at SD1.5's Conv2d(320, 320, 3), against + 28 here (tests/test_op_counts.py).

_CONV_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2")


def apply_bypass_conv(x: Tensor, weight: Tensor, bias: Tensor | None, f: Factors, plan: LoKrPlan,
                      scale: float, stride: tuple[int, ...], padding: tuple[int, ...],
                      dilation: tuple[int, ...]) -> Tensor:
    """convNd(x, W, bias, stride, padding, dilation) + scale · ΔW * x, as one node (`_ConvBypass`).

    x (B, in_m·in_n, *S) -> (B, out_l·out_k, *S'). Numeric padding only (a string padding runs the
    plain ops), groups 1; a float scale (a traced tensor scale runs the plain ops)."""
    return _apply_cast(_ConvBypass, [x, weight, bias, *(f.get(n) for n in _CONV_NAMES)], plan, scale, stride, padding,
                       dilation)


def _stages(plan: LoKrPlan, w2: Tensor | None, w2_a: Tensor | None, w2_b: Tensor | None, t2: Tensor | None
            ) -> list[tuple[Tensor, bool]]:
    """W2 as a chain of convs, each (weight (c_out, c_in, *k), carries the layer's stride / padding /
    dilation): full W2 one conv; low-rank w2_b (kernel) then w2_a (1x1); Tucker w2_b (1x1), the core
    t2 (kernel), w2_a (1x1), t2[i, j] mapping rank j to rank i (bypass._apply_lokr_conv's order).
    Tucker's w2_a is stored (r, out_k): its 1x1 conv runs transposed (a transposed conv's weight is
    (c_in, c_out, *k)), so that neither a transpose forward nor a copy of its gradient backward is needed."""
    ones = (1,) * len(plan.kernel)
    if w2 is not None:
        return [(w2 if w2.dim() == 2 + len(plan.kernel) else w2.view(plan.out_k, plan.in_n, *plan.kernel), True)]
    a, b = cast(Tensor, w2_a), cast(Tensor, w2_b)
    r = plan.rank2
    if t2 is None:
        return [(b.view(r, plan.in_n, *plan.kernel), True), (a.view(plan.out_k, r, *ones), False)]
    core = t2 if t2.dim() == 2 + len(plan.kernel) else t2.view(r, r, *plan.kernel)
    return [(b.view(r, plan.in_n, *ones), False), (core, True), (a.view(r, plan.out_k, *ones), False)]


class _ConvBypass(torch.autograd.Function):
    """y = conv(x, W, b) + scale · W1-mix(W2-chain(x grouped)), one node.

    Forward: x viewed as (B·in_m, in_n, *S) runs through W2's convs (`_stages`); the result, viewed
    (B, in_m, out_k·S'), is mixed by W1 (one baddbmm against W1 expanded over the batch, a view) into
    the base output's buffer, the scale in its alpha. Backward: the base conv's own backward gives dx
    (and dW, db where wanted); dL/dh = scale · W1ᵀ g and dW1 = scale · Σ_b g_b h_bᵀ by two baddbmms;
    each conv of the chain by aten's convolution_backward; the adapter's dx is added into the base's.
    Saved: the chain's inputs and output (what plain autograd saves), x and W (inputs: no copy).
    Inputs: x, W, b, w1, w1_a, w1_b, w2, w2_a, w2_b, t2 (then plan, scale, stride, padding, dilation).
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor, bias: Tensor | None, w1: Tensor | None,
                w1_a: Tensor | None, w1_b: Tensor | None, w2: Tensor | None, w2_a: Tensor | None,
                w2_b: Tensor | None, t2: Tensor | None, plan: LoKrPlan, scale: float,
                stride: tuple[int, ...], padding: tuple[int, ...], dilation: tuple[int, ...]) -> Tensor:
        nd = len(plan.kernel)
        zeros, ones = (0,) * nd, (1,) * nd
        y = torch.convolution(x, weight, bias, stride, padding, dilation, False, zeros, 1).contiguous()
        batch = x.shape[0]
        stages = _stages(plan, w2, w2_a, w2_b, t2)
        h = x.reshape(batch * plan.in_m, plan.in_n, *x.shape[2:])  # a view for a contiguous x
        inputs = []
        tucker = t2 is not None
        for i, (w, spatial) in enumerate(stages):
            inputs.append(h)
            h = torch.convolution(h, w, None, stride if spatial else ones, padding if spatial else zeros,
                                  dilation if spatial else ones, tucker and i == 2, zeros, 1)
        w1f = cast(Tensor, w1_a) @ cast(Tensor, w1_b) if w1 is None else w1  # (out_l, in_m)
        w1e = w1f.expand(batch, plan.out_l, plan.in_m)
        h3 = h.view(batch, plan.in_m, -1)  # (B, in_m, out_k·S')
        y.view(batch, plan.out_l, -1).baddbmm_(w1e, h3, alpha=scale)
        ctx.plan, ctx.scale, ctx.conv = plan, scale, (stride, padding, dilation)
        ctx.spatial = [spatial for _, spatial in stages]
        ctx.h_shape = h.shape
        ctx.save_for_backward(x, weight, w1e, h3, w1_a, w1_b, w2, w2_a, w2_b, t2, *(w for w, _ in stages),
                              *inputs)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gy: Tensor) -> tuple[Tensor | None, ...]:
        need = ctx.needs_input_grad
        plan: LoKrPlan = ctx.plan
        scale: float = ctx.scale
        stride, padding, dilation = (list(v) for v in ctx.conv)
        nd = len(plan.kernel)
        zeros, ones = [0] * nd, [1] * nd
        spatial = ctx.spatial
        n = len(spatial)
        saved = ctx.saved_tensors
        x, weight, w1e, h3, w1_a, w1_b, w2, w2_a, w2_b, t2 = saved[:10]
        weights, inputs = saved[10:10 + n], saved[10 + n:]
        gy = gy.contiguous()
        gx = gw = gb = None
        if need[0] or need[1] or need[2]:  # the base conv's own backward
            gx, gw, gb = torch.ops.aten.convolution_backward(
                gy, x, weight, [gy.shape[1]] if need[2] else None, stride, padding, dilation, False, zeros, 1,
                [need[0], need[1], need[2]])
        batch = gy.shape[0]
        g3 = gy.view(batch, plan.out_l, -1)  # (B, out_l, out_k·S')
        gw1 = gw1_a = gw1_b = None
        if need[3] or need[4] or need[5]:  # dW1 = scale · Σ_b g_b h_bᵀ (beta=0: w1e's values are not read)
            g_w1 = torch.baddbmm(w1e, g3, h3.transpose(1, 2), beta=0, alpha=scale).sum(0)
            if need[3]:
                gw1 = g_w1
            gw1_a, gw1_b = _halves(g_w1, w1_a, w1_b, need[4], need[5])
        # each stage's weight: W2 alone; w2_b then w2_a; w2_b, t2, w2_a
        wants = [need[6]] if n == 1 else [need[8], need[7]] if n == 2 else [need[8], need[9], need[7]]
        stage_grads: list[Tensor | None] = [None] * n
        if need[0] or any(wants):
            g = torch.baddbmm(h3, w1e.transpose(1, 2), g3, beta=0, alpha=scale).view(ctx.h_shape)  # dL/dh
            for i in range(n - 1, -1, -1):
                on = i > 0 or need[0]  # the gradient of this stage's input is wanted
                gi, stage_grads[i], _ = torch.ops.aten.convolution_backward(
                    g, inputs[i], weights[i], None, stride if spatial[i] else ones,
                    padding if spatial[i] else zeros, dilation if spatial[i] else ones, n == 3 and i == 2, zeros, 1,
                    [on, wants[i], False])
                g = gi
            if need[0]:
                ga = g.view(x.shape)  # g is convolution_backward's own (contiguous) tensor
                gx = ga if gx is None else gx.add_(ga)
        gw2 = gw2_a = gw2_b = gt2 = None
        if n == 1:
            gw2 = _back(stage_grads[0], w2)
        else:
            gw2_b = _back(stage_grads[0], w2_b)
            if n == 2:
                gw2_a = _back(stage_grads[1], w2_a)
            else:
                gt2 = _back(stage_grads[1], t2)
                gw2_a = _back(stage_grads[2], w2_a)
        return gx, gw, gb, gw1, gw1_a, gw1_b, gw2, gw2_a, gw2_b, gt2, None, None, None, None, None


def _back(g: Tensor | None, factor: Tensor | None) -> Tensor | None:
    """A stage weight's gradient in its factor's stored shape (a view where the two differ)."""
    if g is None or factor is None or g.shape == factor.shape:
        return g
    return g.view(factor.shape)
