"""Tensors read from a safetensors file, and what their place in memory does to float results.

safetensors hands out tensors that map the file: each one starts at its own byte offset in the file, so a
weight may sit 8 bytes past a 16-byte boundary, where torch's own allocator always gives 64-byte aligned
memory. torch's CPU kernels sum an unaligned operand in another order (a (1, n) @ (n, m) `F.linear` — a
timestep embedding or a modulation at batch 1 — differs in the last bits when the weight's address is not
16-byte aligned), so a pipeline read back from disk can differ from the one that was saved by float rounding
(about 1e-6) with every weight bit-equal. `own_memory` copies a pipeline's weights into memory torch
allocates, after which bit-equality is a fair test of everything else (config, classes, adapters).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import torch
from torch import nn


def own_memory(pipe: Any) -> Any:
    """Give every parameter and buffer of `pipe`'s torch components memory of its own (in place); returns `pipe`."""
    with torch.no_grad():
        for component in pipe.components.values():
            if not isinstance(component, nn.Module):
                continue
            for tensor in [*component.parameters(), *component.buffers()]:
                tensor.data = tensor.data.clone(memory_format=torch.contiguous_format)
    return pipe


def misaligned(pipe: Any) -> list[str]:
    """The names of `pipe`'s weights whose data does not start on a 16-byte boundary."""
    return [f"{c}.{n}" for c, m in pipe.components.items() if isinstance(m, nn.Module)
            for n, t in [*m.named_parameters(), *m.named_buffers()] if t.numel() and t.data_ptr() % 16]


def zero_tensors_in_place(path: str | os.PathLike[str]) -> None:
    """Overwrite every tensor byte of a safetensors file with zeros, in place (same inode, header kept), as a
    program rewriting the file would: a tensor still mapping the file sees the zeros."""
    with open(path, "r+b") as fh:
        (header_len,) = struct.unpack("<Q", fh.read(8))
        json.loads(fh.read(header_len))  # a well-formed file: the data follow the header
        start = 8 + header_len
        size = os.fstat(fh.fileno()).st_size - start
        fh.seek(start)
        fh.write(bytes(size))
