"""Plain-words reports on files that do not fit: unmatched keys, and which base model a file is for.

The base model is read off the file's structure, never its metadata:
- names: a second text encoder (`lora_te2_`, `text_encoder_2.`, `clip_g`), SDXL's added embedding
  (`label_emb`, `add_embedding`), transformer stacks deeper than one block, ldm block numbers only
  one of the two UNet layouts has (SDXL has no attention in input block 1 nor output blocks 6-11);
- widths read from factor shapes (in = in_m · in_n): the cross-attention width of an `attn2.to_k`
  (768 SD1.x, 1024 SD2.x, 2048 SDXL) and a text encoder's width (1024 SD2.x, 1280 SDXL's second);
- a 1x1-conv `proj_in` / `proj_out` (4-D factor): only SD1.x has conv projections.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from .. import functional as LF
from ..architectures import BASE_NAMES, CROSS_ATTENTION_DIM, TEXT_ENCODER_WIDTH

BASES = BASE_NAMES  # kept for callers of the old name
KeysOrStateDict = Sequence[str] | Mapping[str, Tensor]

# (compiled name pattern, base it points to, what it is in words)
_NAME_SIGNS: tuple[tuple[re.Pattern[str], str, str], ...] = (
    (re.compile(r"lora_te2_|text_encoder_2\.|clip_g"), "sdxl", "a second text encoder"),
    (re.compile(r"label_emb|add_embedding"), "sdxl", "SDXL's added embedding"),
    (re.compile(r"transformer_blocks[._][1-9]"), "sdxl", "transformer stacks deeper than one block"),
    (re.compile(r"output_blocks[._][0-2][._]1[._](transformer_blocks|proj_in|proj_out|norm)"), "sdxl",
     "attention in ldm output blocks 0-2"),
    (re.compile(r"down_blocks[._]0[._]attentions|down_blocks[._]3[._]|up_blocks[._]3[._]attentions"), "sd1/2",
     "the SD1.x/SD2.x UNet's block layout"),
    (re.compile(r"input_blocks[._][12][._]1[._]|output_blocks[._]([6-9]|1[01])[._]1[._]"), "sd1/2",
     "attention in ldm blocks SDXL does not have"),
    (re.compile(r"^lora_te_"), "sd1/2", "one text encoder (kohya's lora_te_; SDXL files have lora_te1_/lora_te2_)"),
)
_LEAVES = frozenset((*LF.FACTOR_NAMES, "alpha", "dora_scale", "scale", "lokr_scale", "weight"))
_TO_K = re.compile(r"attn2[._]to_k$")
_TE_Q = re.compile(r"(lora_te[12]?_|text_encoder(_2)?\.|text_encoders\.).*self_attn[._]q_proj$")
_PROJ = re.compile(r"[._]proj_(in|out)$")


@dataclass
class BaseGuess:
    """Which base a file is for ("sd1" | "sd2" | "sdxl" | "sd1/2" | None) and why, in words."""

    base: str | None
    evidence: list[str] = field(default_factory=list)


def _modules(sd: Mapping[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    out: dict[str, dict[str, Tensor]] = {}
    for key, tensor in sd.items():
        module, _, leaf = key.rpartition(".")
        if leaf in LF.FACTOR_NAMES and isinstance(tensor, Tensor):
            out.setdefault(module, {})[leaf] = tensor
    return out


def _in_dim(f: Mapping[str, Tensor]) -> int | None:
    """A linear module's input width from its factors (in_m · in_n), None when they do not say."""
    w1 = f.get("lokr_w1", f.get("lokr_w1_b"))
    w2 = f.get("lokr_w2", f.get("lokr_w2_b"))
    if w1 is None or w2 is None or w1.dim() != 2 or w2.dim() != 2 or "lokr_t2" in f:
        return None
    return int(w1.shape[1]) * int(w2.shape[1])


def _width_signs(sd: Mapping[str, Tensor]) -> list[tuple[str, str]]:
    """(base, evidence) from factor shapes, the first module of each kind."""
    found: dict[str, tuple[str, str]] = {}
    for module, f in _modules(sd).items():
        if "to_k" not in found and _TO_K.search(module) and (dim := _in_dim(f)) in CROSS_ATTENTION_DIM:
            found["to_k"] = (CROSS_ATTENTION_DIM[dim], f"cross-attention width {dim} ({module})")
        elif "te" not in found and _TE_Q.search(module) and (dim := _in_dim(f)) in TEXT_ENCODER_WIDTH:
            found["te"] = (TEXT_ENCODER_WIDTH[dim], f"text-encoder width {dim} ({module})")
        elif "proj" not in found and _PROJ.search(module) and any(t.dim() == 4 for t in f.values()):
            found["proj"] = ("sd1", f"a 1x1-conv proj_in/proj_out, which only SD1.x has ({module})")
    return list(found.values())


def file_base(keys_or_state_dict: KeysOrStateDict) -> BaseGuess:
    """The base model a LoKr file is for, from its names and (given tensors) its factor widths."""
    keys = list(keys_or_state_dict)
    signs: list[tuple[str, str]] = []
    for pattern, base, words in _NAME_SIGNS:
        hit = next((k for k in keys if pattern.search(k)), None)
        if hit is not None:
            module, _, leaf = hit.rpartition(".")
            signs.append((base, f"{words} ({module if leaf in _LEAVES else hit})"))
    if isinstance(keys_or_state_dict, Mapping):
        signs += _width_signs(keys_or_state_dict)
    families = {"sdxl" if b == "sdxl" else "sd1/2" for b, _ in signs}
    if len(families) != 1:  # nothing, or signs that contradict each other
        return BaseGuess(None, [e for _, e in signs])
    exact = {b for b, _ in signs if b in ("sd1", "sd2")}
    base = "sdxl" if families == {"sdxl"} else (exact.pop() if len(exact) == 1 else "sd1/2")
    return BaseGuess(base, [e for _, e in signs])


def guess_file_base(keys: KeysOrStateDict) -> str | None:
    """"sdxl", "sd1/2" or None from the file's names (and widths, given a state dict)."""
    base = file_base(keys).base
    return base if base in (None, "sdxl") else "sd1/2"


def pipeline_base(comps: Mapping[str, nn.Module]) -> str | None:
    """"sd1" | "sd2" | "sdxl" by the UNet's cross-attention width; for models of other widths
    (tiny test pipelines), "sdxl" with a second text encoder, else "sd1/2"."""
    unet = comps.get("unet")
    dim = getattr(getattr(unet, "config", None), "cross_attention_dim", None)
    if isinstance(dim, int) and dim in CROSS_ATTENTION_DIM:
        return CROSS_ATTENTION_DIM[dim]
    if not comps:
        return None
    return "sdxl" if "text_encoder_2" in comps else "sd1/2"


def _conflict(file: str, pipe: str) -> bool:
    if file == pipe:
        return False
    if "sdxl" in (file, pipe):
        return True
    return "sd1/2" not in (file, pipe)  # sd1 vs sd2


# DiT families and the Stable Diffusion UNets, told apart by module names alone (either naming: original
# or diffusers). Each sign narrows the candidates; a file is named when one family is left.
FAMILY_NAMES: dict[str, str] = {"flux": "FLUX.1", "flux2": "FLUX.2", "sd3": "SD3 / SD3.5", "zimage": "Z-Image",
                                "sd": "Stable Diffusion (UNet)"}
_FAMILY_SIGNS: tuple[tuple[re.Pattern[str], frozenset[str], str], ...] = (
    (re.compile(r"(img|txt)_mod[._]lin|single_blocks[._]\d+[._]modulation|vector_in|"
                r"single_transformer_blocks[._]\d+[._]proj_mlp"), frozenset({"flux"}), "FLUX.1's modulation / MLP"),
    (re.compile(r"double_stream_modulation|single_stream_modulation|to_qkv_mlp_proj|ff(_context)?[._]linear_in|"
                r"time_guidance_embed"), frozenset({"flux2"}), "FLUX.2's global modulation / fused single blocks"),
    (re.compile(r"double_blocks|single_blocks|single_transformer_blocks"), frozenset({"flux", "flux2"}),
     "double / single stream blocks"),
    (re.compile(r"joint_blocks|x_block|context_block|y_embedder"), frozenset({"sd3"}), "MMDiT joint blocks"),
    (re.compile(r"noise_refiner|context_refiner|feed_forward[._]w[123]|cap_embedder|all_x_embedder"),
     frozenset({"zimage"}), "Z-Image's refiners / feed-forward"),
    (re.compile(r"down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block"), frozenset({"sd"}),
     "UNet blocks"),
)


def file_family(keys: KeysOrStateDict) -> tuple[frozenset[str], list[str]]:
    """(the families a file can be for by its module names, evidence); all of FAMILY_NAMES when no name
    says anything. FLUX.1 and FLUX.2 share most original names: a file may fit both."""
    candidates = frozenset(FAMILY_NAMES)
    evidence: list[str] = []
    for pattern, families, words in _FAMILY_SIGNS:
        hit = next((k for k in keys if pattern.search(k)), None)
        if hit is not None and candidates & families:
            candidates &= families
            evidence.append(f"{words} ({hit.rpartition('.')[0] or hit})")
    return candidates, evidence


def pipeline_family(comps: Mapping[str, nn.Module]) -> str | None:
    """The pipeline's family: its transformer's (formats/dit.py), "sd" with a UNet, else None."""
    from .dit import family_of

    transformer = comps.get("transformer")
    family = family_of(transformer) if transformer is not None else None
    if family is not None:
        return family.name
    return "sd" if "unet" in comps else None


def family_hint(keys: KeysOrStateDict, comps: Mapping[str, nn.Module]) -> str:
    """A sentence naming the model family a file is for when it is not the pipeline's, or ''."""
    families, evidence = file_family(list(keys))
    pipe = pipeline_family(comps)
    if not evidence or pipe is None or pipe in families or len(families) > 2:
        return ""
    name = " / ".join(FAMILY_NAMES[f] for f in sorted(families))
    return (f" This file looks like a {name} LoKr (it has {'; '.join(evidence[:2])}); the pipeline "
            f"is {FAMILY_NAMES[pipe]}. Load it into a {name} pipeline.")


def base_hint(keys_or_state_dict: KeysOrStateDict, comps: Mapping[str, nn.Module]) -> str:
    """A sentence saying the file is for another base model, or '' when nothing says so.

    Pass the state dict (not only its keys) to let factor widths tell SD1.x from SD2.x and speak
    when names are silent. Call it on any shape or key mismatch between a file and a pipeline.
    """
    family = family_hint(keys_or_state_dict, comps)
    if family or "unet" not in comps:
        return family
    guess, pipe = file_base(keys_or_state_dict), pipeline_base(comps)
    if guess.base is None or pipe is None or not _conflict(guess.base, pipe):
        return ""
    file_name, pipe_name = BASE_NAMES[guess.base], BASE_NAMES[pipe]
    why = "; ".join(guess.evidence[:3])
    return (f" This file looks like an {file_name} LoKr; the pipeline is {pipe_name} (the file has {why}). "
            f"Load it into an {file_name} pipeline, or use a LoKr trained for {pipe_name}.")


def _factorless(unmatched: Sequence[str], all_keys: KeysOrStateDict) -> list[str]:
    """Modules of `unmatched` keys that hold no LoKr factor at all (an alpha or dora_scale alone)."""
    with_factors = {k.rpartition(".")[0] for k in all_keys if k.rpartition(".")[2] in LF.FACTOR_NAMES}
    modules = dict.fromkeys(k.rpartition(".")[0] for k in unmatched)
    return [m for m in modules if m not in with_factors]


def unmatched_message(unmatched: Sequence[str], all_keys: KeysOrStateDict, comps: Mapping[str, nn.Module]) -> str:
    """Which keys fit nothing, why where we can tell, and which base the file is for."""
    shown = ", ".join(unmatched[:5])
    more = f" and {len(unmatched) - 5} more" if len(unmatched) > 5 else ""
    lonely = _factorless(unmatched, all_keys)
    why = ""
    if lonely:
        why = (f" {len(lonely)} of these modules have no LoKr factors, only alpha/dora_scale ({', '.join(lonely[:3])}"
               f"{' ...' if len(lonely) > 3 else ''}): every module needs W1 (lokr_w1 or lokr_w1_a/_b) and W2.")
    return (f"{len(unmatched)} of {len(all_keys)} keys match no module of the pipeline's "
            f"{', '.join(comps)}: {shown}{more}.{why}{base_hint(all_keys, comps)}")
