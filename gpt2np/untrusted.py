"""What every reader checks before it trusts a file a user hands in.

A model folder, a checkpoint, a shard folder or a log may come from anywhere (a download, a
colleague, a damaged disk). Whatever such a file says is a claim, checked before it is used:

  read_json(path)         a JSON file, read only up to a size no such file reaches (a sparse
                          file of gigabytes is refused from its size, not read), its errors
                          naming the file
  inside(folder, entry)   a path that a file's content names (an index's shard, meta.json's
                          file) resolved inside that file's folder, symlinks followed, or
                          refused naming the file and the entry
  check_finite(arrays)    every array finite, or an error naming the first one that is not

Sizes are checked where their format is known: a GPTConfig's fields (gpt2np.config), a
safetensors header against its file's length (gpt2np.io.safetensors_layout), a token
shard's header against its file's (gpt2np.data.shards).
"""
from __future__ import annotations

import json
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np

# config.json, model.safetensors.index.json, meta.json: kilobytes for any real model or corpus
MAX_JSON_BYTES = 64 * 2 ** 20


class UntrustedFileError(ValueError):
    """A file whose content cannot be used as it is: the message names the file and what."""


def read_json(path, *, max_bytes: int = MAX_JSON_BYTES):
    """The JSON value in file `path` (UTF-8); an UntrustedFileError naming the file if it is
    larger than max_bytes, not UTF-8, or not JSON (nesting too deep included)."""
    path = Path(path)
    if not path.is_file():  # (a FIFO or a device would block or never end)
        raise UntrustedFileError(f"{path} is not a regular file")
    size = os.path.getsize(path)
    if size > max_bytes:
        raise UntrustedFileError(f"{path} is {size:,} bytes, more than the {max_bytes:,} any "
                                 f"such JSON file needs: it is damaged or not what it is named")
    with open(path, "rb") as f:
        raw = f.read(size)  # (not more: a file grown since its size was read is cut there)
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise UntrustedFileError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at "
                                 f"offset {e.start}): it is damaged or not JSON") from None
    except json.JSONDecodeError as e:
        raise UntrustedFileError(f"{path} is not valid JSON (line {e.lineno}, column "
                                 f"{e.colno}: {e.msg})") from None
    except RecursionError:
        raise UntrustedFileError(f"{path} nests its JSON too deeply to be read: it is damaged "
                                 "or not what it is named") from None


def inside(folder, entry, *, source, what: str = "entry", roots=()) -> Path:
    """folder / entry, where `entry` is a path that file `source` names: refused unless it is
    a non-empty relative path without '..' that, symlinks followed, stays in `folder` (or in
    one of `roots`, further folders the caller trusts as much, such as the Hugging Face
    cache's blobs). The error names `source`, `what` and the entry."""
    if not isinstance(entry, str) or not entry:
        raise UntrustedFileError(f"{source}: {what} {entry!r} is not a file name")
    parts = PurePosixPath(entry.replace("\\", "/")).parts
    if "\0" in entry or PureWindowsPath(entry).drive or entry.startswith(("/", "\\")) \
            or ".." in parts:
        raise UntrustedFileError(f"{source}: {what} {entry!r} points outside {folder}; only "
                                 "files inside the folder are read")
    path = Path(folder) / entry
    real = Path(os.path.realpath(path))
    allowed = [Path(os.path.realpath(r)) for r in (folder, *roots)]
    if not any(real == r or r in real.parents for r in allowed):
        raise UntrustedFileError(f"{source}: {what} {entry!r} is a link to {real}, outside "
                                 f"{folder}; only files inside the folder are read")
    return path


def check_finite(arrays: dict, where: str):
    """Raise an UntrustedFileError naming the first array (by its key) that holds a NaN or an
    infinity; `where` says whose arrays they are (a file, a folder)."""
    for name, a in arrays.items():
        a = np.asarray(a)
        if a.dtype.kind not in "fc":
            continue
        # a sum is finite only if every element is (and cheaper than isfinite's mask); an
        # overflowing sum of finite values is told apart by the mask
        with np.errstate(over="ignore", invalid="ignore"):
            if np.isfinite(a.sum(dtype=np.float64)) or np.isfinite(a).all():
                continue
        bad = ~np.isfinite(a)
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise UntrustedFileError(
            f"{where}: {name!r} holds {int(bad.sum()):,} non-finite value(s) (NaN or inf), the "
            f"first {a[first]} at index {first}: the weights are damaged (a diverged run?); "
            f"use another checkpoint")
