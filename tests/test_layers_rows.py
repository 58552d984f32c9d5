"""Row pieces (functional.Rows, LoKrLayer.rows): a layer holding rows of an adapter's fused weight.

The oracle is written here from the definition (docs/adapters.md §Row pieces): the fused ΔW is
scale · torch.kron(W1, W2) built in full, and a layer's ΔW is its row pieces of it, concatenated.
Nothing below asks the package how to build ΔW.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lokr_diffusers import functional as LF
from lokr_diffusers.layers import Linear

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops: one thread (conftest.py)
DT = torch.float64


def factors(out_l: int, out_k: int, in_m: int, in_n: int, w1_rank: int = 0, w2_rank: int = 0,
            seed: int = 0) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=g, dtype=DT)

    f = {"lokr_w1_a": r(out_l, w1_rank), "lokr_w1_b": r(w1_rank, in_m)} if w1_rank else {"lokr_w1": r(out_l, in_m)}
    if w2_rank:
        f.update({"lokr_w2_a": r(out_k, w2_rank), "lokr_w2_b": r(w2_rank, in_n)})
    else:
        f["lokr_w2"] = r(out_k, in_n)
    return f


def fused_delta(f: dict[str, Tensor], scale: float) -> Tensor:
    """scale · W1 ⊗ W2, built in full."""
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    w2 = f["lokr_w2"] if "lokr_w2" in f else f["lokr_w2_a"] @ f["lokr_w2_b"]
    return torch.kron(w1, w2) * scale


def pieces_of(t: Tensor, pieces: tuple[tuple[int, int], ...]) -> Tensor:
    return torch.cat([t[a:b] for a, b in pieces])


# out_l = 6, out_k = 4: height 24; block edges at multiples of 4
LAYOUTS = {"full": (0, 0), "w2 low-rank": (0, 2), "both low-rank": (2, 2), "w1 low-rank": (2, 0)}
PIECES = {
    "q of qkv (aligned)": ((0, 8),),
    "k of qkv (aligned)": ((8, 16),),
    "v of qkv (aligned)": ((16, 24),),
    "off block edges": ((5, 14),),
    "one row": ((23, 24),),
    "swapped halves (aligned)": ((12, 24), (0, 12)),
    "swapped halves (off edges)": ((10, 24), (0, 10)),
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", PIECES)
def test_functional_rows_give_the_rows_of_the_fused_delta(layout: str, name: str) -> None:
    f = factors(6, 4, 3, 5, *LAYOUTS[layout])
    pieces = PIECES[name]
    rows = LF.Rows(pieces, 24)
    want = pieces_of(fused_delta(f, 0.7), pieces)
    assert torch.allclose(LF.delta_weight(f, (rows.out, 15), 0.7, rows), want)
    w = torch.randn(rows.out, 15, dtype=DT)
    assert torch.allclose(LF.add_delta(w, f, 0.7, rows=rows), w + want)
    assert torch.allclose(LF.add_delta(w.clone(), f, 0.7, inplace=True, rows=rows), w + want)
    x = torch.randn(2, 3, 15, dtype=DT)
    plan = LF.plan_from_tensors((24, 15), f)
    assert torch.allclose(LF.apply_lokr(x, f, plan, 0.7, rows=rows), x @ want.t())
    assert LF.rows_aligned(rows, 4) == ("aligned" in name)
    assert LF.restricted_plan(plan, rows).out_l == LF.row_blocks(rows, 4).rows


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("merged", [False, True], ids=["bypass", "merged"])
def test_training_functions_on_aligned_rows(layout: str, merged: bool) -> None:
    """The training Functions with W1 cut to the rows: output and every gradient as plain autograd on
    the rows of the full kron."""
    f = {k: v.requires_grad_() for k, v in factors(6, 4, 3, 5, *LAYOUTS[layout], seed=1).items()}
    rows = LF.Rows(((8, 16),), 24)
    w = torch.randn(8, 15, dtype=DT, requires_grad=True)
    b = torch.randn(8, dtype=DT, requires_grad=True)
    x = torch.randn(2, 3, 15, dtype=DT, requires_grad=True)
    fn = LF.apply_merged_linear if merged else LF.apply_bypass_linear
    y = fn(x, w, b, f, 0.3, rows)
    ref = nn.functional.linear(x, w + pieces_of(fused_delta(f, 0.3), rows.pieces), b)
    assert torch.allclose(y, ref)
    leaves = [x, w, b, *f.values()]
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, leaves, g)
    want = torch.autograd.grad(ref, leaves, g)
    for a, e in zip(got, want, strict=True):
        assert torch.allclose(a, e)


def test_training_functions_refuse_rows_off_block_edges() -> None:
    f = factors(6, 4, 3, 5)
    with pytest.raises(ValueError, match="block edges"):
        LF.apply_bypass_linear(torch.randn(1, 15, dtype=DT), torch.randn(9, 15, dtype=DT), None, f, 1.0,
                               LF.Rows(((5, 14),), 24))


def test_rows_must_fit() -> None:
    with pytest.raises(ValueError, match="within"):
        LF.Rows(((0, 30),), 24)


# ---------------------------------------------------------------------------------------- layers
def split_layers(pieces: dict[str, tuple[tuple[int, int], ...]], f: dict[str, Tensor], scale: float,
                 in_features: int = 15, height: int = 24, seed: int = 3) -> dict[str, Linear]:
    """One nn.Linear per piece, wrapped, sharing the same factor Parameters (as the loader does)."""
    torch.manual_seed(seed)
    shared = {k: nn.Parameter(v.clone()) for k, v in f.items()}
    out: dict[str, Linear] = {}
    for name, p in pieces.items():
        rows = LF.Rows(p, height)
        layer = Linear(nn.Linear(in_features, rows.out, dtype=DT))
        layer.base_layer.requires_grad_(False)
        layer.set_adapter_tensors("a", dict(shared), scale, rows=rows, origin="block.qkv")
        layer.set_adapter(["a"])
        out[name] = layer
    return out


QKV = {"q": ((0, 8),), "k": ((8, 16),), "v": ((16, 24),)}
LINEAR1 = {"q": ((0, 5),), "k": ((5, 10),), "v": ((10, 15),), "mlp": ((15, 24),)}  # off block edges


@pytest.mark.parametrize("split", [QKV, LINEAR1], ids=["qkv aligned", "linear1 off edges"])
@pytest.mark.parametrize("mode", ["auto", "merged", "bypass"])
def test_split_layers_compute_the_fused_adapter(split: dict, mode: str) -> None:
    f = factors(6, 4, 3, 5, 0, 2, seed=4)
    layers = split_layers(split, f, 0.5)
    delta = fused_delta(f, 0.5)
    x = torch.randn(2, 7, 15, dtype=DT)
    for name, layer in layers.items():
        layer.forward_mode = mode
        want = nn.functional.linear(x, layer.weight + pieces_of(delta, split[name]), layer.bias)
        with torch.no_grad():
            assert torch.allclose(layer(x), want), name
            layer.eval()
            assert torch.allclose(layer(x), want), name  # reused W + ΔW
            assert torch.allclose(layer(x), want), name


@pytest.mark.parametrize("split", [QKV, LINEAR1], ids=["qkv aligned", "linear1 off edges"])
@pytest.mark.parametrize("mode", ["auto", "merged", "bypass"])
def test_training_through_the_pieces_reaches_one_set_of_factors(split: dict, mode: str) -> None:
    """The pieces' factors are the same Parameters: a loss over all pieces gives them the gradient the
    fused layer would (computed here with the fused weight cut by hand)."""
    f = factors(6, 4, 3, 5, 2, 2, seed=5)
    layers = split_layers(split, f, 0.5)
    params = {id(p): p for layer in layers.values() for p in layer.factors("a").values()}
    assert len(params) == len(f)  # shared, not copied
    x = torch.randn(2, 7, 15, dtype=DT, requires_grad=True)
    targets = {n: torch.randn(2, 7, layer.weight.shape[0], dtype=DT) for n, layer in layers.items()}
    loss = 0
    for name, layer in layers.items():
        layer.forward_mode = mode
        loss = loss + ((layer(x) - targets[name]) ** 2).mean()
    loss.backward()
    ref_f = {k: v.detach().clone().requires_grad_() for k, v in layers["q"].factors("a").items()}
    xr = x.detach().clone().requires_grad_()
    delta = fused_delta(ref_f, 0.5)
    ref_loss = 0
    for name, layer in layers.items():
        y = nn.functional.linear(xr, layer.weight + pieces_of(delta, split[name]), layer.bias)
        ref_loss = ref_loss + ((y - targets[name]) ** 2).mean()
    ref_loss.backward()
    assert torch.allclose(loss, ref_loss)
    for k, p in layers["q"].factors("a").items():
        assert torch.allclose(p.grad, ref_f[k].grad), k
    assert torch.allclose(x.grad, xr.grad)


@pytest.mark.parametrize("split", [QKV, LINEAR1], ids=["qkv aligned", "linear1 off edges"])
def test_fuse_and_unfuse_each_piece(split: dict) -> None:
    f = factors(6, 4, 3, 5, 0, 2, seed=6)
    layers = split_layers(split, f, 0.5)
    delta = fused_delta(f, 0.5)
    for name, layer in layers.items():
        before = layer.weight.detach().clone()
        layer.merge(scale=0.8)
        assert torch.allclose(layer.weight, before + 0.8 * pieces_of(delta, split[name]))
        x = torch.randn(3, 15, dtype=DT)
        with torch.no_grad():
            assert torch.allclose(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
        layer.unmerge()
        assert torch.equal(layer.weight, before)


def test_dora_output_axis_per_piece() -> None:
    """An output-axis dora_scale (rows of the fused magnitude) works piece by piece: the fused DoRA weight
    is normalised per row, so each piece's rows are the fused weight's."""
    f = factors(6, 4, 3, 5, 0, 2, seed=7)
    torch.manual_seed(8)
    fused_w = torch.randn(24, 15, dtype=DT)
    m = torch.rand(24, 1, dtype=DT) + 0.5
    merged = fused_w + fused_delta(f, 0.5)
    want = merged * m / (merged.norm(dim=1, keepdim=True) + torch.finfo(DT).eps)
    for p in LINEAR1.values():
        rows = LF.Rows(p, 24)
        base = nn.Linear(15, rows.out, bias=False, dtype=DT)
        with torch.no_grad():
            base.weight.copy_(pieces_of(fused_w, p))
        layer = Linear(base)
        layer.set_adapter_tensors("a", {k: v.clone() for k, v in f.items()}, 0.5, rows=rows,
                                  dora_scale=pieces_of(m, p))
        layer.set_adapter(["a"])
        x = torch.randn(2, 15, dtype=DT)
        with torch.no_grad():
            assert torch.allclose(layer(x), x @ pieces_of(want, p).t())
        layer.merge()
        assert torch.allclose(layer.weight, pieces_of(want, p))


def test_rows_that_do_not_fit_the_layer_are_refused() -> None:
    layer = Linear(nn.Linear(15, 8, dtype=DT))
    with pytest.raises(ValueError, match="row pieces"):
        layer.set_adapter_tensors("a", factors(6, 4, 3, 5), 1.0, rows=LF.Rows(((0, 9),), 24))
    with pytest.raises(ValueError, match=r"does not divide|does not fit"):
        layer.set_adapter_tensors("a", factors(5, 4, 3, 5), 1.0, rows=LF.Rows(((0, 8),), 24))


def test_delete_forgets_rows() -> None:
    layers = split_layers(QKV, factors(6, 4, 3, 5), 1.0)
    q = layers["q"]
    assert q.origins == {"a": "block.qkv"} and q.rows["a"].pieces == ((0, 8),)
    q.delete_adapter("a")
    assert not q.rows and not q.origins
