"""Row pieces: a layer holding only some rows of the weight an adapter was made for (`Rows`), and the
helpers that cut W1 to the row blocks covering them (docs/adapters.md §Row pieces)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .plan import Factors, LoKrPlan


@dataclass(frozen=True)
class Rows:
    """A layer that holds only some rows of the weight an adapter was made for: a fused original module
    (Flux's `qkv`, `linear1`) split over diffusers' separate Linears (docs/formats.md §DiT models).

    The adapter's kron(W1, W2) is the fused weight, `height` = out_l·out_k rows; the layer's weight is
    rows pieces[0] of it, then pieces[1], ... (one piece for a to_q of a fused qkv; two for an adaLN
    projection whose (shift, scale) halves are swapped between the layouts). Exact: no refactorisation.
    """

    pieces: tuple[tuple[int, int], ...]  # (start, stop) row ranges of the fused weight, in the layer's row order
    height: int

    def __post_init__(self) -> None:
        if not self.pieces or any(not 0 <= a < b <= self.height for a, b in self.pieces):
            raise ValueError(f"row pieces {self.pieces} must be non-empty ranges within 0..{self.height}")

    @property
    def out(self) -> int:
        """The layer's rows."""
        return sum(b - a for a, b in self.pieces)


@dataclass(frozen=True)
class RowBlocks:
    """How a `Rows` restriction is computed: block l of kron(W1, W2) is rows [l·out_k, (l+1)·out_k), one row
    of W1 times W2. `blocks` are the W1 row ranges [l0, l1) kept (l0 = start // out_k, l1 = ceil(stop / out_k)
    per piece, contiguous ranges merged); the result of the restricted factors has rows·out_k rows, of which
    `keep` (row ranges, in the layer's order) are the layer's, or all of them (None) when every piece
    starts and stops on a block edge."""

    blocks: tuple[tuple[int, int], ...]
    keep: tuple[tuple[int, int], ...] | None

    @property
    def rows(self) -> int:
        """W1 rows kept (the restricted out_l)."""
        return sum(b - a for a, b in self.blocks)


def row_blocks(rows: Rows, out_k: int) -> RowBlocks:
    """The W1 row blocks that cover `rows`, and the rows to keep of what they give (see RowBlocks)."""
    blocks: list[tuple[int, int]] = []
    keep: list[tuple[int, int]] = []
    offset, aligned = 0, True
    for a, b in rows.pieces:
        l0, l1 = a // out_k, -(-b // out_k)
        aligned = aligned and a % out_k == 0 and b % out_k == 0
        keep.append((offset + a - l0 * out_k, offset + b - l0 * out_k))
        offset += (l1 - l0) * out_k
        if blocks and blocks[-1][1] == l0:  # contiguous with the previous piece's blocks: one range
            blocks[-1] = (blocks[-1][0], l1)
        else:
            blocks.append((l0, l1))
    return RowBlocks(tuple(blocks), None if aligned else tuple(keep))


def w2_rows(f: Factors) -> int:
    """out_k, W2's rows, from the stored tensors (Tucker's w2_a is (r, out_k))."""
    if "lokr_w2" in f:
        return int(f["lokr_w2"].shape[0])
    return int(f["lokr_w2_a"].shape[1 if "lokr_t2" in f else 0])


def restrict_rows(f: Factors, blocks: Sequence[tuple[int, int]]) -> dict[str, Tensor]:
    """The factors with W1 (or a low-rank W1's w1_a) cut to the rows `blocks`: their kron is those
    row blocks of the full one. A slice of a Parameter, so gradients reach the shared factor."""
    name = "lokr_w1" if "lokr_w1" in f else "lokr_w1_a"
    t = f[name]
    part = t[blocks[0][0]:blocks[0][1]] if len(blocks) == 1 else torch.cat([t[a:b] for a, b in blocks])
    return {**f, name: part}


def take_rows(t: Tensor, keep: Sequence[tuple[int, int]] | None, dim: int) -> Tensor:
    """The row ranges `keep` of `t` along `dim`, concatenated (t itself for None)."""
    if keep is None:
        return t
    parts = [t.narrow(dim, a, b - a) for a, b in keep]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def restricted_plan(plan: LoKrPlan, rows: Rows | None) -> LoKrPlan:
    """The plan of what a layer holding `rows` computes (out_l cut to the kept blocks): for the cost
    model and the vec trick; `plan` is the fused weight's."""
    if rows is None:
        return plan
    return replace(plan, out_l=row_blocks(rows, plan.out_k).rows)


def rows_aligned(rows: Rows, out_k: int) -> bool:
    """Every piece starts and stops on a W1 block edge: the layer's ΔW is itself a Kronecker product
    (W1's kept rows ⊗ W2), so every path of an unfused layer runs on the restricted factors."""
    return row_blocks(rows, out_k).keep is None
