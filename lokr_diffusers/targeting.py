"""Which modules a LoKrConfig targets, with PEFT's matching rules, and clear errors when it can't.

- target_modules as a list: a module matches if its full name equals an entry or ends with
  "." + entry; as a str: `re.fullmatch` on the full name.
- exclude_modules: the same rules, removing matches.
- layers_to_transform / layers_pattern: keep modules whose first `<pattern>.<idx>.` index is listed.
- rank_pattern / alpha_pattern keys: regexes tried in order with `(.*\\.)?(key)$`; first match wins.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from . import families
from .config import LoKrConfig, compile_pattern, pattern_regex, pattern_value

# Default targets of the text encoders by class name (attention + feed-forward, as kohya sd-scripts' LoRA networks
# target them: CLIPAttention / CLIPMLP, T5Attention / T5DenseGatedActDense). The denoisers' defaults are their
# families' (lokr_diffusers/families/: `targets`, or the Linears by `roles`).
CLIP_TEXT_TARGETS: list[str] = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
T5_TARGETS: list[str] = ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"]  # those the model has (wi: T5 v1.0)
LLM_TARGETS: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DEFAULT_TARGET_MODULES: dict[str, list[str]] = {
    "CLIPTextModel": CLIP_TEXT_TARGETS,
    "CLIPTextModelWithProjection": CLIP_TEXT_TARGETS,
    "T5EncoderModel": T5_TARGETS,
    "UMT5EncoderModel": T5_TARGETS,  # Wan's: T5's modules, per-layer relative attention
    "Qwen3Model": LLM_TARGETS,
    "Qwen3ForCausalLM": LLM_TARGETS,
}
# lists covering variants: keep the entries the model has
PRESENT_ONLY = frozenset({"T5EncoderModel", "UMT5EncoderModel"})

# A DiT family's Linears by role (ModelFamily.roles). Default: "attention" and "feed_forward" (single blocks'
# linear1 / linear2 are their pieces); "norms" (the adaLN projections) and "embedders" (input embedders, timestep /
# guidance / text embedders, final projection) on request.
DIT_DEFAULT_ROLES: tuple[str, ...] = ("attention", "feed_forward")


def _with_roles() -> str:
    return " / ".join(f.title for f in families.FAMILIES.values() if f.roles)


def dit_target_modules(model: nn.Module, norms: bool = False, embedders: bool = False) -> list[str]:
    """The full paths of a Flux.1 / Flux.2 / SD3 / Z-Image transformer's modules a LoKr targets by default
    (attention and feed-forward), plus the adaLN projections (`norms`) and the embedders / final projection
    (`embedders`) on request; modules diffusers' forward does not call (to_q beside a fused to_qkv) left
    out. Pass the result as `LoKrConfig(target_modules=...)`."""
    from .formats.dit import dit_name_map

    family = families.of_model(model)
    if family is None or not family.roles:
        raise ValueError(f"{type(model).__name__} is not a {_with_roles()} transformer")
    wanted = [*DIT_DEFAULT_ROLES, *(["norms"] if norms else []), *(["embedders"] if embedders else [])]
    pattern = re.compile("|".join(f"(?:{family.roles[r]})" for r in wanted))
    unused = set(dit_name_map(model).not_called)  # to_q beside a fused to_qkv the processor calls, and the reverse
    return [path for path, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d)) and pattern.fullmatch(path) and path not in unused]


def _is_block(module: nn.Module, suffixes: tuple[str, ...]) -> bool:
    """The module's class, or a class it derives from, is named with one of `suffixes` (diffusers' Attention,
    FluxAttention, MochiAttention, ...; FeedForward, ...): by name, so that no diffusers class is imported."""
    return any(cls.__name__.endswith(suffixes) for cls in type(module).__mro__)


def generic_target_modules(model: nn.Module) -> list[str]:
    """The full paths of the Linears inside the attention and feed-forward modules of any diffusers model (the
    default targets of a class no family names): every nn.Linear (or LoKr layer around one) below a module whose
    class is named "...Attention" (not an attention pooler) or "...FeedForward", the way every diffusers
    transformer builds its blocks. Empty when the model has none."""
    inside: list[str] = []  # paths of the attention / feed-forward modules, as prefixes
    out = []
    for path, module in model.named_modules():
        if path.endswith(".base_layer"):
            continue  # the wrapped layer of a LoKr layer: the LoKr layer's own path is the target
        if any(path.startswith(p) for p in inside):
            base = getattr(module, "base_layer", module)
            if isinstance(base, nn.Linear):
                out.append(path)
            continue
        if _is_block(module, ("Attention", "FeedForward")):
            inside.append(path + ".")
    return out


def default_target_modules(model: nn.Module) -> list[str]:
    """The default target list for a model's class, or a ValueError that says what to pass."""
    name = type(model).__name__
    family = families.of_model(model)
    if family is not None and family.roles:
        return dit_target_modules(model)
    if family is not None and family.targets:
        return list(family.targets)
    if name not in DEFAULT_TARGET_MODULES:
        generic = generic_target_modules(model)
        if generic:
            return generic
        denoisers = sorted({f.denoiser_class for f in families.FAMILIES.values() if f.targets})
        raise ValueError(
            f"LoKr has no default target_modules for {name} (it has no attention or feed-forward Linears in diffusers' "
            f"style); pass target_modules=[...] (defaults exist for {sorted([*DEFAULT_TARGET_MODULES, *denoisers])}, "
            f"the {_with_roles()} transformers and any model with diffusers' attention / feed-forward blocks)"
        )
    targets = list(DEFAULT_TARGET_MODULES[name])
    if name in PRESENT_ONLY:
        leaves = {path.rpartition(".")[2] for path, _ in model.named_modules()}
        targets = [t for t in targets if t in leaves]
    return targets


def _name_matches(rule: list[str] | str, key: str, field_name: str) -> bool:
    if isinstance(rule, str):
        return compile_pattern(field_name, rule).fullmatch(key) is not None
    return any(key == t or key.endswith("." + t) for t in rule)


def _layer_index_ok(config: LoKrConfig, key: str) -> bool:
    indices = config.layers_to_transform
    if indices is None or (isinstance(indices, list) and not indices):
        return True
    patterns = config.layers_pattern
    if not patterns:
        # PEFT's rule, extended to a top-level ModuleList ("layers.2.to_q"), which PEFT misses
        match = re.match(r"(?:^|.*?\.)[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for p in [patterns] if isinstance(patterns, str) else patterns:
            match = compile_pattern("layers_pattern", rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\.", p).match(key)
            if match:
                break
    return match is not None and int(match.group("idx")) in indices  # type: ignore[operator]


def is_target(config: LoKrConfig, key: str) -> bool:
    """Does the module named `key` match the config (targets, excludes, layer indices)?"""
    if config.exclude_modules and _name_matches(config.exclude_modules, key, "exclude_modules"):
        return False
    if config.modules_to_save and any(compile_pattern("modules_to_save", rf"(^|.*\.){m}($|\..*)", m).match(key)
                                      for m in config.modules_to_save):
        return False
    assert config.target_modules is not None
    return _name_matches(config.target_modules, key, "target_modules") and _layer_index_ok(config, key)


@dataclass(frozen=True)
class Target:
    name: str  # full module name in the model
    r: int
    alpha: float


def find_targets(model: nn.Module, config: LoKrConfig, supported: tuple[type, ...],
                 skip: tuple[type, ...] = ()) -> list[Target]:
    """Resolve the config against the model's modules; raise on anything that does not fit.

    `skip` are wrapper types whose insides are not candidates (an injected LoKr layer's base_layer).
    Errors: a list entry of target_modules that names no module, a regex that matches nothing,
    a matched module of an unsupported type, a rank/alpha pattern that matches no target,
    a non-positive rank.
    """
    candidates = _candidate_modules(model, skip)
    targets = [(k, m) for k, m in candidates.items() if is_target(config, k)]
    if isinstance(config.target_modules, list):
        unused = [t for t in config.target_modules if not any(k == t or k.endswith("." + t) for k in candidates)]
        if unused:
            raise ValueError(f"target_modules {unused} match no module of {type(model).__name__}")
    if not targets:
        raise ValueError(f"target_modules {config.target_modules!r} match no module of {type(model).__name__}"
                         " (after exclude_modules / layers_to_transform)")
    bad = [(k, type(m).__name__) for k, m in targets if not isinstance(m, supported)]
    if bad:
        names = ", ".join(f"{k} ({t})" for k, t in bad[:5])
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise TypeError(f"LoKr supports {[c.__name__ for c in supported]}; target_modules also matched {names}{more}")
    for pattern_name in ("rank_pattern", "alpha_pattern"):
        for pattern in getattr(config, pattern_name):
            if not any(pattern_regex(pattern_name, pattern).match(k) for k, _ in targets):
                raise ValueError(f"{pattern_name} key {pattern!r} matches no targeted module")
    return [Target(k, pattern_value(config.rank_pattern, k, config.r, "rank_pattern"),
                   pattern_value(config.alpha_pattern, k, config.alpha, "alpha_pattern")) for k, _ in targets]


def _candidate_modules(model: nn.Module, skip: tuple[type, ...]) -> dict[str, nn.Module]:
    out: dict[str, nn.Module] = {}
    hidden: list[str] = []
    for key, module in model.named_modules():
        if not key or any(key.startswith(h) for h in hidden):
            continue
        out[key] = module
        if skip and isinstance(module, skip):
            hidden.append(key + ".")
    return out
