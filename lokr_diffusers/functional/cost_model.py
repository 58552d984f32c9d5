"""The cost model: whether applying the factors to x (bypass) is cheaper than one matmul with W + ΔW
(merged), per layer shape and token count (`prefer_bypass`; docs/performance.md §How it computes)."""

from __future__ import annotations

import math

from .plan import LoKrPlan

# Costs in "big-GEMM multiply-adds". The bypass runs skinny GEMMs/convs that are bound by memory,
# not arithmetic: each activation element they read or write costs about as much as MOVED
# multiply-adds, and a pass over a weight-sized tensor (kron, add, the kron's backward) about
# STREAMED. Calibrated on a 2-core CPU in fp32 with benchmarks/bench_layers.py, where the model
# picks the faster path at every SD1.5 / CLIP shape measured.
MOVED = 60
STREAMED = 20
# A Linear in training with few tokens is bound by launches, not arithmetic: each path costs at least its
# aten ops times LAUNCH (an op's fixed cost: dispatch, an autograd node; ~1-2 µs on that CPU). The
# ops per training step are tests/test_reuse.py's counts: merged (one Function) + 18, + 6 per low-rank
# factor; bypass + 19, + 6 for a low-rank W1, + 8 for a low-rank W2. Measured on benchmarks/bench_proxy.py
# --paths (Linear(64, 64), 16 tokens): merged 1-8% faster than bypass in every paired run, where the
# arithmetic alone says bypass; at SD1.5's shapes the floor is three orders of magnitude below both costs.
LAUNCH = 50_000
# A Linear of at most SMALL_WEIGHT elements with W1 and W2 both full (the tiny models' layers, the proxy's) trains
# fastest merged: its W + ΔW is cheap to build, and the layer runs it by plain autograd from SMALL_TOKENS_PER
# weight elements per token (layers/linear.py). Training steps per layer, 1 thread, bypass against merged:
# 216 / 138 µs (32 wide, 128 tokens), 198 / 161 (64 wide, 64 tokens), 509 / 460 (128 wide, 256 tokens).
SMALL_WEIGHT = 128 * 128
SMALL_TOKENS_PER = 64


def bypass_flops_and_traffic(plan: LoKrPlan, tokens: int, needs_grad: bool = False) -> tuple[int, int]:
    """(multiply-adds, activation elements read or written) of `apply_lokr` for `tokens` outputs
    (needs_grad: as `_LinearBypass` runs it)."""
    k = math.prod(plan.kernel)
    r = plan.rank2
    rows = tokens * plan.in_m  # each input group is multiplied / convolved on its own
    io = tokens * (plan.in_m * plan.in_n + 2 * plan.out_l * plan.out_k)  # read x, write y, add y
    if not plan.kernel and needs_grad:  # `_LinearBypass` with the base op: y accumulates in its buffer
        io = tokens * (plan.in_m * plan.in_n + plan.out_l * plan.out_k)
    if not plan.kernel and plan.w2_lowrank:  # linear: w2_b, the W1 mix, w2_a
        # without gradients W1 mixes as kron(W1, I_r) (r times the multiply-adds, one GEMM);
        # `_LinearBypass` mixes by a bmm against W1 expanded over the tokens
        mix = plan.in_m * plan.out_l * (1 if needs_grad else r)
        flops = tokens * r * (plan.in_m * plan.in_n + mix + plan.out_l * plan.out_k)
        return flops, io + tokens * r * (plan.in_m + plan.out_l)
    if not plan.w2_lowrank:
        flops, inner = rows * plan.out_k * plan.in_n * k, rows * plan.out_k
    elif plan.tucker:
        flops, inner = rows * r * (plan.in_n + r * k + plan.out_k), rows * (2 * r + plan.out_k)
    else:
        flops, inner = rows * r * (plan.in_n * k + plan.out_k), rows * (r + plan.out_k)
    return flops + tokens * plan.out_l * plan.in_m * plan.out_k, io + inner


def bypass_cost(plan: LoKrPlan, tokens: int, needs_grad: bool) -> float:
    """Extra cost of applying the factors to x (backward: about twice the forward again)."""
    flops, traffic = bypass_flops_and_traffic(plan, tokens, needs_grad)
    return (3 if needs_grad else 1) * (flops + MOVED * traffic)


def merged_cost(plan: LoKrPlan, tokens: int, needs_grad: bool) -> float:
    """Extra cost of one matmul with W + ΔW instead of W alone.

    Building ΔW and adding it to W: two passes over a weight-sized tensor. With gradients:
    - a conv forms dL/d(W+ΔW) = gᵀx (a full-size matmul the frozen base never pays) and reduces it
      back through the kron (about four more passes);
    - a linear layer runs `_LinearMerged`: dx costs what the bare layer's does, and the factors'
      gradients are the vec trick's small GEMMs, C = G W2 and B = W1 X (T·out_l·in_n·out_k and
      T·out_l·in_m·in_n multiply-adds, then as many again to contract them with X and G), bound by
      their traffic: g and x read twice, C and B written and read, the per-token (out_l, in_m)
      products written and summed.
    """
    numel = math.prod(plan.weight_shape)
    build = 2 * STREAMED * numel
    if not needs_grad:
        return build
    if plan.kernel:
        return tokens * numel + 6 * STREAMED * numel
    out_l, in_m, out_k, in_n = plan.out_l, plan.in_m, plan.out_k, plan.in_n
    flops = 2 * tokens * out_l * in_n * (out_k + in_m)
    traffic = tokens * (2 * out_l * out_k + 2 * in_m * in_n + 4 * out_l * in_n + 2 * out_l * in_m)
    return build + flops + MOVED * traffic


def small_full_linear(plan: LoKrPlan) -> bool:
    """A Linear's plan with W1 and W2 full and at most SMALL_WEIGHT weight elements (module comment)."""
    return not plan.kernel and not plan.w1_lowrank and not plan.w2_lowrank and \
        plan.out_l * plan.out_k * plan.in_m * plan.in_n <= SMALL_WEIGHT


def prefer_bypass(plan: LoKrPlan, tokens: int, needs_grad: bool) -> bool:
    """True when applying the factors is cheaper than one matmul with W + ΔW (a Linear in training:
    each at least its launches, LAUNCH per aten op)."""
    if needs_grad and small_full_linear(plan):
        return False
    bypass, merged = bypass_cost(plan, tokens, needs_grad), merged_cost(plan, tokens, needs_grad)
    if needs_grad and not plan.kernel:
        low1, low2 = int(plan.w1_lowrank), int(plan.w2_lowrank)
        bypass = max(bypass, LAUNCH * (19 + 6 * low1 + 8 * low2))
        merged = max(merged, LAUNCH * (18 + 6 * (low1 + low2)))
    return bypass < merged
