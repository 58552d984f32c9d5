"""Valid LoKr files of a source pipeline and the bad inputs made from them, and the state a failed load must
leave, for the reliability catalogue of reading files (tests/test_reliability_loads.py,
tests/test_reliability_arguments.py).

`build_env()` makes the source pipelines (add_lokr), writes their valid files with tests/helpers/writers.py
(SD1 kohya, SDXL kohya ldm, SD1 UNet in PEFT's saved layout) and records the state of fresh SD1 / SDXL pipelines;
`pipeline_state` / `assert_same_state` say that nothing changed (every parameter and buffer bit-identical, no
module replaced, no requires_grad flag moved, no LoKr adapter registered), `digest` that no file did.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from helpers.writers import write_adapter
from lokr_diffusers import LoKrConfig, add_lokr
from lokr_diffusers.tiny import make_sd_pipeline, make_sdxl_pipeline

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1"]
TO_Q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"  # a Linear the source adapts
KOHYA_TO_Q = "lora_unet_" + TO_Q.replace(".", "_")
NAN, INF = float("nan"), float("inf")


def _source(sdxl: bool):
    pipe = make_sdxl_pipeline(0) if sdxl else make_sd_pipeline(0)
    configs = {"unet": LoKrConfig(r=2, alpha=4.0, target_modules=UNET_TARGETS, init_weights=False),
               "text_encoder": LoKrConfig(r=2, alpha=2.0, init_weights=False)}
    if sdxl:
        configs["text_encoder_2"] = LoKrConfig(r=2, alpha=2.0, init_weights=False)
    add_lokr(pipe, configs, "src")
    return pipe


def _components(pipe) -> dict[str, torch.nn.Module]:
    return {c: getattr(pipe, c) for c in ("unet", "text_encoder", "text_encoder_2", "vae")
            if getattr(pipe, c, None) is not None}


def pipeline_state(pipe) -> dict[str, Any]:
    """Everything a failed load must leave as it was."""
    out: dict[str, Any] = {}
    for c, model in _components(pipe).items():
        out[c] = ([(n, type(m), id(m)) for n, m in model.named_modules()],
                  {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
                  {n: p.requires_grad for n, p in model.named_parameters()})
    return out


def assert_same_state(before: dict[str, Any], pipe) -> None:
    after = pipeline_state(pipe)
    assert after.keys() == before.keys()
    for c, (modules, tensors, grads) in before.items():
        assert after[c][0] == modules, f"{c}: the module tree changed"
        assert after[c][1].keys() == tensors.keys(), f"{c}: parameters were added or removed"
        changed = [k for k, v in tensors.items() if not torch.equal(after[c][1][k], v)]
        assert not changed, f"{c}: {changed[:3]} changed"
        assert after[c][2] == grads, f"{c}: requires_grad flags changed"
    assert pipe.get_list_lokr_adapters() == {}


def digest(path: str | Path) -> Any:
    """Bytes of a file (sha256), or of every file under a folder; None when absent."""
    p = Path(path)
    if p.is_file():
        return hashlib.sha256(p.read_bytes()).hexdigest()
    if p.is_dir():
        return {str(f.relative_to(p)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(p.rglob("*"))
                if f.is_file()}
    return None


@dataclass
class Env:
    sd_pipe: Any
    xl_pipe: Any
    sd_state: dict[str, Any]
    xl_state: dict[str, Any]
    good: dict[str, Tensor]  # SD1 kohya layout
    sdxl: dict[str, Tensor]  # SDXL kohya (ldm) layout
    peft: dict[str, Tensor]  # SD1 UNet in PEFT's saved layout (no alpha)
    peft_config: dict[str, Any] = field(default_factory=dict)


def build_env() -> Env:
    """The valid files and the fresh pipelines (a test module's `env` fixture, built once per module)."""
    src, src_xl = _source(False), _source(True)
    unet_keys = {k: v for k, v in write_adapter(src, "src", "diffusers", components=("unet",)).items()}
    peft = {"base_model.model." + k[len("unet."):]: v for k, v in unet_keys.items() if not k.endswith(".alpha")}
    sd_pipe, xl_pipe = make_sd_pipeline(0), make_sdxl_pipeline(0)
    return Env(sd_pipe, xl_pipe, pipeline_state(sd_pipe), pipeline_state(xl_pipe), write_adapter(src, "src", "kohya"),
               write_adapter(src_xl, "src", "kohya_ldm"), peft,
               {"peft_type": "LOKR", "r": 2, "alpha": 4.0, "target_modules": UNET_TARGETS})


# --------------------------------------------------------------------------------- bad-file makers
def save_sd(tmp: Path, sd: dict[str, Tensor], name: str = "style.safetensors", metadata: dict | None = None) -> str:
    path = tmp / name
    save_file(sd, str(path), metadata=metadata)
    return str(path)


def altered(tmp: Path, env: Env, change: Callable[[bytes], bytes], name: str = "style.safetensors") -> str:
    """A copy of the valid SD1 file with its bytes changed by `change`."""
    data = Path(save_sd(tmp, env.good, "valid.safetensors")).read_bytes()
    path = tmp / name
    path.write_bytes(change(data))
    return str(path)


def first_key(env: Env, leaf: str) -> str:
    return next(k for k in env.good if k.endswith("." + leaf))


def edit(env: Env, key_of: Callable[[Env], str], value: Callable[[Tensor], Any]) -> dict[str, Any]:
    sd = dict(env.good)
    key = key_of(env)
    sd[key] = value(sd[key])
    return sd


def peft_folder(tmp: Path, env: Env, config: Any = "default", weights: dict[str, Tensor] | None = None) -> str:
    folder = tmp / "peft_adapter"
    folder.mkdir()
    save_file(weights if weights is not None else env.peft, str(folder / "adapter_model.safetensors"))
    if config is not None:
        if config == "default":
            config = env.peft_config
        text = config if isinstance(config, (str, bytes)) else json.dumps(config)
        (folder / "adapter_config.json").write_bytes(text.encode() if isinstance(text, str) else text)
    return str(folder)


def lora_only(env: Env) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for name in ("lora_unet_down_blocks_1_attentions_0_proj_out", "lora_te_text_model_encoder_layers_0_mlp_fc1"):
        out[f"{name}.lora_down.weight"] = torch.randn(2, 32, generator=g)
        out[f"{name}.lora_up.weight"] = torch.randn(32, 2, generator=g)
        out[f"{name}.alpha"] = torch.tensor(2.0)
    return out
