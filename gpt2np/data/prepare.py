"""Tokenize text corpora into uint16 token shards, FineWeb-style (build-nanogpt's fineweb.py).

    gpt2np prepare --input corpus/*.txt --out-dir data/mycorpus --shard-size 1e8

Every document becomes `<|endoftext|>` (50256) followed by its GPT-2 tokens, so documents
are separated (and the first one is delimited too, as fineweb.py does). Tokens stream into
fixed-size shards of `--shard-size` tokens (the last one shorter); shard 0 is the
validation split, the rest are training shards:

    out-dir/<prefix>_val_000000.npy, <prefix>_train_000001.npy, ..., meta.json

What a shard folder holds, and how prepare and the loader agree on it, is gpt2np.data.shards'
rule: meta.json lists the shards; a folder that already holds shards is refused unless
`--overwrite` (which removes the old shards first).

Documents are:
- `.jsonl` / `.json` lines: one document per line, its `--text-field` (default "text");
- any other file: the whole file is one document, or, with `--doc-sep STR`, the pieces
  between occurrences of STR (e.g. `--doc-sep '<|endoftext|>'` for text that already
  marks its document boundaries). Splitting inside a document would change the BPE merges
  at the cut, so documents are never cut. Empty documents are dropped.
- or, with `--dataset NAME [--dataset-config CFG] [--split train] [--data-files F ...]`,
  the `--text-field` of every record of a Hugging Face dataset, streamed in its order
  (gpt2np.data.hf_datasets; e.g. HuggingFaceFW/fineweb-edu sample-10BT, or `--dataset parquet
  --data-files *.parquet`); meta.json records the source;
- or, from Python, any iterable of strings: `prepare([], out_dir, documents=...)`.
Text is read as UTF-8 with its line endings as they are (CRLF stays CRLF, as in `--data`);
a binary or non-UTF-8 file is an error naming it.

Tokenization runs in `--workers` processes (a concurrent.futures pool, results taken in
document order, so the output is deterministic; a worker that dies is an error, never a
hang); a tqdm bar per shard shows progress. prepare holds --out-dir while it writes; an
error, Ctrl-C or SIGTERM leaves the folder without this corpus (and ends the workers). `--format bin`
writes llm.c's .bin layout instead (a 256 x int32 header: magic 20240520, version 1, token
count; then the uint16 tokens). `gpt2np.data.shards.ShardLoader` reads both.
"""
from __future__ import annotations

import collections
import contextlib
import itertools
import json
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable, Iterator

import numpy as np

from gpt2np import files
from gpt2np.data.shards import (BIN_MAX_TOKENS, META, clear_folder, is_folder_file,
                                parse_shard_name, shard_name, write_meta, write_shard)
from gpt2np.data.tokenizer import EOT_TEXT
from gpt2np.errors import UsageError

# ----------------------------------------------------------------------- documents


def iter_documents(paths: Iterable[str], doc_sep: str | None = None,
                   text_field: str = "text", chunk_chars: int = 1 << 20) -> Iterator[str]:
    """Yield the non-empty documents of the files, in order (see the module docstring)."""
    for path in paths:
        if path.endswith((".jsonl", ".json")):
            yield from _json_lines(path, text_field)
        elif doc_sep is None:
            from gpt2np.data.shakespeare import decode_text  # the tiny-Shakespeare path's reading, CRLF kept

            with open(path, "rb") as f:
                text = decode_text(f.read(), path)
            if text:
                yield text
        else:
            yield from _split_stream(path, doc_sep, chunk_chars)


def _json_lines(path: str, text_field: str) -> Iterator[str]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if b"\0" in raw:
                raise ValueError(f"{where}: a NUL byte: this looks like a binary file, not "
                                 "JSON lines")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise ValueError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x}): "
                                 "convert the file to UTF-8") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise ValueError(f"{where}: not a JSON object ({e})") from None
            text = record.get(text_field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                got = (f"got a JSON {type(record).__name__}" if not isinstance(record, dict)
                       else f"got {type(text).__name__}" if text_field in record
                       else f"it has no such field (only {', '.join(list(record)[:5])})")
                raise ValueError(f"{where}: expected a JSON object with a {text_field!r} "
                                 f"string, {got} (--text-field names the field)")
            if text:
                yield text


def _split_stream(path: str, sep: str, chunk_chars: int) -> Iterator[str]:
    """The pieces of a file between occurrences of sep, read in chunks (big files welcome).
    Empty pieces (a leading separator, two in a row) are dropped.

    Linear in the file's length, however long a document: each chunk is searched once, with
    the last len(sep) - 1 characters before it (a separator may start there), and a long
    document's pieces are joined once, at its end."""
    _check_doc_sep(sep)
    doc: list[str] = []  # the current document's text so far, none of it a separator's start
    carry = ""  # its last characters, which may begin a separator
    with open(path, encoding="utf-8", newline="") as f:  # newline="": CRLF kept
        while True:
            chunk = _read_text(f, path, chunk_chars)
            if not chunk:
                break
            done, rest = _cut(carry + chunk, sep)
            if done:  # the current document ends at the first separator
                doc.append(done[0])
                yield from (d for d in ("".join(doc), *done[1:]) if d)
                doc = []
            keep = len(rest) - (len(sep) - 1)
            if keep > 0:
                doc.append(rest[:keep])
            carry = rest[max(keep, 0):]
    last = "".join(doc) + carry
    if last:
        yield last


def _cut(text: str, sep: str) -> tuple[list[str], str]:
    """text's pieces before each sep, and what follows the last one."""
    *done, rest = text.split(sep)
    return done, rest


def _check_doc_sep(sep):
    if not isinstance(sep, str) or not sep:
        raise UsageError(f"--doc-sep must be a non-empty string, got {sep!r}: give the string "
                         "between documents (e.g. '<|endoftext|>'), or leave it out for one "
                         "document per file")


def _read_text(f, path: str, chars: int) -> str:
    try:
        chunk = f.read(chars)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text (byte {e.object[e.start]:#04x}): "
                         "convert it to UTF-8 first") from None
    if "\0" in chunk:
        raise ValueError(f"{path} looks like a binary file (a NUL byte), not text")
    return chunk


def _strings(documents: Iterable[str], seen: dict) -> Iterator[str]:
    """The non-empty documents, checked to be strings; seen["text"]: any not blank?"""
    for i, doc in enumerate(documents):
        if not isinstance(doc, str):
            raise TypeError(f"document {i} is a {type(doc).__name__}, not a string")
        if doc:
            seen["text"] = seen["text"] or not doc.isspace()
            yield doc


# ----------------------------------------------------------------------- tokenizing


def _default_encoding():
    from gpt2np.data.tokenizer import get_encoding

    return get_encoding()


_ENC = None  # the worker process's encoding, built once by _init_worker


def _init_worker(encoding_factory: Callable, parent: int):
    """A tokenizer process. Its parent alone handles Ctrl-C and SIGTERM (and then ends its
    workers); a worker whose parent was killed ends itself, rather than wait for work forever."""
    global _ENC
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # (gpt2np.cli's handler, inherited by fork)
    threading.Thread(target=_end_with_parent, args=(parent,), daemon=True).start()
    _ENC = encoding_factory()


def _end_with_parent(parent: int):
    while os.getppid() == parent:
        time.sleep(1.0)
    os._exit(1)


def _eot_of(enc) -> int:
    eot = getattr(enc, "eot_token", None)  # tiktoken's name; else ask for the token itself
    return int(enc.encode_single_token(EOT_TEXT) if eot is None else eot)


def tokenize_document(doc: str, enc=None) -> np.ndarray:
    """[<|endoftext|>] + encode_ordinary(doc) as uint16 (special tokens in the text are
    treated as plain text, never as control tokens)."""
    enc = _ENC if enc is None else enc
    ids = enc.encode_ordinary(doc)
    tokens = np.asarray([_eot_of(enc)] + list(ids), dtype=np.int64)
    if tokens.min() < 0 or tokens.max() >= 2 ** 16:
        raise ValueError(f"token ids must fit uint16, got range [{tokens.min()}, {tokens.max()}]")
    return tokens.astype(np.uint16)


def _tokenize_chunk(docs: list[str]) -> list[np.ndarray]:
    return [tokenize_document(doc) for doc in docs]


def _tokenized(documents: Iterable[str], encoding_factory: Callable, workers: int,
               chunksize: int) -> Iterator[np.ndarray]:
    """Each document's tokens, in document order, from `workers` processes (close() it)."""
    if workers == 1:
        enc = encoding_factory()
        yield from (tokenize_document(doc, enc) for doc in documents)
        return
    yield from _in_workers(documents, encoding_factory, workers, chunksize)


def _in_workers(documents: Iterable[str], encoding_factory: Callable, workers: int,
                chunksize: int) -> Iterator[np.ndarray]:
    """Chunks of `chunksize` documents tokenized by a process pool, at most 2 * workers chunks
    in flight (an endless stream of documents takes bounded memory), results in order.

    concurrent.futures' pool notices a worker that dies (killed, out of memory) and fails
    (multiprocessing.Pool would wait for its results forever); whenever this stops early
    (an error, Ctrl-C, SIGTERM, close()) the workers are ended, not waited for."""
    ctx = mp.get_context("spawn" if sys.platform == "darwin" else None)
    before = set(mp.active_children())
    pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker,
                               initargs=(encoding_factory, os.getpid()))
    pending: collections.deque = collections.deque()
    finished, documents = False, iter(documents)
    try:
        for chunk in iter(lambda: list(itertools.islice(documents, chunksize)), []):
            pending.append(pool.submit(_tokenize_chunk, chunk))
            if len(pending) > 2 * workers:
                yield from pending.popleft().result()
        while pending:
            yield from pending.popleft().result()
        finished = True
    except BrokenProcessPool:
        raise RuntimeError(f"a tokenizer process died (killed, out of memory?): run again with "
                           f"fewer --workers (now {workers}) or with more memory free") from None
    finally:
        pool.shutdown(wait=finished, cancel_futures=True)
        if not finished:
            ours = set(mp.active_children()) - before
            for process in ours:
                process.terminate()
            for process in ours:
                process.join()


# ----------------------------------------------------------------------- writing shards


class ShardWriter:
    """Streams token arrays into a folder's shards: shard 0 (val) of val_shard_size tokens,
    then train shards of shard_size, the last one what is left.

    A shard's tokens are kept as the arrays they came in and written one after the other,
    so nothing of shard_size is allocated up front (a huge --shard-size costs only the
    tokens there are). It holds the folder (gpt2np.files.FolderLock) until it is closed; as
    a context manager it removes what it wrote if the block fails (Ctrl-C, SIGTERM too).
    """

    def __init__(self, out_dir: str, shard_size: int, val_shard_size: int, fmt: str = "npy",
                 prefix: str = "shard", overwrite: bool = False, progress: bool = True):
        _check_layout(shard_size, val_shard_size, fmt, prefix)
        self.out_dir, self.fmt, self.prefix, self.progress = out_dir, fmt, prefix, progress
        self.sizes = (val_shard_size, shard_size)
        self.lock = files.FolderLock(out_dir, "--out-dir")
        try:
            clear_folder(out_dir, overwrite)
        except BaseException:
            self.lock.release()
            raise
        self.shards: list[dict] = []
        self.chunks: list[np.ndarray] = []
        self.count, self.bar = 0, None
        self.meta = {"complete": False, "format": fmt, "shard_size": shard_size,
                     "val_shard_size": val_shard_size, "shards": self.shards}
        write_meta(out_dir, self.meta)  # marks the folder as being written

    @property
    def capacity(self) -> int:
        return self.sizes[min(len(self.shards), 1)]

    def add(self, tokens: np.ndarray):
        pos = 0
        while pos < len(tokens):
            if self.bar is None and self.progress:
                from tqdm import tqdm

                # SI-scaled counts and rates (35.2M/100M, 4.1M tokens/s), not 35200000
                self.bar = tqdm(total=self.capacity, unit=" tokens", unit_scale=True,
                                file=sys.stderr, desc=f"shard {len(self.shards)}")
            take = min(self.capacity - self.count, len(tokens) - pos)
            self.chunks.append(tokens[pos:pos + take])
            self.count += take
            pos += take
            if self.bar is not None:
                self.bar.update(take)
            if self.count == self.capacity:
                self._flush()

    def _flush(self):
        index = len(self.shards)
        name = shard_name(self.prefix, index, self.fmt)
        write_shard(os.path.join(self.out_dir, name), self.chunks)
        self.shards.append({"file": name, "split": "val" if index == 0 else "train",
                            "tokens": self.count})
        self.chunks, self.count = [], 0
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def finish(self, **info) -> dict:
        """Write the last shard and the complete meta.json (with `info` first); return it."""
        if self.count:
            self._flush()
        meta = {**info, "dtype": "uint16", "format": self.fmt,
                "tokens": sum(s["tokens"] for s in self.shards),
                **{k: self.meta[k] for k in ("shard_size", "val_shard_size")},
                "shards": self.shards, "complete": True}
        write_meta(self.out_dir, meta)
        return meta

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if self.bar is not None:
            self.bar.close()
        try:
            if kind is not None:  # leave the folder without this corpus, never half of it
                for name in [s["file"] for s in self.shards] + [META]:
                    if os.path.exists(os.path.join(self.out_dir, name)):
                        os.unlink(os.path.join(self.out_dir, name))
        finally:
            self.lock.release()


def _check_layout(shard_size: int, val_shard_size: int, fmt: str, prefix: str):
    """Refuse shard sizes, format and prefix that cannot work, before anything is read."""
    for what, n in (("shard_size", shard_size), ("val_shard_size", val_shard_size)):
        if not isinstance(n, (int, np.integer)) or n <= 0:
            raise ValueError(f"{what} must be a positive whole number of tokens, got {n!r}")
    if fmt not in ("npy", "bin"):
        raise ValueError(f"format must be npy or bin, got {fmt!r}")
    if fmt == "bin" and max(shard_size, val_shard_size) > BIN_MAX_TOKENS:
        raise ValueError(f"--format bin holds at most {BIN_MAX_TOKENS:,} tokens per shard "
                         f"(llm.c's header counts them in an int32), got --shard-size "
                         f"{shard_size:,} / --val-shard-size {val_shard_size:,}: use smaller "
                         "shards or --format npy")
    parsed = parse_shard_name(shard_name(prefix, 1, fmt)) if prefix else None
    if "/" in prefix or os.sep in prefix or not parsed or parsed["prefix"] != prefix:
        raise ValueError(f"--prefix {prefix!r} cannot name shard files: use letters, digits, "
                         "'_' or '-', no path separators")


# ----------------------------------------------------------------------- the pipeline


def _check_inputs(inputs, out_dir: str) -> list[str]:
    """The input files, each one a file that exists and none a file prepare writes in
    out_dir (which it would replace before reading it)."""
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    inputs = [os.fspath(p) for p in inputs]
    if not inputs:
        raise ValueError("no input files given: name the text or .jsonl files (--input)")
    for path in inputs:
        real = os.path.realpath(path)
        name = os.path.basename(real)
        if (os.path.dirname(real) == os.path.realpath(out_dir)
                and is_folder_file(files.temp_target(name) or name)):
            raise ValueError(f"input {path} is a file that prepare writes in --out-dir "
                             f"{out_dir}, which it would replace: move it out, or choose "
                             "another --out-dir")
        if os.path.isdir(path):
            raise IsADirectoryError(f"input {path} is a directory: give the files in it "
                                    f"(e.g. --input {os.path.join(path, '*.txt')})")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"input file {path} does not exist: check the path "
                                    "(--input)")
    return inputs


def prepare(inputs: list[str], out_dir: str, shard_size: int = 10 ** 8,
            val_shard_size: int | None = None, workers: int | None = None,
            fmt: str = "npy", prefix: str = "shard", doc_sep: str | None = None,
            text_field: str = "text", encoding_factory: Callable | None = None,
            progress: bool = True, chunksize: int = 16, chunk_chars: int = 1 << 20,
            overwrite: bool = False, documents: Iterable[str] | None = None,
            info: dict | None = None) -> dict:
    """Tokenize `inputs` (files, see the module docstring) or `documents` (any iterable of
    strings, with inputs empty) into shards under `out_dir`; returns the metadata written to
    out_dir/meta.json (`info`'s fields first, e.g. the source). Shard 0 (val) holds
    val_shard_size tokens (default shard_size). A folder that holds shards already is
    refused unless overwrite (they are removed first); one that another prepare is writing,
    always."""
    val_shard_size = shard_size if val_shard_size is None else val_shard_size
    _check_layout(shard_size, val_shard_size, fmt, prefix)
    if doc_sep is not None:
        _check_doc_sep(doc_sep)
    if documents is None:
        inputs = _check_inputs(inputs, out_dir)
        documents = iter_documents(inputs, doc_sep=doc_sep, text_field=text_field,
                                   chunk_chars=chunk_chars)
        source = ", ".join(inputs[:3]) + (f" and {len(inputs) - 3} more" if len(inputs) > 3 else "")
    elif inputs:
        raise ValueError("give input files or documents, not both")
    else:
        source = "the documents"
    encoding_factory = encoding_factory or _default_encoding
    workers = max(1, (os.cpu_count() or 2) // 2) if workers is None else max(1, workers)
    with ShardWriter(out_dir, shard_size, val_shard_size, fmt, prefix, overwrite,
                     progress) as writer:
        n_docs, seen = 0, {"text": False}
        docs = _strings(documents, seen)
        with contextlib.closing(_tokenized(docs, encoding_factory, workers, chunksize)) as toks:
            for tokens in toks:
                writer.add(tokens)
                n_docs += 1
        if not seen["text"]:  # (empty documents are dropped as they are read)
            found = f"{n_docs} documents, all blank" if n_docs else "the input is empty"
            raise ValueError(f"{source}: no documents with any text ({found}): check the "
                             "input files (and --text-field for .jsonl records)")
        enc = encoding_factory()
        meta = writer.finish(**(info or {}), encoding=getattr(enc, "name", type(enc).__name__),
                             eot_token=_eot_of(enc), documents=n_docs)
    if len(meta["shards"]) < 2:
        print(f"warning: {meta['tokens']} tokens filled only the val shard (shard 0); "
              f"lower --val-shard-size / --shard-size to get training shards", file=sys.stderr)
    return meta
