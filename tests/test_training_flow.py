"""Flow-matching training for Flux.1 and SD3 (training/flow.py, the _flux / _sd3 scripts) on tiny offline
pipelines (tests/helpers/tiny_dit.py): the prompt encoders equal the pipelines' own, the loss on a
fixed set goes down, a resumed run ends where an uninterrupted one does, and the files load again.

"Loss goes down" is measured deterministically: the flow loss on the fixed training set with fixed
noise and timesteps, for the base pipeline and for a fresh pipeline that loads the trained file.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from helpers.flow_loss import eval_flow_loss, flow_args, image_batch
from helpers.tiny_dit import make_flux_pipeline, make_sd3_pipeline

from lokr_diffusers import LoKrConfig, LoKrModel
from lokr_diffusers.training.data import make_synthetic_dataset
from lokr_diffusers.training.flow import encode_flux, encode_sd3, flow_loss

CAPTIONS = ["a photo of sks dog", "a red cat"]
CPU = torch.device("cpu")


def test_flux_prompt_encoding_equals_the_pipelines() -> None:
    pipe = make_flux_pipeline()
    ours = encode_flux(pipe, CAPTIONS, 16, CPU)
    theirs = pipe.encode_prompt(CAPTIONS, device=CPU, max_sequence_length=16)
    for a, b in zip(ours, theirs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("t5", [True, False], ids=["t5", "no_t5"])
def test_sd3_prompt_encoding_equals_the_pipelines(t5: bool) -> None:
    pipe = make_sd3_pipeline(t5=t5)
    embeds, pooled = encode_sd3(pipe, CAPTIONS, 16, CPU, pipe.transformer.config.joint_attention_dim)
    want, _, want_pooled, _ = pipe.encode_prompt(CAPTIONS, CAPTIONS, CAPTIONS, device=CPU,
                                                 do_classifier_free_guidance=False, max_sequence_length=16)
    torch.testing.assert_close(embeds, want, rtol=0, atol=0)
    torch.testing.assert_close(pooled, want_pooled, rtol=0, atol=0)


@pytest.mark.parametrize(("family", "kw"), [("flux", {}), ("sd3", {}), ("sd3", {"precondition_outputs": 0}),
                                            ("flux", {"weighting_scheme": "mode"})],
                         ids=["flux", "sd3", "sd3-v-target", "flux-mode"])
def test_flow_loss_trains_the_transformer_adapter(tmp_path, family: str, kw: dict) -> None:
    """A few optimizer steps on the flow loss lower it on the fixed set, and the same generator gives the same
    loss (every draw comes from it)."""
    pipe = make_flux_pipeline() if family == "flux" else make_sd3_pipeline()
    batch = image_batch(make_synthetic_dataset(str(tmp_path / "d"), n=4, size=32))
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    before = eval_flow_loss(pipe, family, batch, **kw)
    same = [flow_loss(pipe, scheduler, batch, flow_args(family, **kw), family, torch.Generator().manual_seed(5),
                      torch.float32, CPU).item() for _ in range(2)]
    assert same[0] == same[1]
    pipe.transformer.requires_grad_(False)
    LoKrModel(pipe.transformer, LoKrConfig(r=4, alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]),
              "a")
    params = [p for p in pipe.transformer.parameters() if p.requires_grad]
    assert params
    opt = torch.optim.AdamW(params, lr=1e-2)
    for step in range(12):
        loss = flow_loss(pipe, scheduler, batch, flow_args(family, **kw), family,
                         torch.Generator().manual_seed(100 + step), torch.float32, CPU)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert eval_flow_loss(pipe, family, batch, **kw) < before
