"""A file's module that is a fused original weight, split over the diffusers modules that hold its rows.

ComfyUI applies a LoKr on Flux's `double_blocks.0.img_attn.qkv` to the fused weight: ΔW = scale · W1 ⊗ W2 of
shape (3d, d). diffusers keeps to_q, to_k, to_v apart; each gets the same factors and its rows of the
fused ΔW (`functional.Rows`; docs/formats.md §DiT models). Exact, with no refactorisation, and the model
keeps the structure diffusers built. This module says which rows each layer holds, and splits DoRA:

- output axis (dora_scale (3d, 1)): the norm is per row, so each layer takes its rows of m;
- input axis (dora_scale (1, d)): the fused weight's column norms run over every piece's rows, which no
  single layer sees. A layer normalises by its own column norms, so its magnitude is rescaled once, from
  the base weights: m_p = m · (‖W_p + ΔW_p‖ + eps) / (‖W + ΔW‖ + eps), giving m · (W_p + ΔW_p) / (‖W + ΔW‖ + eps),
  the fused rule's rows, as long as the base weights stay (as for reading back a ComfyUI-rule DoRA).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .. import functional as LF
from .dit import Piece, Target


def layer_rows(target: Target) -> dict[str, LF.Rows]:
    """{diffusers path: the rows of the fused weight that module holds, in its own row order}."""
    by_path: dict[str, list[Piece]] = {}
    for piece in target.pieces:
        by_path.setdefault(piece.path, []).append(piece)
    return {path: LF.Rows(tuple((p.start, p.stop) for p in sorted(pieces, key=lambda p: p.src_start)),
                          target.out_features)
            for path, pieces in by_path.items()}


def split_dora(dora: Tensor, target: Target, rows: Mapping[str, LF.Rows], factors: Mapping[str, Tensor],
               scale: float, weights: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Each layer's dora_scale for a DoRA adapter on the fused weight (see the module docstring).

    Args:
        dora: the file's dora_scale, (height, 1) / (height,) or (1, in).
        weights: {path: base weight without LoKr} of every layer in `rows` (only read for the input axis).
    """
    shape = (target.out_features, target.in_features)
    if LF.dora_on_output_axis(dora, shape):
        return {path: LF.take_rows(dora, r.pieces, 0).clone() for path, r in rows.items()}
    if any(w.is_meta for w in weights.values()):
        raise ValueError(f"{target.name}: an input-axis dora_scale on a fused module is split over {sorted(rows)} "
                         "from their base weights; these are on the meta device (load it into a pipeline with "
                         "weights)")
    eps = torch.finfo(torch.float32).eps
    f64 = {k: v.to(torch.float64) for k, v in factors.items()}
    col_sq: dict[str, Tensor] = {}
    for path, r in rows.items():
        w = weights[path].to(torch.float64)
        adapted = w + LF.delta_weight(f64, tuple(w.shape), scale, r)
        col_sq[path] = (adapted * adapted).sum(0)  # (in,): this layer's share of the fused column norms
    fused = torch.stack(list(col_sq.values())).sum(0).sqrt()
    m = dora.to(torch.float64)
    out: dict[str, Tensor] = {}
    for path, sq in col_sq.items():
        ratio = (sq.sqrt() + eps) / (fused + eps)
        out[path] = (m * ratio.reshape(m.shape)).to(dora.dtype)
    return out


# ------------------------------------------------------------------------------- saving the pieces
# Our lossless layout (export.to_ours, formats/ours.py) and PEFT-layout state dicts keep a piece layer's
# rows as two integer tensors beside its factors; the pieces of one fused module hold one set of factors,
# written once (safetensors refuses tensors that share memory): the other pieces name the one that holds
# them in the metadata key SHARED_KEY ({"<adapter>.<component>.<path>": "<component>.<path holding them>"}).
ROW_LEAVES: tuple[str, ...] = ("lokr_rows", "lokr_height")
SHARED_KEY = "lokr_shared"


def rows_to_tensors(rows: LF.Rows) -> dict[str, Tensor]:
    """{"lokr_rows": int64 (pieces, 2) of (start, stop), "lokr_height": int64 0-d}."""
    return {"lokr_rows": torch.tensor(rows.pieces, dtype=torch.int64).reshape(-1, 2),
            "lokr_height": torch.tensor(rows.height, dtype=torch.int64)}


def rows_from_tensors(pieces: Tensor, height: Tensor, where: str) -> LF.Rows:
    """The Rows that `rows_to_tensors` wrote (ValueError naming `where` if they are not such)."""
    if pieces.dim() != 2 or pieces.shape[1] != 2 or height.numel() != 1 or pieces.is_floating_point():
        raise ValueError(f"{where}: lokr_rows must be an integer (pieces, 2) tensor and lokr_height one integer, "
                         f"got shapes {tuple(pieces.shape)} and {tuple(height.shape)}")
    try:
        return LF.Rows(tuple((int(a), int(b)) for a, b in pieces.tolist()), int(height))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
