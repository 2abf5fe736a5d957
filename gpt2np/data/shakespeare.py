"""Tiny Shakespeare: find or download it, tokenize once (cached), split, and serve batches.

Where the text comes from, first hit wins:
  1. an explicit path (the training script's --data),
  2. $GPT2NP_DATA,
  3. gpt2np's cache (gpt2np.files.cache_dir: --cache-dir, $GPT2NP_CACHE or ~/.cache/gpt2np),
     file tinyshakespeare.txt,
  4. a download from the char-rnn repository into that cache, checked by SHA-256.
"""
from __future__ import annotations

import hashlib
import io
import os
import urllib.request
from pathlib import Path

import numpy as np

from gpt2np import files
from gpt2np.data.loader import StridedLoader
from gpt2np.data.shards import load_shard

DATA_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
DATA_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DATA_BYTES = 1_115_394
DATA_FILENAME = "tinyshakespeare.txt"
DATA_ENV = "GPT2NP_DATA"


class DataNotFoundError(FileNotFoundError):
    """No tiny Shakespeare anywhere we looked; the message lists the ways to provide it."""


def _write_to_cache(path: Path, data: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_bytes(path, data)


def download(dest: Path, url: str = DATA_URL, timeout: float = 60.0) -> Path:
    """Fetch tiny Shakespeare to `dest`, refusing anything whose SHA-256 is not the known one."""
    with urllib.request.urlopen(url, timeout=timeout) as r:
        data = r.read()
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != DATA_BYTES or digest != DATA_SHA256:
        raise ValueError(f"downloaded {url} is {len(data)} bytes with SHA-256 {digest}; "
                         f"expected {DATA_BYTES} bytes, {DATA_SHA256}")
    _write_to_cache(dest, data)
    return dest


def find_data(path: str | os.PathLike | None = None, *, cache: str | os.PathLike | None = None,
              allow_download: bool = True, flag: str = "--data") -> Path:
    """The path of the tiny Shakespeare text (see the module docstring for the search order);
    `flag` is the command's flag for a path, named in the errors."""
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise DataNotFoundError(f"{flag} {p}: no such file")
        return p
    env = os.environ.get(DATA_ENV)
    if env:
        p = Path(env).expanduser()
        if not p.is_file():
            raise DataNotFoundError(f"${DATA_ENV}={env}: no such file")
        return p
    cached = files.cache_dir(cache) / DATA_FILENAME
    if cached.is_file():
        return cached
    problem = "downloading is disabled"
    if allow_download:
        try:
            return download(cached)
        except Exception as e:  # offline, proxy, bad hash, unwritable cache ...
            problem = f"downloading {DATA_URL} failed: {e}"
    raise DataNotFoundError(
        f"tiny Shakespeare not found, and {problem}. Provide it in one of these ways:\n"
        f"  {flag + ' PATH':<28} a local copy of the text\n"
        f"  {DATA_ENV}=PATH             the same through the environment\n"
        f"  {cached}   put (or let us download) the file in the cache "
        f"(${files.CACHE_ENV} overrides the folder)\n"
        f"  the file is {DATA_URL} ({DATA_BYTES:,} bytes, sha256 {DATA_SHA256})")


def load_tokens(path: str | os.PathLike, *, cache: str | os.PathLike | None = None) -> np.ndarray:
    """GPT-2 token ids (uint16) of the whole file, tokenized once and cached by content hash."""
    raw = read_text_bytes(path)
    key = hashlib.sha256(raw).hexdigest()[:16]
    cached = files.cache_dir(cache) / f"tokens-gpt2-{key}.npy"
    if cached.is_file():
        try:  # (its header checked against its size: a damaged one allocates nothing)
            return load_shard(str(cached), mmap=False)
        except (ValueError, OSError):
            pass  # a damaged cache file: tokenize again and overwrite it
    from gpt2np.data.tokenizer import encode

    ids = np.asarray(encode(decode_text(raw, path)), dtype=np.uint16)  # GPT-2's ids fit 16 bits
    try:
        buf = io.BytesIO()
        np.save(buf, ids)
        _write_to_cache(cached, buf.getvalue())
    except OSError:
        pass  # an unwritable cache only costs tokenizing again next time
    return ids


def read_text_bytes(path, max_bytes: int | None = None) -> bytes:
    """The bytes of text file `path`, refused before it is read whole (a ValueError naming
    it) if it is larger than max_bytes or its first 64 KiB hold a NUL byte, which no text
    does (a binary file, or a sparse one of gigabytes that holds nothing)."""
    size = os.path.getsize(path)
    if max_bytes is not None and size > max_bytes:
        raise ValueError(f"{path} is {size:,} bytes, more than the {max_bytes:,} such a file "
                         f"needs: it is damaged or not what it is named")
    with open(path, "rb") as f:
        head = f.read(1 << 16)
        if b"\0" in head:
            decode_text(head, path)  # (raises, naming where the NUL is)
        return head + f.read()


def decode_text(raw: bytes, path) -> str:
    """The UTF-8 text of a file's bytes, or a ValueError naming the file: a binary file (a NUL
    byte, which no text holds) or one in another encoding is refused rather than tokenized.
    Line endings are kept as they are (CRLF stays CRLF)."""
    def where(at: int) -> str:
        line = raw.count(b"\n", 0, at) + 1
        return f"line {line}, offset {at}"

    if b"\0" in raw:
        at = raw.index(b"\0")
        raise ValueError(f"{path} looks like a binary file (a NUL byte at {where(at)}), not "
                         "text: give a UTF-8 text file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x} at "
                         f"{where(e.start)}): convert it to UTF-8 first, e.g. "
                         f"`iconv -f latin1 -t utf-8`") from None


def split(tokens: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """The first 90% for training, the last 10% for validation (as nanoGPT's prepare.py)."""
    n = int(len(tokens) * (1.0 - val_fraction))
    return tokens[:n], tokens[n:]


class BatchLoader(StridedLoader):
    """(x, y) batches of shape (B, T) from one token array; y is x shifted by one.

    sequential (default): build-nanogpt's DataLoaderLite, rank r of `world_size` reading at
      offset B*T*r and striding B*T*world_size, back to the start when the next step of all
      ranks would run past the end (gpt2np.data.loader: the same order as the shard loader's,
      the array being one shard).
    random: each row starts at an offset drawn uniformly from the whole array (nanoGPT's
      get_batch), from a generator seeded by (seed, rank).

    state_dict()/load_state_dict() carry this rank's position and the generator, so a
    resumed run reads exactly the batches the uninterrupted one would have.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, block_size: int, *, rank: int = 0,
                 world_size: int = 1, random: bool = False, seed: int = 0):
        super().__init__(batch_size, block_size, rank, world_size)
        need = self.tokens_per_step + 1
        if len(tokens) < need:
            raise ValueError(f"{len(tokens):,} tokens are too few for batches of "
                             f"{batch_size}x{block_size} on {world_size} rank(s): need {need:,}")
        self._array = tokens
        self.random = random
        self.rng = np.random.default_rng([seed, rank])
        self.reset()

    def _open(self, shard: int):
        return self._array

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        if not self.random:
            return super().next_batch()
        B, T = self.B, self.T
        starts = self.rng.integers(0, len(self.tokens) - T, size=B)
        rows = np.stack([self.tokens[s:s + T + 1] for s in starts]).astype(np.int64)
        return rows[:, :-1], rows[:, 1:]

    def state_dict(self) -> dict:
        return {"position": self.position, "rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict):
        self.position = int(state["position"])
        self.rng.bit_generator.state = state["rng"]
