"""gpt2np's files: where it caches what it downloads or computes, and how it writes anything.

The cache, `cache_dir()`: $GPT2NP_CACHE, else ~/.cache/gpt2np. It holds tiny Shakespeare
(tinyshakespeare.txt), its GPT-2 tokens (tokens-gpt2-<hash>.npy) and HellaSwag
(hellaswag/hellaswag_val.jsonl); a command's --cache-dir replaces it.

Every file the project writes goes through one writer, `write_file` (and its forms
write_bytes / write_text / write_json / copy_file, and replace_atomically for a library that
writes only to a path). A reader, or a crash, sees the old file or the new one, never half of
one:
  - the content goes to a temporary file beside the target, `<name>.<8 hex>.tmp`: a random
    name created exclusively (O_EXCL, O_NOFOLLOW), so a link or file planted at any name
    is never written through, and two processes never share one;
  - it is renamed over the target (same folder, so the rename is atomic; a link at the
    target is replaced, never followed); with fsync=True the data and the rename are made
    durable first (checkpoints);
  - on any failure, Ctrl-C and (through gpt2np.cli) SIGTERM included, the target is left as
    it was and the temporary file is removed; an OSError comes out as a WriteError naming
    the target and what to do ("cannot write out/ckpt.safetensors: No space left on device;
    free space there, or write elsewhere").
Only a killed process (kill -9, power loss) leaves a temporary file. Its name says which
file it stood for (`temp_target`), so whoever holds the folder (`FolderLock`) removes such
leftovers (`remove_temporaries`): a resumed run, prepare. A folder's next build removes
what killed builds of it left (`remove_unfinished`).
Appending (a run's log.jsonl) is `append_text`: never through a link either. A folder is
written the same way as a file: built in a temporary folder beside it, then renamed into
place (`replace_folder`). Outputs named on a command line are checked before any work
(`check_output`): not a folder, in a folder that exists, not one of the command's inputs.

`FolderLock` holds a folder for one process's life (a training run's --out-dir, prepare's
shard folder): flock(2) on `.gpt2np.lock` in it, which the kernel drops when the process
ends, however it ends, so a crash never leaves the folder locked.
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
import warnings
from pathlib import Path
from typing import BinaryIO, Callable, Iterable

from gpt2np.errors import UsageError

try:
    import fcntl
except ImportError:  # (Windows: no folder locks)
    fcntl = None

CACHE_ENV = "GPT2NP_CACHE"
LOCK_NAME = ".gpt2np.lock"
# <name>.<8 hex>.tmp; older writers: <name>.<pid>.tmp, <name>.tmp
_TEMP = re.compile(r"^(?P<target>.+?)(?:\.[0-9a-f]{8}|\.\d+)?\.tmp$")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_CREATE = os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW


def cache_dir(path: str | os.PathLike | None = None) -> Path:
    """The cache folder: `path` (a --cache-dir), else $GPT2NP_CACHE, else ~/.cache/gpt2np."""
    if path is None:
        path = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gpt2np"
    return Path(path).expanduser()


# ------------------------------------------------------------------------ errors that name the file

_ADVICE = {
    errno.ENOSPC: "free space there, or write elsewhere",
    errno.EDQUOT: "free space within your quota, or write elsewhere",
    errno.EACCES: "check the folder's permissions, or write elsewhere",
    errno.EPERM: "check the folder's permissions, or write elsewhere",
    errno.EROFS: "the filesystem is read-only: write elsewhere",
    errno.ENOENT: "its folder does not exist: create it, or write elsewhere",
    errno.ENOTDIR: "a part of the path is a file, not a folder: write elsewhere",
    errno.EISDIR: "it is a folder: name a file",
    errno.ELOOP: "it is a symbolic link, which gpt2np never writes through: remove it",
    errno.ENAMETOOLONG: "the name is too long: use a shorter one",
}


class WriteError(OSError):
    """Writing `filename` failed; errno and strerror are the cause's (ENOSPC, EACCES, ...),
    the message names the file and what to do."""

    def __str__(self):
        advice = _ADVICE.get(self.errno)
        return f"cannot write {self.filename}: {self.strerror}" + (f"; {advice}" if advice else "")


def _naming(e: OSError, path, *ours) -> OSError:
    """e as a WriteError naming `path`, when it is about writing path (or one of `ours`, its
    temporaries); any other OSError (reading a source file, say) as it is."""
    name = None if e.filename is None else str(e.filename)
    if isinstance(e, WriteError) or name not in (None, str(path), *map(str, ours)):
        return e
    return WriteError(e.errno, e.strerror or str(e) or type(e).__name__, str(path))


# ------------------------------------------------------------------------ the one writer


def write_file(path, write: Callable[[BinaryIO], None], *, fsync: bool = False) -> Path:
    """Write `path` atomically: write(f) fills `f`, the open temporary file (binary)."""

    def fill(fd, tmp):
        with os.fdopen(fd, "wb") as f:
            write(f)

    return _write(path, fill, fsync)


def replace_atomically(path, write: Callable[[Path], None], *, fsync: bool = False) -> Path:
    """Write `path` atomically through a library that writes only to a path: write(tmp)
    writes the temporary file, which this process created (empty, exclusively) beside path.
    (Nobody else can swap it for a link: in a folder where others may write, the sticky bit
    keeps them from renaming our file, and where they may rename they could replace the
    target itself.)"""

    def fill(fd, tmp):
        os.close(fd)
        write(tmp)

    return _write(path, fill, fsync)


def _write(path, fill: Callable[[int, Path], None], fsync: bool) -> Path:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():  # the rename would fail, after the work
        raise WriteError(errno.EISDIR, os.strerror(errno.EISDIR), str(path))
    tmp = None
    try:
        fd, tmp = _create_temporary(path)
        fill(fd, tmp)
        if fsync:
            _fsync(tmp, os.O_RDWR | _NOFOLLOW)
        os.replace(tmp, path)
    except BaseException as e:  # Ctrl-C, SIGTERM (gpt2np.cli) included
        if tmp is not None:
            _unlink(tmp)
        if isinstance(e, OSError):
            raise _naming(e, path, tmp) from e
        raise
    if fsync:
        try:  # make the rename itself durable
            _fsync(path.parent, os.O_RDONLY)
        except OSError:
            pass  # a filesystem whose folders cannot be fsynced
    return path


def _create_temporary(path: Path) -> tuple[int, Path]:
    """A new empty file beside `path`, `<name>.<8 hex>.tmp`, created exclusively (a file or
    link already at that name is never opened): (its descriptor, its path)."""
    name = path.name[:200]  # (a name near the filesystem's limit still gets a temporary)
    for _ in range(100):
        tmp = path.with_name(f"{name}.{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, _CREATE, 0o666), tmp
        except FileExistsError:
            continue  # someone's file, or a planted link: another name
        except OSError as e:  # no such folder, no permission, ...
            raise _naming(e, path, tmp) from e
    raise WriteError(errno.EEXIST, "no free temporary name beside it", str(path))


def _fsync(path, mode: int):
    fd = os.open(path, mode)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink(path):
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def write_bytes(path, data: bytes, *, fsync: bool = False) -> Path:
    return write_file(path, lambda f: f.write(data), fsync=fsync)


def write_text(path, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path, obj, *, indent: int = 1) -> Path:
    return write_text(path, json.dumps(obj, indent=indent) + "\n")


def copy_file(src, path) -> Path:
    """Copy the file `src` to `path` (atomically, as every write)."""
    with open(src, "rb") as source:
        return write_file(path, lambda f: shutil.copyfileobj(source, f))


def append_text(path, text: str):
    """Append `text` (UTF-8) to `path`, created if missing; never through a link."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | _NOFOLLOW, 0o666)
        with os.fdopen(fd, "ab") as f:
            f.write(text.encode("utf-8"))
    except OSError as e:
        raise _naming(e, path) from e


# ------------------------------------------------------------------------ leftovers of killed writers


def temp_target(name: str) -> str | None:
    """The file name a temporary file's name stands in for, or None if it is no such name."""
    m = _TEMP.match(name)
    return m["target"] if m else None


def remove_temporaries(folder, is_target: Callable[[str], bool]) -> list[str]:
    """Remove the temporary files (and planted links) in `folder` that stand for a file
    name `is_target` accepts: what killed writers left. Only for a folder that no other
    process writes (its FolderLock is held). Returns the names removed."""
    removed = []
    for entry in os.scandir(folder):
        target = temp_target(entry.name)
        if target and is_target(target) and not entry.is_dir(follow_symlinks=False):
            _unlink(entry.path)
            removed.append(entry.name)
    return sorted(removed)


# ------------------------------------------------------------------------ folders


# a folder replace_folder is still building holds this file, and the building process
# holds a flock on the folder: a folder with the file and no lock was left by a killed build
UNFINISHED = ".gpt2np-unfinished"


def replace_folder(path, build: Callable[[Path], None]) -> Path:
    """Call build(tmp) for a new temporary folder beside `path`, then rename it to `path`.

    A missing or empty folder at `path` is replaced by one rename; a non-empty one (the
    caller has decided that it may go) is first moved aside, then removed, so `path` never
    holds half of either. An OSError names the file under `path`, not the temporary folder.
    What builds of `path` killed before their rename left beside it goes first
    (`remove_unfinished`).
    """
    path = Path(os.path.abspath(path))
    tmp = held = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_unfinished(path)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
        held = _hold_unfinished(tmp)
        build(tmp)
        if held is not None:
            os.unlink(tmp / UNFINISHED)  # (still held: no cleaner takes it before the rename)
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
        if not path.exists() or not any(path.iterdir()):
            os.replace(tmp, path)
            return path
        _swap(tmp, path)
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise _in_folder(e, tmp, path) from e
        raise
    finally:
        if held is not None:
            os.close(held)
    return path


def _open_folder(path) -> int:
    # a descriptor of the folder itself (never through a link), to flock it
    return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _NOFOLLOW)


def _hold_unfinished(folder: Path) -> int | None:
    """Lock `folder` (flock on the folder itself) for this process, then mark it unfinished;
    the descriptor that holds the lock, or None where there are no locks (then it is not
    marked, and a killed build's folder stays, as before)."""
    if fcntl is None:
        return None
    fd = _open_folder(folder)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(os.open(folder / UNFINISHED, _CREATE, 0o644))
    except OSError as e:
        os.close(fd)
        if e.errno in _NO_LOCKS:
            return None
        raise
    except BaseException:
        os.close(fd)
        raise
    return fd


def remove_unfinished(path) -> list[str]:
    """Remove the temporary folders beside `path` that builds of it killed before their
    rename left (kill -9, power loss): `.<name>.<8 characters>.tmp` folders, not links,
    holding the UNFINISHED mark, that no live process holds. Anything else is left alone:
    a swap's `.old` folder may hold the only copy of an earlier folder. Returns the names
    removed."""
    path = Path(os.path.abspath(path))
    if fcntl is None or not path.parent.is_dir():
        return []
    pattern = re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")
    removed = []
    for entry in os.scandir(path.parent):
        if not pattern.fullmatch(entry.name) or not entry.is_dir(follow_symlinks=False):
            continue
        try:
            fd = _open_folder(entry.path)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # refused while a build runs
            if os.path.lexists(os.path.join(entry.path, UNFINISHED)):
                shutil.rmtree(entry.path)
                removed.append(entry.name)
        except OSError:
            pass
        finally:
            os.close(fd)
    return sorted(removed)


def _swap(new: Path, path: Path):
    """Rename folder `new` to the non-empty folder `path`: the old one is moved aside, then
    removed; if `new` cannot take its place, the old one is put back."""
    old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
    aside, keep = old / path.name, False
    try:
        os.replace(path, aside)
        try:
            os.replace(new, path)
        except BaseException:
            keep = True  # (never removed while it holds the only copy of the old folder)
            os.replace(aside, path)
            keep = False
            raise
    finally:
        if not keep:
            shutil.rmtree(old, ignore_errors=True)


def _in_folder(e: OSError, tmp: Path | None, path: Path) -> OSError:
    """An error about a file in the temporary folder, as one about that file in `path`."""
    name = str(e.filename) if e.filename is not None else None
    if tmp is not None and name is not None and (name + "/").startswith(str(tmp) + "/"):
        return WriteError(e.errno, e.strerror or str(e), str(path) + name[len(str(tmp)):])
    return _naming(e, path, tmp)


def check_output(path, flag: str, inputs: Iterable[tuple[str, object]] = (),
                 earlier_output: Callable[[Path], bool] | None = None) -> Path:
    """Refuse, before any work, an output file named by `flag` that could not be written or
    would replace an input: a folder, a file in a missing folder, one of `inputs` ((flag,
    path) pairs) or a file already inside an input folder (unless `earlier_output(path)`
    says it is this command's own earlier output). Returns path."""
    path = Path(os.path.expanduser(str(path)))
    folder = path.parent
    if path.is_dir():
        raise UsageError(f"{flag} {path} is a folder: name a file to write (e.g. "
                         f"{path / 'result.json'})")
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: there is no folder {folder}; create it first, or "
                         "choose another path")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: cannot write in {folder} (permission denied); "
                         "choose another path")
    real = Path(os.path.realpath(path))
    for in_flag, source in inputs:
        source = Path(os.path.realpath(os.path.expanduser(str(source))))
        if not source.exists():
            continue  # (a hub id, say: nothing here to destroy)
        inside = source.is_dir() and source in real.parents
        same = real == source or (path.exists() and source.is_file() and os.path.samefile(path, source))
        if same:
            raise UsageError(f"{flag} {path} is the input {in_flag} {source}: writing it would "
                             "destroy the input; choose another path")
        if inside and path.exists() and not (earlier_output and earlier_output(path)):
            raise UsageError(f"{flag} {path} already exists in the folder of the input "
                             f"{in_flag} {source}, whose files are read: writing it could destroy "
                             "the input; choose a new name, or a path outside that folder")
    return path


# ------------------------------------------------------------------------ holding a folder


_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS}


class FolderInUseError(RuntimeError):
    """Another process holds the folder (FolderLock)."""


class FolderLock:
    """Hold `folder` (created if missing) for this process: a second FolderLock on it, from
    this or any other process, raises FolderInUseError naming the holder, until release().
    release() removes the lock file, and the folder if it made it and it is still empty.
    flag: how the command line names the folder, for the messages ("--out-dir")."""

    def __init__(self, folder, flag: str = "the folder"):
        self.folder, self.flag = Path(folder), flag
        self.path = self.folder / LOCK_NAME
        self._fd = None
        self._made = not os.path.lexists(self.folder)
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except FileExistsError as e:  # a file where the folder should be
            raise WriteError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(self.folder)) from e
        except OSError as e:
            raise WriteError(e.errno, e.strerror or str(e), str(self.folder)) from e
        try:
            while self._fd is None:
                self._fd = self._try_lock()
        except OSError as e:
            raise _naming(e, self.path) from e

    def _try_lock(self) -> int | None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o644)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:  # a planted hard link
                raise WriteError(errno.EEXIST, "not a lock file gpt2np made (remove it)",
                                 str(self.path))
            if fcntl is not None:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
                    raise FolderInUseError(
                        f"{self.flag} {self.folder} is in use by another gpt2np process "
                        f"({holder or 'unknown'}): wait for it to end (or stop it), or choose "
                        f"another {self.flag}") from None
                except OSError as e:  # a filesystem without locks: go on, unguarded
                    if e.errno not in _NO_LOCKS:
                        raise
                    warnings.warn(f"cannot lock {self.folder} ({e.strerror}): nothing keeps "
                                  "a second gpt2np process from writing there meanwhile",
                                  stacklevel=3)
            try:  # its holder removed it as we opened it: lock the new one instead
                if os.stat(self.path, follow_symlinks=False).st_ino != st.st_ino:
                    os.close(fd)
                    return None
            except FileNotFoundError:
                os.close(fd)
                return None
            os.ftruncate(fd, 0)
            holder = f"pid {os.getpid()}: {' '.join(map(str, sys.argv))}"[:300]
            os.write(fd, (" ".join(holder.split()) + "\n").encode())
            return fd
        except BaseException:
            os.close(fd)
            raise

    def release(self):
        if self._fd is not None:
            _unlink(self.path)  # while still held: whoever opened it before retries
            os.close(self._fd)
            self._fd = None
            if self._made:
                try:
                    self.folder.rmdir()
                except OSError:
                    pass  # (not empty: the command's outputs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
