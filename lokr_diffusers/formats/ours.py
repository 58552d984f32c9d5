"""Our lossless layout (`format="lokr_diffusers"`, export.to_ours): several adapters in one file,
`lokr.<adapter>.<component>.<path>.<tensor>`, exact scales (`lokr_scale`), row pieces of fused modules
(docs/formats.md §Key layouts, §DiT models).

A file is in this layout when its keys are: the metadata `format` only confirms it. A file whose
metadata claims the layout while its keys are another's is read by its keys, with a warning.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

from torch import Tensor

from .. import functional as LF
from .fused import SHARED_KEY

logger = logging.getLogger(__name__)

OURS_FORMAT, OURS_PREFIX = "lokr_diffusers", "lokr."


def is_ours(state_dict: Mapping[str, Tensor]) -> bool:
    """Is every key of the (non-empty) state dict in our layout?"""
    return bool(state_dict) and all(k.startswith(OURS_PREFIX) for k in state_dict)


def split_adapters(state_dict: Mapping[str, Tensor], metadata: Mapping[str, str],
                   source: str | None = None) -> dict[str | None, dict[str, Tensor]]:
    """Each adapter's tensors, told by the keys.

    Args:
        state_dict: the file's tensors.
        metadata: the file's own metadata (`lokr_shared` says which piece of a fused module holds its factors).
        source: the file, for the warning about metadata that the keys contradict.

    Returns:
        {adapter name: {`<component>.<path>.<tensor>`: tensor}} for our multi-adapter layout
        (`lokr.<adapter>.<component>...`), else {None: the whole state dict}.
    """
    if not is_ours(state_dict):
        if metadata.get("format") == OURS_FORMAT:
            example = next(iter(state_dict), "")
            logger.warning("%s: its metadata says format %r, but its keys are not in that layout (%s..., e.g. %s): "
                           "read by its keys, the metadata is ignored", source or "the state dict", OURS_FORMAT,
                           OURS_PREFIX, example)
        return {None: dict(state_dict)}
    out: dict[str | None, dict[str, Tensor]] = {}
    for key, tensor in state_dict.items():
        adapter, _, inner = key[len(OURS_PREFIX):].partition(".")
        out.setdefault(adapter, {})[inner] = tensor
    _share_factors(out, metadata)
    return out


def _share_factors(groups: dict[str | None, dict[str, Tensor]], metadata: Mapping[str, str]) -> None:
    """The pieces of a fused module hold one set of factors, written once (formats/fused.py SHARED_KEY):
    give every piece the same tensor objects, so that loading registers one set of Parameters."""
    raw = metadata.get(SHARED_KEY)
    if raw is None:
        return
    try:
        shared = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"metadata {SHARED_KEY!r} is not valid JSON: {err.msg}") from None
    for piece, holder in shared.items() if isinstance(shared, dict) else ():
        adapter, _, path = str(piece).partition(".")
        sd = groups.get(adapter)
        factors = {leaf: sd[f"{holder}.{leaf}"] for leaf in LF.FACTOR_NAMES if sd and f"{holder}.{leaf}" in sd}
        if sd is None or not factors:
            raise ValueError(f"metadata {SHARED_KEY!r}: {piece} takes its factors from {holder}, which has none")
        sd.update({f"{path}.{leaf}": t for leaf, t in factors.items()})
