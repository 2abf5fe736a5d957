"""The safetensors file layout, for the few things the safetensors package does not do.

A file is an unsigned 64-bit little-endian header length n, n bytes of JSON header (padded
with spaces to a multiple of 8), then the tensors' bytes. The header maps each tensor's name
to {"dtype", "shape", "data_offsets": [start, end]} (offsets into the bytes after the
header) and "__metadata__" to a dict of strings.

Used to read a file's metadata without its tensors (is it a training checkpoint?), to read a
bfloat16 tensor (numpy has no bfloat16) and to relabel tensors as bfloat16 when writing.
"""
from __future__ import annotations

import json

MAX_HEADER_BYTES = 100_000_000  # a longer "header" is no safetensors file


def split(data: bytes) -> tuple[dict, int]:
    """(header, offset of the tensors' bytes) of a whole safetensors file's bytes."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), 8 + n


def read_header(path) -> tuple[dict, int]:
    """(header, offset of the tensors' bytes) of a safetensors file, reading only the header.
    Raises ValueError for a file that is not one."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if not 2 <= n <= MAX_HEADER_BYTES:
            raise ValueError(f"{path}: not a safetensors file (header length {n})")
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (its header is no JSON object)")
    return header, 8 + n


def metadata(header: dict) -> dict:
    """The header's "__metadata__" (empty if it has none)."""
    return header.get("__metadata__") or {}


def join(header: dict, body: bytes) -> bytes:
    """The file of this header and these tensor bytes."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body
