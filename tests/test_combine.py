"""`combine_lokr` / `lokr-diffusers combine`: LoKr files summed per module at their weights and fitted as one LoKr
(error = the optimum of the summed change, tests/helpers/kron_oracle.py), or kept lossless as several adapters;
reference: the same files loaded and fused by this package's own fuse."""

from __future__ import annotations

import os

import pytest
import torch
from diffusers import DiffusionPipeline
from helpers.adapter_files import fused_weights, lokr_files, weights_of
from helpers.kron_oracle import optimum_error

from lokr_diffusers.cli import main
from lokr_diffusers.tools.combine import combine_lokr


def _changes(base: str, files: list[str], weights: list[float]) -> dict[str, torch.Tensor]:
    bare = weights_of(DiffusionPipeline.from_pretrained(base))
    fused = fused_weights(base, files, weights)
    return {k: fused[k] - bare[k] for k in fused if not torch.equal(fused[k], bare[k])}


def _loaded(base: str, path: str) -> dict[str, torch.Tensor]:
    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.load_lokr_weights(path)
    pipe.fuse_lokr()
    bare = weights_of(DiffusionPipeline.from_pretrained(base))
    return {k: v - bare[k] for k, v in weights_of(pipe).items()}


@pytest.mark.parametrize("family", ["sd1", pytest.param("flux", marks=pytest.mark.slow)])
def test_the_weighted_sum_is_fitted_with_the_optimum_error_and_loads_as_reported(tmp_path: str, family: str) -> None:
    base, files = lokr_files(str(tmp_path), family)
    out = os.path.join(tmp_path, "c.safetensors")
    report = combine_lokr(files, out, weights=[0.7, -0.4], model=base)
    want, got = _changes(base, files, [0.7, -0.4]), _loaded(base, out)
    by_key = {f"{m.component}.{m.path}.weight": m for m in report.modules}
    assert by_key.keys() == want.keys()
    for k, d in want.items():
        m = by_key[k]
        assert m.error == pytest.approx(optimum_error(d, m.split[0], m.split[2]), rel=1e-2, abs=1e-6), k
        err = float((got[k] - d).norm() / d.norm())
        assert err == pytest.approx(m.error, rel=1e-3, abs=1e-5), k
    assert 0 < report.error < 1


def test_one_file_at_weight_zero_leaves_the_other_exactly(tmp_path: str) -> None:
    """ΔA + 0 · ΔB is A's Kronecker product, in A's split (LyCORIS' default factor): it comes back exactly."""
    base, files = lokr_files(str(tmp_path), "sd1")
    out = os.path.join(tmp_path, "c.safetensors")
    report = combine_lokr(files, out, weights=[0.6, 0.0], model=base)
    assert report.modules and max(m.error for m in report.modules) < 1e-5
    assert report.skipped_unchanged > 0  # B's text-encoder modules: 0 · ΔB
    want, got = _changes(base, files[:1], [0.6]), _loaded(base, out)
    for k, d in want.items():
        torch.testing.assert_close(got[k], d, rtol=1e-5, atol=1e-6, msg=k)


def test_lossless_keeps_each_file_as_an_adapter(tmp_path: str) -> None:
    base, files = lokr_files(str(tmp_path), "flux")
    out = os.path.join(tmp_path, "c.safetensors")
    report = combine_lokr(files, out, weights=[0.7, -0.4], lossless=True, format="lokr_diffusers", model=base)
    assert report.error == 0
    pipe = DiffusionPipeline.from_pretrained(base)
    pipe.load_lokr_weights(out)
    pipe.fuse_lokr()
    bare = weights_of(DiffusionPipeline.from_pretrained(base))
    got = {k: v - bare[k] for k, v in weights_of(pipe).items()}
    for k, d in _changes(base, files, [0.7, -0.4]).items():
        torch.testing.assert_close(got[k], d, rtol=1e-6, atol=1e-7, msg=k)


def test_bad_combinations_are_refused_and_nothing_is_written(tmp_path: str) -> None:
    base, files = lokr_files(str(tmp_path), "sd1")
    out = os.path.join(tmp_path, "c.safetensors")
    with pytest.raises(ValueError, match="at least two"):
        combine_lokr(files[:1], out, model=base)
    with pytest.raises(ValueError, match="one finite weight per file"):
        combine_lokr(files, out, weights=[1.0], model=base)
    with pytest.raises(ValueError, match="lokr_diffusers"):
        combine_lokr(files, out, lossless=True, model=base)
    with pytest.raises(ValueError, match="cancel out"):
        combine_lokr([files[0], files[0]], out, weights=[1.0, -1.0], model=base)
    assert not os.path.exists(out)


def test_the_command_combines(tmp_path: str, capsys: pytest.CaptureFixture[str]) -> None:
    base, files = lokr_files(str(tmp_path), "sd1")
    out = os.path.join(tmp_path, "c.safetensors")
    assert main(["combine", *files, "--weights", "0.7", "-0.4", "--model", base, "--out", out]) == 0
    assert "total relative error" in capsys.readouterr().out
    lossless = os.path.join(tmp_path, "l.safetensors")
    assert main(["combine", *files, "--lossless", "--model", base, "--out", lossless]) == 0
    assert os.path.exists(lossless)
    assert main(["combine", files[0], "--out", os.path.join(tmp_path, "x.safetensors")]) == 2


@pytest.mark.parametrize("family", ["sd1", pytest.param("flux", marks=pytest.mark.slow)])
def test_a_lora_file_adds_its_change_as_diffusers_reads_it(tmp_path: str, family: str) -> None:
    """The second file as a LoRA (the LoKr converted at full rank, which diffusers loads as the LoKr): the combined
    fit is the two LoKr files' weighted sum fitted, error at the oracle's optimum, loading within the reported error;
    a LoRA file needs the model's folder and is not kept lossless."""
    from lokr_diffusers.tools.lora import lokr_to_lora

    base, files = lokr_files(str(tmp_path), family)
    lora = os.path.join(tmp_path, "b-lora.safetensors")
    lokr_to_lora(files[1], lora, model=base)
    out = os.path.join(tmp_path, "c.safetensors")
    report = combine_lokr([files[0], lora], out, weights=[0.7, -0.4], model=base)
    want, got = _changes(base, files, [0.7, -0.4]), _loaded(base, out)
    by_key = {f"{m.component}.{m.path}.weight": m for m in report.modules}
    assert by_key.keys() == want.keys()
    for k, d in want.items():
        m = by_key[k]
        assert m.error == pytest.approx(optimum_error(d, m.split[0], m.split[2]), rel=1e-2, abs=1e-5), k
        err = float((got[k] - d).norm() / d.norm())
        assert err == pytest.approx(m.error, rel=1e-3, abs=1e-5), k
    other = os.path.join(tmp_path, "x.safetensors")
    with pytest.raises(ValueError, match=r"LoRA file.*model"):
        combine_lokr([files[0], lora], other)
    with pytest.raises(ValueError, match=r"LoRA file.*lossless"):
        combine_lokr([files[0], lora], other, lossless=True, format="lokr_diffusers", model=base)
    assert not os.path.exists(other)
