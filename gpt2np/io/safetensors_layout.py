"""The safetensors file layout, for the few things the safetensors package does not do.

A file is an unsigned 64-bit little-endian header length n, n bytes of JSON header (padded
with spaces to a multiple of 8), then the tensors' bytes. The header maps each tensor's name
to {"dtype", "shape", "data_offsets": [start, end]} (offsets into the bytes after the
header) and "__metadata__" to a dict of strings.

Used to read a file's metadata without its tensors (is it a training checkpoint?), to check
what a header claims against the file's real size before any tensor is read, to read a
bfloat16 tensor (numpy has no bfloat16) and to relabel tensors as bfloat16 when writing.
"""
from __future__ import annotations

import json
import math
import os

MAX_HEADER_BYTES = 100_000_000  # a longer "header" is no safetensors file
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
            "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}


def split(data: bytes) -> tuple[dict, int]:
    """(header, offset of the tensors' bytes) of a whole safetensors file's bytes."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), 8 + n


def read_header(path) -> tuple[dict, int]:
    """(header, offset of the tensors' bytes) of a safetensors file, reading only the header,
    whose length is checked against the file's before it is read. Raises ValueError for a
    file that is not one."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        n = int.from_bytes(f.read(8), "little")
        if not 2 <= n <= min(MAX_HEADER_BYTES, size - 8):
            raise ValueError(f"{path}: not a safetensors file (its first 8 bytes give a header "
                             f"length of {n}, the file is {size} bytes)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:  # (UnicodeDecodeError is a ValueError)
            raise ValueError(f"{path}: not a safetensors file (its header is no JSON: "
                             f"{type(e).__name__})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: not a safetensors file (its header is no JSON object)")
    return header, 8 + n


def check_tensors(path, header: dict, offset: int) -> dict[str, tuple[str, tuple]]:
    """{name: (dtype, shape)} of the header's tensors, once every claim is checked against
    the file's real size: a known dtype, a shape of non-negative ints whose bytes are its
    data_offsets' span, and spans that tile the file's bytes after the header exactly. A
    header that claims more than the file holds is refused here, before anything of the
    claimed size is allocated. Raises ValueError naming the file and the tensor."""
    body = os.path.getsize(path) - offset
    tensors, spans = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            ok = dtype in ITEMSIZE and isinstance(shape, list) and all(
                type(v) is int and v >= 0 for v in (*shape, start, end))
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"{path}: tensor {name!r} has a malformed header entry "
                             f"{str(entry)[:200]}: the file is damaged")
        count = math.prod(shape)
        if end - start != count * ITEMSIZE[dtype] or end > body:
            raise ValueError(f"{path}: tensor {name!r} ({dtype} {tuple(shape)}) claims bytes "
                             f"{start}..{end} of a file with {body} after its header: the file "
                             f"is damaged or truncated")
        tensors[name] = (dtype, tuple(shape))
        spans.append((start, end))
    covered = 0  # the spans, in order, must follow one another up to the file's end
    for start, end in sorted(spans) + [(body, None)]:
        if start != covered:
            raise ValueError(f"{path}: its tensors do not tile the {body} bytes after its "
                             f"header (a gap or an overlap at byte {min(start, covered)}): the "
                             f"file is damaged")
        covered = end
    return tensors


def metadata(header: dict) -> dict:
    """The header's "__metadata__" (empty if it has none)."""
    return header.get("__metadata__") or {}


def join(header: dict, body: bytes) -> bytes:
    """The file of this header and these tensor bytes."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body
