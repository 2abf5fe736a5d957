"""Atomic file writes: a reader (or a crash) sees the old file or the new one, never half of one.

Every output the project writes outside checkpoints (gpt2np.io.checkpoint also fsyncs) goes
through `replace_atomically`: the content is written to a temporary file beside the target
(same filesystem, so the rename is atomic), then renamed over it; on any failure the target
is left as it was and the temporary file is removed. The temporary name carries the process
id, so ranks or processes writing the same file never share one.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable


def replace_atomically(path, write: Callable[[Path], None]) -> Path:
    """Call write(tmp) for a temporary path beside `path`, then rename tmp over `path`."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def write_bytes(path, data: bytes) -> Path:
    return replace_atomically(path, lambda tmp: tmp.write_bytes(data))


def write_text(path, text: str) -> Path:
    return replace_atomically(path, lambda tmp: tmp.write_text(text))


def write_json(path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=1) + "\n")
