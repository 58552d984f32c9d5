"""tokenizer.json files (the `tokenizers` format, written as JSON) of tiny byte-level BPE tokenizers that split text as
a real model's tokenizer does (its pre-tokenizer pattern) and hold whole pieces as single tokens, so that a pipeline's
fixed prompt template is as many tokens as with the real tokenizer: the 256 byte symbols, every given piece (BPE with
`ignore_merges`: a piece in the vocabulary is one token, anything else its bytes), then the special tokens.
Used by tiny_hunyuanvideo.py (Llama 3's pattern) and tiny_hunyuanvideo15.py (Qwen2's)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from lokr_diffusers.tiny import _byte_symbols


def write_piece_tokenizer(directory: str, pieces: Iterable[str], special: tuple[str, ...], split: str,
                          bos: str | None = None, trim_offsets: bool = True) -> str:
    """Write `directory`/tokenizer.json: pieces split by the regex `split` then byte-level encoded; `special` added
    after the vocabulary; `bos` (one of `special`) put in front of every text, else nothing added. `trim_offsets`:
    the byte-level steps' (Llama 3's trims, Qwen2's does not; its decoder adds no prefix space either)."""
    os.makedirs(directory, exist_ok=True)
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    for piece in pieces:
        if piece not in special:
            vocab.setdefault("".join(symbols[b] for b in piece.encode("utf-8")), len(vocab))
    first_special = len(vocab)
    post: dict[str, Any] | None = None
    if bos is not None:
        token = {"id": bos, "type_id": 0}
        post = {"type": "TemplateProcessing",
                "single": [{"SpecialToken": token}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"SpecialToken": token}, {"Sequence": {"id": "A", "type_id": 0}}, {"SpecialToken": token},
                         {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [first_special + special.index(bos)], "tokens": [bos]}}}
    spec: dict[str, Any] = {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "added_tokens": [{"id": first_special + i, "content": t, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True} for i, t in enumerate(special)],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": split}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": trim_offsets, "use_regex": False}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": trim_offsets, "trim_offsets": trim_offsets,
                    "use_regex": trim_offsets},
        "post_processor": post,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": []},
    }
    with open(os.path.join(directory, "tokenizer.json"), "w", encoding="utf-8") as fh:
        json.dump(spec, fh, ensure_ascii=False)
    return directory
