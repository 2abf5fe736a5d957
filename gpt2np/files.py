"""gpt2np's files: where it caches what it downloads or computes, and how it writes anything.

The cache, `cache_dir()`: $GPT2NP_CACHE, else ~/.cache/gpt2np. It holds tiny Shakespeare
(tinyshakespeare.txt), its GPT-2 tokens (tokens-gpt2-<hash>.npy) and HellaSwag
(hellaswag/hellaswag_val.jsonl); a command's --cache-dir replaces it.

Every file the project writes is written atomically: a reader (or a crash) sees the old
file or the new one, never half of one. `replace_atomically` writes the content to a
temporary file beside the target (same filesystem, so the rename is atomic), then renames it
over the target; on any failure the target is left as it was and the temporary file is
removed. The temporary name is the target's plus the process id and ".tmp" (`temp_path`),
so ranks or processes writing the same file never share one, and what a killed writer left
behind can be recognised (`temp_target`). fsync=True also makes the data and the rename
durable before returning (checkpoints). A folder is written the same way: built in a
temporary folder beside it, then renamed into place (`replace_folder`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable

CACHE_ENV = "GPT2NP_CACHE"
_TEMP = re.compile(r"^(?P<target>.+?)(?:\.\d+)?\.tmp$")  # <name>.<pid>.tmp (older: <name>.tmp)


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache folder: `path` (a --cache-dir), else $GPT2NP_CACHE, else ~/.cache/gpt2np."""
    if path is None:
        path = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gpt2np"
    return Path(path).expanduser()


# ------------------------------------------------------------------------ atomic writes


def temp_path(path) -> Path:
    """The temporary file this process writes `path` through."""
    path = Path(path)
    return path.with_name(f"{path.name}.{os.getpid()}.tmp")


def temp_target(name: str) -> str | None:
    """The file name a temporary file's name stands in for, or None if it is no such name."""
    m = _TEMP.match(name)
    return m["target"] if m else None


def replace_atomically(path, write: Callable[[Path], None], *, fsync: bool = False) -> Path:
    """Call write(tmp) for a temporary path beside `path`, then rename tmp over `path`."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        if fsync:
            _fsync(tmp, os.O_RDWR)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    if fsync:
        try:  # make the rename itself durable
            _fsync(path.parent, os.O_RDONLY)
        except OSError:
            pass  # a filesystem whose folders cannot be fsynced
    return path


def _fsync(path, mode: int):
    fd = os.open(path, mode)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_bytes(path, data: bytes, *, fsync: bool = False) -> Path:
    return replace_atomically(path, lambda tmp: tmp.write_bytes(data), fsync=fsync)


def write_text(path, text: str) -> Path:
    return replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path, obj, *, indent: int = 1) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def replace_folder(path, build: Callable[[Path], None]) -> Path:
    """Call build(tmp) for a new temporary folder beside `path`, then rename it to `path`.

    A missing or empty folder at `path` is replaced by one rename; a non-empty one (the
    caller has decided that it may go) is first moved aside, then removed, so `path` never
    holds half of either.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        build(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
        if not path.exists() or not any(path.iterdir()):
            os.replace(tmp, path)
            return path
        old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
        os.replace(path, old / path.name)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
