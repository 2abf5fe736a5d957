"""Token shard folders: what one holds (one rule for writer and reader), and the loader.

A folder that `gpt2np.data.prepare` makes holds

    meta.json                       the shards, in order: file, split, tokens; how they were made
    <prefix>_val_000000.npy         shard 0, the validation split
    <prefix>_train_000001.npy, ...  the training shards (or .bin: llm.c's header + uint16)

What a folder holds, for prepare (ShardWriter) and the loader (folder_shards) alike:
  - with meta.json, a split is exactly the shards meta.json lists for it, in its order. A
    listed file that is missing or holds another token count, or a shard-named file that
    meta.json does not list (an earlier corpus's, or the same tokens in the other format),
    is an error: the folder is not what was prepared.
  - without meta.json (shards made elsewhere, e.g. llm.c's fineweb .bin files), a split is
    the files named `<prefix>_<split>[_<index>].npy|.bin`, sorted by index; one prefix and
    one format per folder, else it is an error (two corpora, or every token twice).
  - a name's split is the `_val` / `_train` right before the index and extension, so a
    prefix such as `web_val_v2` does not make training shards count as validation.
  - prepare holds the folder while it writes (gpt2np.files.FolderLock: a second prepare
    there is refused), removes what a killed prepare's writes left (temporary files), and
    refuses a folder that already holds shards or a meta.json unless told to
    overwrite (then it removes those first, and only those); it writes meta.json marked
    incomplete before the first shard and complete after the last, and removes what it
    wrote if it fails, so a half-written folder is never read as a corpus.

The loader reads a split's shards in build-nanogpt's DataLoaderLite order, with per-rank
offsets (gpt2np.data.loader):

    loader = ShardLoader("data/fineweb", B=16, T=1024, rank=r, world_size=w, split="train")
    x, y = loader.next_batch()          # int64 (B, T); y is x shifted by one token
    state = loader.state()              # same on every rank: {"shard": i, "position": p}
    loader.set_state(state)             # resume (also with another rank's state)

Shards are memory-mapped, so only the tokens read are paged in.
"""
from __future__ import annotations

import os
import re
import warnings

import numpy as np

from gpt2np import files
from gpt2np.data.loader import StridedLoader
from gpt2np.untrusted import inside, read_json

BIN_MAGIC = 20240520  # llm.c's token-file magic
BIN_VERSION = 1
BIN_HEADER_INTS = 256
BIN_MAX_TOKENS = 2 ** 31 - 1  # the .bin header counts tokens in an int32
META = "meta.json"
SPLITS = ("train", "val")
# <prefix>_<split>[_<index>].<ext>: the split is the last _val/_train before index and ext
_NAME = re.compile(r"^(?P<prefix>.+?)_(?P<split>val|train)(?:_(?P<index>\d+))?\.(?P<ext>npy|bin)$")


class ShardFolderError(OSError):
    """A shard folder whose files are not what its meta.json (or its names) say it holds."""


# ----------------------------------------------------------------------- shard files


def shard_name(prefix: str, index: int, fmt: str = "npy") -> str:
    split = "val" if index == 0 else "train"
    return f"{prefix}_{split}_{index:06d}.{fmt}"


def parse_shard_name(name: str) -> dict | None:
    """{"prefix", "split", "index", "ext"} of a shard file name, or None if it is not one."""
    m = _NAME.match(name)
    if m is None:
        return None
    d = m.groupdict()
    d["index"] = -1 if d["index"] is None else int(d["index"])
    return d


def write_shard(path: str, tokens: np.ndarray | list):
    """Write uint16 tokens (an array, or a list of arrays written one after the other, so a
    shard is never copied into one piece) as .npy or llm.c .bin (by extension), atomically."""
    chunks = [np.ascontiguousarray(c, dtype=np.uint16)
              for c in (tokens if isinstance(tokens, list) else [tokens])]
    n = sum(len(c) for c in chunks)
    if path.endswith(".bin") and n > BIN_MAX_TOKENS:
        raise ValueError(f"{path}: {n:,} tokens do not fit llm.c's .bin header (at most "
                         f"{BIN_MAX_TOKENS:,}); use smaller shards or the npy format")

    def write(f):
        if path.endswith(".bin"):
            header = np.zeros(BIN_HEADER_INTS, dtype=np.int32)
            header[:3] = (BIN_MAGIC, BIN_VERSION, n)
            f.write(header.tobytes())
        else:
            header = {"descr": "<u2", "fortran_order": False, "shape": (n,)}
            np.lib.format.write_array_header_1_0(f, header)
        for c in chunks:
            f.write(c.astype("<u2", copy=False).tobytes())

    files.write_file(path, write)


def load_shard(path: str, mmap: bool = True) -> np.ndarray:
    """A shard's uint16 tokens (memory-mapped by default: pretraining shards are large).
    Its header is checked against the file's size first (shard_header)."""
    n, offset = shard_header(path)
    if n == 0:
        return np.zeros(0, dtype=np.uint16)
    if mmap:
        return np.memmap(path, dtype="<u2", mode="r", offset=offset, shape=(n,))
    tokens = np.fromfile(path, dtype="<u2", offset=offset, count=n)
    if len(tokens) != n:  # its size was checked: the file changed while we read it
        raise ValueError(f"{path}: ended after {len(tokens)} of its {n} tokens while it was read")
    return tokens


def shard_header(path: str) -> tuple[int, int]:
    """(token count, byte offset of the tokens) of a shard, from its header: llm.c's (.bin)
    or numpy's (.npy, a 1-D uint16 array), checked against the file's real size; else a
    ValueError naming the file and what is wrong with it."""
    redo = "make it again with `gpt2np prepare` (--overwrite)"
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if path.endswith(".bin"):
            header = np.frombuffer(f.read(BIN_HEADER_INTS * 4).ljust(12, b"\0")[:12], "<i4")
            if header[0] != BIN_MAGIC:
                raise ValueError(f"{path}: not an llm.c token file (it does not start with "
                                 f"{BIN_MAGIC}); {redo}")
            if header[1] != BIN_VERSION:
                raise ValueError(f"{path}: llm.c token file version {header[1]} is not "
                                 f"supported (only {BIN_VERSION}); {redo}")
            n, offset = int(header[2]), BIN_HEADER_INTS * 4
        else:
            n, offset = _npy_header(f, path, redo)
    if n < 0 or size != offset + 2 * n:
        what = "is truncated" if 0 <= n and size < offset + 2 * n else "is damaged"
        raise ValueError(f"{path}: its header counts {n} tokens ({offset + 2 * max(n, 0)} bytes "
                         f"with the header), the file is {size} bytes: it {what}; {redo}")
    return n, offset


def _npy_header(f, path: str, redo: str) -> tuple[int, int]:
    fmt = np.lib.format
    try:
        version = fmt.read_magic(f)
        read = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}[version]
        shape, _, dtype = read(f)
    except (ValueError, KeyError, SyntaxError, TypeError) as e:  # not numpy's format
        raise ValueError(f"{path}: not a .npy token shard (no readable numpy header: "
                         f"{type(e).__name__}: {e}); {redo}") from None
    if dtype != np.dtype("<u2") or len(shape) != 1:
        raise ValueError(f"{path}: expected a 1-D uint16 array of tokens, got {dtype} "
                         f"{shape}; {redo}")
    return int(shape[0]), f.tell()


# ----------------------------------------------------------------------- what a folder holds


def read_meta(data_dir: str) -> dict | None:
    """The folder's meta.json, checked for the shard list the loader needs (every file a
    file inside the folder); None if absent."""
    path = os.path.join(data_dir, META)
    if not os.path.exists(path):
        return None
    redo = "prepare the folder again with --overwrite"
    try:
        meta = read_json(path)
        shards = meta["shards"]
        if not isinstance(shards, list):
            raise ValueError(f"'shards' is {type(shards).__name__}, not a list")
        for s in shards:
            if not (isinstance(s, dict) and isinstance(s.get("file"), str)
                    and s.get("split") in SPLITS and type(s.get("tokens")) is int
                    and s["tokens"] >= 0):
                raise ValueError(f"bad entry {str(s)[:200]}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ShardFolderError(f"{path} is unreadable ({e}): {redo}") from e
    for s in shards:
        inside(data_dir, s["file"], source=path, what="shard")
    return meta


def _named_shards(data_dir: str) -> list[tuple[str, dict]]:
    names = [(n, parse_shard_name(n)) for n in os.listdir(data_dir)]
    return [(n, p) for n, p in names if p is not None]


def folder_shards(data_dir: str, split: str) -> list[tuple[str, int | None]]:
    """(path, tokens) of a split's shards, in order, by the rule in the module docstring
    (tokens from meta.json; None without one)."""
    if split not in SPLITS:
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"no shard directory {data_dir!r} (make one with "
                                f"`gpt2np prepare --input ... --out-dir {data_dir}`)")
    meta, named = read_meta(data_dir), _named_shards(data_dir)
    redo = "prepare the folder again with --overwrite"
    if meta is not None:
        if meta.get("complete") is False:
            raise ShardFolderError(f"{data_dir}: prepare did not finish writing these shards "
                                   f"(interrupted?); {redo}")
        listed = {s["file"] for s in meta["shards"]}
        stray = sorted(n for n, _ in named if n not in listed)
        if stray:
            raise ShardFolderError(
                f"{data_dir} holds shard files that its {META} does not list: "
                f"{', '.join(stray[:5])}{' ...' if len(stray) > 5 else ''} (left from an "
                f"earlier corpus?); remove them, or {redo}")
        return [(os.path.join(data_dir, s["file"]), s["tokens"])  # (inside: read_meta checked)
                for s in meta["shards"] if s["split"] == split]
    for key, what in (("prefix", "prefixes"), ("ext", "formats")):
        kinds = sorted({p[key] for _, p in named})
        if len(kinds) > 1:
            raise ShardFolderError(f"{data_dir} has no {META} and holds shards of several "
                                   f"{what} ({', '.join(kinds)}): keep one corpus per folder")
    files = sorted((p["index"], n) for n, p in named if p["split"] == split)
    return [(os.path.join(data_dir, n), None) for _, n in files]


def list_shards(data_dir: str, split: str) -> list[str]:
    """The shard files of a split ("train" or "val"), in order (see folder_shards)."""
    paths = [p for p, _ in folder_shards(data_dir, split)]
    if not paths:
        raise _no_shards(data_dir, split)
    return paths


def _no_shards(data_dir: str, split: str) -> FileNotFoundError:
    return FileNotFoundError(f"no {split} shards (*_{split}_*.npy / .bin) in {data_dir!r}")


def is_folder_file(name: str) -> bool:
    """Whether prepare writes files of this name: meta.json and shards."""
    return name == META or parse_shard_name(name) is not None


def clear_folder(data_dir: str, overwrite: bool):
    """Make data_dir, which this process holds (gpt2np.files.FolderLock), ready for a new
    corpus: remove what a killed prepare's writes left (temporary files), refuse a folder
    that holds shards or a meta.json unless overwrite, then remove those (meta.json first).
    Other files are left alone."""
    os.makedirs(data_dir, exist_ok=True)
    files.remove_temporaries(data_dir, is_folder_file)
    old = sorted(n for n, _ in _named_shards(data_dir))
    has_meta = os.path.exists(os.path.join(data_dir, META))
    if not (old or has_meta):
        return
    if not overwrite:
        also = f" and a {META}" if has_meta else ""
        raise FileExistsError(
            f"{data_dir} already holds {len(old)} shard file(s){also}: pass --overwrite to "
            "replace them, or choose another --out-dir")
    for name in [META] * has_meta + old:
        os.unlink(os.path.join(data_dir, name))


def write_meta(data_dir: str, meta: dict):
    files.write_json(os.path.join(data_dir, META), meta)


# ----------------------------------------------------------------------- the loader


class ShardLoader(StridedLoader):
    """Sequential (x, y) batches over a split's shards with per-rank offsets; see the module
    docstring.

    Every shard must hold at least one step of all ranks (B*T*world_size + 1 tokens), but the
    last: prepare ends a corpus with a shard of whatever is left, so a last shard shorter
    than a step is skipped with a warning (at most one step's tokens, like the tail every
    shard leaves when its length is no multiple of the step), unless it is the split's only
    shard. `shards` and `lengths` list every shard of the split, a skipped one included.
    Its state, {"shard", "position"}, is rank 0's: the same on every rank.
    """

    def __init__(self, data_dir: str, B: int, T: int, rank: int = 0, world_size: int = 1,
                 split: str = "train"):
        super().__init__(B, T, rank, world_size)
        self.data_dir, self.split = data_dir, split
        found = folder_shards(data_dir, split)
        if not found:
            raise _no_shards(data_dir, split)
        self.shards = [path for path, _ in found]
        self.lengths = [self._length(path, listed) for path, listed in found]
        self.n_used = self._usable(self.tokens_per_step + 1)
        self.reset()

    @staticmethod
    def _length(path: str, listed: int | None) -> int:
        if not os.path.isfile(path):
            raise ShardFolderError(f"{path} is listed in {META} but missing: prepare the "
                                   "folder again with --overwrite")
        n = len(load_shard(path))
        if listed is not None and n != listed:
            raise ShardFolderError(f"{path} holds {n} tokens, {META} says {listed}: the folder "
                                   "changed after prepare; prepare it again with --overwrite")
        return n

    def _usable(self, need: int) -> int:
        """How many shards, from the first, are read: all, or all but a short last one."""
        for i, (path, n) in enumerate(zip(self.shards, self.lengths)):
            if n >= need:
                continue
            if i == len(self.shards) - 1 and i > 0:
                warnings.warn(f"{path} holds {n} tokens, fewer than one step of all ranks "
                              f"(B*T*world_size + 1 = {need}): the last shard is skipped",
                              stacklevel=3)
                return i
            raise ValueError(f"{path} holds {n} tokens, fewer than one step of all ranks needs "
                             f"(B*T*world_size + 1 = {need}): use smaller batches or bigger shards")
        return len(self.shards)

    def _open(self, shard: int):
        return load_shard(self.shards[shard])

    def state(self) -> dict:
        """Where the next batch starts, independent of the rank (rank 0's offset)."""
        return {"shard": int(self.current_shard), "position": int(self.position - self.rank_offset)}

    def set_state(self, state: dict):
        shard, position = int(state["shard"]), int(state["position"])
        if not 0 <= shard < len(self.shards):
            raise ValueError(f"loader state names shard {shard}, the {self.split} split has "
                             f"{len(self.shards)}")
        if position < 0:
            raise ValueError(f"loader state has a negative position {position}")
        if shard >= self.n_used:  # saved with a smaller step, in the now skipped last shard
            shard, position = 0, 0
        self._load(shard)
        if not self.step_fits(position):
            # saved with a smaller step (batch or world size) near the shard's end: the next
            # step would not fit, so it starts the next shard, as next_batch() would have
            self._load((shard + 1) % self.n_used)
            position = 0
        self.position = position + self.rank_offset

    # the names gpt2np.data.shakespeare.BatchLoader and torch use, for the checkpoint code
    state_dict = state
    load_state_dict = set_state
