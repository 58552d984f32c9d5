"""The LoKr math: the one copy in this package. Tensors in, tensors out; no nn.Module, no I/O.

A LoKr adapter on a layer with weight W of shape (out, in, *kernel) adds

    ΔW = scale · (W1 ⊗ W2)        W1: (out_l, in_m)    W2: (out_k, in_n, *kernel)

with out = out_l·out_k and in = in_m·in_n (for a grouped conv, in = in_channels // groups).
Each factor is stored either full or low-rank (see docs/formats.md §The math and `plan_lokr`):

    W1 = lokr_w1                       | lokr_w1_a (out_l, r) @ lokr_w1_b (r, in_m)
    W2 = lokr_w2                       | lokr_w2_a (out_k, r) @ lokr_w2_b (r, in_n·prod(kernel))
       | Tucker: W2[p,q,...] = Σ_ij lokr_t2[i,j,...] · lokr_w2_a[i,p] · lokr_w2_b[j,q]
         with lokr_t2 (r, r, *kernel), lokr_w2_a (r, out_k) (transposed!), lokr_w2_b (r, in_n)

Factors travel as a mapping from those names ("lokr_w1", ...) to tensors; absent names are absent.

The modules, one concern each (every name is also importable from this package, as before the split):

    plan.py         factorization, the shape plan (LoKrPlan, plan_lokr, plan_from_tensors), FACTOR_NAMES
    rows.py         row pieces: Rows and the row-range helpers
    delta.py        ΔW: W1 / W2 rebuilt (full, low-rank, Tucker), delta_weight, add_delta, adapt_weight, fold
    dora.py         DoRA: dora_weight, its magnitude axis, the row norms export needs
    bypass.py       ΔW·x without building ΔW: apply_lokr (Linear, Conv1d, Conv2d), ConvArgs
    autograd.py     the training Functions of a Linear: _LinearBypass, _LinearMerged and their entry points
    cost_model.py   whether bypass beats one matmul with W + ΔW: prefer_bypass and its constants
    scale_rules.py  peft_scale, lycoris_scale, consumer_scale, alpha_for_consumer
"""

from __future__ import annotations

from .autograd import apply_bypass_conv, apply_bypass_linear, apply_merged_linear
from .bypass import ConvArgs, apply_lokr
from .cost_model import (
    MOVED,
    SMALL_TOKENS_PER,
    STREAMED,
    bypass_cost,
    bypass_flops_and_traffic,
    merged_cost,
    prefer_bypass,
    small_full_linear,
)
from .delta import (
    adapt_weight,
    add_delta,
    delta_weight,
    fold,
    make_kron,
    rebuild_tucker,
    rebuild_w1,
    rebuild_w2,
    tucker_to_lowrank,
)
from .dora import dora_on_output_axis, dora_row_norms, dora_weight
from .plan import FACTOR_NAMES, Factors, LoKrPlan, factorization, plan_from_tensors, plan_lokr
from .rows import RowBlocks, Rows, restrict_rows, restricted_plan, row_blocks, rows_aligned, take_rows, w2_rows
from .scale_rules import alpha_for_consumer, consumer_scale, lycoris_scale, peft_scale

__all__ = [
    "FACTOR_NAMES",
    "MOVED",
    "SMALL_TOKENS_PER",
    "STREAMED",
    "ConvArgs",
    "Factors",
    "LoKrPlan",
    "RowBlocks",
    "Rows",
    "adapt_weight",
    "add_delta",
    "alpha_for_consumer",
    "apply_bypass_conv",
    "apply_bypass_linear",
    "apply_lokr",
    "apply_merged_linear",
    "bypass_cost",
    "bypass_flops_and_traffic",
    "consumer_scale",
    "delta_weight",
    "dora_on_output_axis",
    "dora_row_norms",
    "dora_weight",
    "factorization",
    "fold",
    "lycoris_scale",
    "make_kron",
    "merged_cost",
    "peft_scale",
    "plan_from_tensors",
    "plan_lokr",
    "prefer_bypass",
    "rebuild_tucker",
    "rebuild_w1",
    "rebuild_w2",
    "restrict_rows",
    "restricted_plan",
    "row_blocks",
    "rows_aligned",
    "small_full_linear",
    "take_rows",
    "tucker_to_lowrank",
    "w2_rows",
]
