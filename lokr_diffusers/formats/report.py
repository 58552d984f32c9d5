"""Plain-words reports on files that do not fit: unmatched keys, and which model family a file is for.

The family is read off the file's structure, never its metadata, by the signs each family's record holds
(lokr_diffusers/families/: `Detection`): its module names tell the kind of model (families.of_file); among the
families of one denoiser class (SD1.x / SD2.x / SDXL), names and widths read off the factor shapes tell which
(`file_base`: the cross-attention width of an `attn2.to_k`, a text encoder's width, a 1x1-conv projection).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from .. import families
from .. import functional as LF
from ..families import FAMILIES, Sign

KeysOrStateDict = Sequence[str] | Mapping[str, Tensor]
_LEAVES = frozenset((*LF.FACTOR_NAMES, "alpha", "dora_scale", "scale", "lokr_scale", "weight"))


@dataclass
class BaseGuess:
    """The families a file can be for among those of one denoiser class (("sd1", "sd2") when its names fit both and
    its widths say nothing), () when nothing says or the signs contradict each other; and why, in words."""

    families: tuple[str, ...]
    evidence: list[str] = field(default_factory=list)

    @property
    def base(self) -> str | None:
        """The one family the file is for, None when it may be several or none."""
        return self.families[0] if len(self.families) == 1 else None


def _titles(names: Iterable[str], sep: str) -> str:
    wanted = set(names)
    return sep.join(f.title for f in FAMILIES.values() if f.name in wanted)


@functools.cache
def _base_signs() -> list[tuple[Sign, re.Pattern[str], frozenset[str]]]:
    return [(s, re.compile(s.pattern), frozenset(names)) for s, names in families.signs("base")]


def _group(name: str) -> frozenset[str]:
    """The families of `name`'s denoiser class whose files have the same names (SD1.x and SD2.x): its name signs
    cannot tell them apart, so a width that contradicts another only leaves the group."""
    own = FAMILIES[name]
    names = {s for s in own.detect.base if not s.shape}
    return frozenset(f.name for f in FAMILIES.values() if f.denoiser_class == own.denoiser_class
                     and {s for s in f.detect.base if not s.shape} == names)


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


def _shape_signs(sd: Mapping[str, Tensor]) -> list[tuple[frozenset[str], str]]:
    """(families, evidence) from factor shapes: the first module fitting each pattern's signs."""
    signs = [item for item in _base_signs() if item[0].shape]
    found: dict[str, tuple[frozenset[str], str]] = {}
    for module, f in _modules(sd).items():
        for sign, pattern, holders in signs:
            if sign.pattern in found or not pattern.search(module):
                continue
            if (sign.in_width is not None and _in_dim(f) == sign.in_width) or \
                    (sign.conv and any(t.dim() == 4 for t in f.values())):
                found[sign.pattern] = (holders, f"{sign.words} ({module})")
    return list(found.values())


def file_base(keys_or_state_dict: KeysOrStateDict) -> BaseGuess:
    """The families a LoKr file is for among those of one denoiser class (SD1.x, SD2.x, SDXL), from its names and
    (given tensors) its factor widths: the signs must point to one group of families with the same names; within
    it, the families every sign names (the whole group when widths contradict each other)."""
    keys = list(keys_or_state_dict)
    hits: list[tuple[frozenset[str], str]] = []
    for sign, pattern, holders in _base_signs():
        hit = next((k for k in keys if pattern.search(k)), None) if not sign.shape else None
        if hit is not None:
            module, _, leaf = hit.rpartition(".")
            hits.append((holders, f"{sign.words} ({module if leaf in _LEAVES else hit})"))
    if isinstance(keys_or_state_dict, Mapping):
        hits += _shape_signs(keys_or_state_dict)
    evidence = [e for _, e in hits]
    groups = {_group(name) for holders, _ in hits for name in holders}
    if len(groups) != 1:  # nothing, or signs that contradict each other
        return BaseGuess((), evidence)
    (group,) = groups
    found = group.intersection(*(holders for holders, _ in hits)) or group
    return BaseGuess(tuple(f for f in FAMILIES if f in found), evidence)


def family_hint(keys: KeysOrStateDict, comps: Mapping[str, nn.Module]) -> str:
    """A sentence naming the model family a file is for when it is not the pipeline's, or ''."""
    found, evidence = families.of_file(list(keys))
    pipe = [f.name for f in families.candidates(comps)]
    classes = {FAMILIES[f].denoiser_class for f in found}
    # names shared by more than FLUX.1, FLUX.2 and Chroma (their stream blocks' names) say too little to name one
    if not evidence or not pipe or set(pipe) & set(found) or len(classes) > 3:
        return ""
    name = _titles(found, " / ")
    return (f" This file looks like a {name} LoKr (it has {'; '.join(evidence[:2])}); the pipeline "
            f"is {_titles(pipe, ' / ')}. Load it into a {name} pipeline.")


def base_hint(keys_or_state_dict: KeysOrStateDict, comps: Mapping[str, nn.Module]) -> str:
    """A sentence saying the file is for another base model, or '' when nothing says so.

    Pass the state dict (not only its keys) to let factor widths tell SD1.x from SD2.x and speak
    when names are silent. Call it on any shape or key mismatch between a file and a pipeline.
    """
    family = family_hint(keys_or_state_dict, comps)
    pipe = [f.name for f in families.candidates(comps)]
    if family or not any(FAMILIES[f].detect.base for f in pipe):
        return family
    guess = file_base(keys_or_state_dict)
    if not guess.families or set(guess.families) & set(pipe):
        return ""
    file_name, pipe_name = _titles(guess.families, "/"), _titles(pipe, "/")
    why = "; ".join(guess.evidence[:3])
    return (f" This file looks like an {file_name} LoKr; the pipeline is {pipe_name} (the file has {why}). "
            f"Load it into an {file_name} pipeline, or use a LoKr trained for {pipe_name}.")


def _factorless(unmatched: Sequence[str], all_keys: KeysOrStateDict) -> list[str]:
    """Modules of `unmatched` keys that hold no LoKr factor at all (an alpha or dora_scale alone)."""
    with_factors = {k.rpartition(".")[0] for k in all_keys if k.rpartition(".")[2] in LF.FACTOR_NAMES}
    modules = dict.fromkeys(k.rpartition(".")[0] for k in unmatched)
    return [m for m in modules if m not in with_factors]


def _not_adapted(unmatched: Sequence[str], comps: Mapping[str, nn.Module]) -> str:
    """A sentence per `ModelFamily.not_adapted` sign of the pipeline's families that unmatched keys fit, or ''."""
    out = ""
    for sign in dict.fromkeys(s for f in families.candidates(comps) for s in f.not_adapted):
        hits = [k for k in unmatched if re.search(sign.pattern, k)]
        if hits:
            out += (f" {len(hits)} of these keys ({hits[0].rpartition('.')[0]}, ...) are for {sign.words}, which "
                    "lokr_diffusers does not adapt, so they cannot be loaded.")
    return out


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
            f"{', '.join(comps)}: {shown}{more}.{why}{_not_adapted(unmatched, comps)}{base_hint(all_keys, comps)}")
