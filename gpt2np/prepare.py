"""Tokenize text corpora into uint16 token shards, FineWeb-style (build-nanogpt's fineweb.py).

    python -m gpt2np.prepare --input corpus/*.txt --out-dir data/mycorpus --shard-size 100000000

Every document becomes `<|endoftext|>` (50256) followed by its GPT-2 tokens, so documents
are separated (and the first one is delimited too, as fineweb.py does). Tokens stream into
fixed-size shards of `--shard-size` tokens (the last one shorter); shard 0 is the
validation split, the rest are training shards:

    out-dir/<prefix>_val_000000.npy, <prefix>_train_000001.npy, ..., meta.json

Documents are:
- `.jsonl` / `.json` lines: one document per line, its `--text-field` (default "text");
- any other file: the whole file is one document, or, with `--doc-sep STR`, the pieces
  between occurrences of STR (e.g. `--doc-sep '<|endoftext|>'` for text that already
  marks its document boundaries). Splitting inside a document would change the BPE merges
  at the cut, so documents are never cut.

Tokenization runs in `--workers` processes (multiprocessing.Pool.imap keeps the document
order, so the output is deterministic); a tqdm bar per shard shows progress. `--format bin`
writes llm.c's .bin layout instead (a 256 x int32 header: magic 20240520, version 1, token
count; then the uint16 tokens). `gpt2np.shards.ShardLoader` reads both.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
from typing import Callable, Iterable, Iterator

import numpy as np

BIN_MAGIC = 20240520  # llm.c's token-file magic
BIN_VERSION = 1
BIN_HEADER_INTS = 256


# ----------------------------------------------------------------------- documents


def iter_documents(paths: Iterable[str], doc_sep: str | None = None,
                   text_field: str = "text", chunk_chars: int = 1 << 20) -> Iterator[str]:
    """Yield the documents of the files, in order (see the module docstring)."""
    for path in paths:
        if path.endswith((".jsonl", ".json")):
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        yield json.loads(line)[text_field]
                    except (ValueError, KeyError, TypeError) as e:
                        raise ValueError(f"{path}:{lineno}: expected a JSON object with a "
                                         f"{text_field!r} string ({e})") from e
        elif doc_sep is None:
            with open(path, encoding="utf-8") as f:
                yield f.read()
        else:
            yield from _split_stream(path, doc_sep, chunk_chars)


def _split_stream(path: str, sep: str, chunk_chars: int) -> Iterator[str]:
    """The pieces of a file between occurrences of sep, read in chunks (big files welcome).
    Empty pieces (a leading separator, two in a row) are dropped."""
    buf = ""
    with open(path, encoding="utf-8") as f:
        while True:
            chunk = f.read(chunk_chars)
            buf += chunk
            parts = buf.split(sep)
            buf = parts.pop()  # may be an incomplete document (or a split separator)
            for part in parts:
                if part:
                    yield part
            if not chunk:
                break
    if buf:
        yield buf


# ----------------------------------------------------------------------- tokenizing


def _default_encoding():
    from .tokenizer import get_encoding

    return get_encoding()


_ENC = None  # the worker process's encoding, built once by _init_worker


def _init_worker(encoding_factory: Callable):
    global _ENC
    _ENC = encoding_factory()


def _eot_of(enc) -> int:
    eot = getattr(enc, "eot_token", None)
    if eot is None:
        eot = enc._special_tokens["<|endoftext|>"]
    return int(eot)


def tokenize_document(doc: str, enc=None) -> np.ndarray:
    """[<|endoftext|>] + encode_ordinary(doc) as uint16 (special tokens in the text are
    treated as plain text, never as control tokens)."""
    enc = _ENC if enc is None else enc
    ids = enc.encode_ordinary(doc)
    tokens = np.asarray([_eot_of(enc)] + list(ids), dtype=np.int64)
    if tokens.min() < 0 or tokens.max() >= 2 ** 16:
        raise ValueError(f"token ids must fit uint16, got range [{tokens.min()}, {tokens.max()}]")
    return tokens.astype(np.uint16)


# ----------------------------------------------------------------------- shard files


def shard_name(prefix: str, index: int, fmt: str = "npy") -> str:
    split = "val" if index == 0 else "train"
    return f"{prefix}_{split}_{index:06d}.{fmt}"


def write_shard(path: str, tokens: np.ndarray):
    """Write uint16 tokens as .npy or llm.c .bin (by extension), atomically."""
    tokens = np.ascontiguousarray(tokens, dtype=np.uint16)
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        if path.endswith(".bin"):
            header = np.zeros(BIN_HEADER_INTS, dtype=np.int32)
            header[:3] = (BIN_MAGIC, BIN_VERSION, len(tokens))
            f.write(header.tobytes())
            f.write(tokens.tobytes())
        else:
            np.save(f, tokens)
    os.replace(tmp, path)


def load_shard(path: str, mmap: bool = True) -> np.ndarray:
    """A shard's uint16 tokens (memory-mapped by default: pretraining shards are large)."""
    if path.endswith(".bin"):
        header = np.fromfile(path, dtype=np.int32, count=BIN_HEADER_INTS)
        if len(header) < 3 or header[0] != BIN_MAGIC:
            raise ValueError(f"{path}: not an llm.c token file (bad magic)")
        if header[1] != BIN_VERSION:
            raise ValueError(f"{path}: unsupported version {header[1]}")
        n = int(header[2])
        offset = BIN_HEADER_INTS * 4
        if mmap:
            tokens = np.memmap(path, dtype=np.uint16, mode="r", offset=offset, shape=(n,))
        else:
            tokens = np.fromfile(path, dtype=np.uint16, offset=offset, count=n)
        if len(tokens) != n:
            raise ValueError(f"{path}: header says {n} tokens, file holds {len(tokens)}")
        return tokens
    tokens = np.load(path, mmap_mode="r" if mmap else None)
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise ValueError(f"{path}: expected a 1-D uint16 array, got {tokens.dtype} {tokens.shape}")
    return tokens


# ----------------------------------------------------------------------- the pipeline


def prepare(inputs: list[str], out_dir: str, shard_size: int = 10 ** 8,
            val_shard_size: int | None = None, workers: int | None = None,
            fmt: str = "npy", prefix: str = "shard", doc_sep: str | None = None,
            text_field: str = "text", encoding_factory: Callable | None = None,
            progress: bool = True, chunksize: int = 16, chunk_chars: int = 1 << 20) -> dict:
    """Tokenize `inputs` into shards under `out_dir`; returns the metadata written to
    out_dir/meta.json. Shard 0 (val) holds val_shard_size tokens (default shard_size)."""
    if shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {shard_size}")
    val_shard_size = shard_size if val_shard_size is None else val_shard_size
    if val_shard_size <= 0:
        raise ValueError(f"val_shard_size must be positive, got {val_shard_size}")
    if fmt not in ("npy", "bin"):
        raise ValueError(f"format must be npy or bin, got {fmt!r}")
    missing = [p for p in inputs if not os.path.isfile(p)]
    if not inputs or missing:
        raise FileNotFoundError(f"no such input file(s): {missing}" if missing else "no inputs")
    encoding_factory = encoding_factory or _default_encoding
    workers = max(1, (os.cpu_count() or 2) // 2) if workers is None else max(1, workers)
    os.makedirs(out_dir, exist_ok=True)

    from tqdm import tqdm

    shards = []
    n_docs = 0
    state = {"index": 0, "count": 0, "bar": None}
    buf = np.empty(val_shard_size, dtype=np.uint16)

    def capacity(index):
        return val_shard_size if index == 0 else shard_size

    def flush():
        nonlocal buf
        index, count = state["index"], state["count"]
        name = shard_name(prefix, index, fmt)
        write_shard(os.path.join(out_dir, name), buf[:count])
        shards.append({"file": name, "split": "val" if index == 0 else "train", "tokens": count})
        if state["bar"] is not None:
            state["bar"].close()
        state.update(index=index + 1, count=0, bar=None)
        if len(buf) != capacity(index + 1):
            buf = np.empty(capacity(index + 1), dtype=np.uint16)

    def consume(tokens):
        pos = 0
        while pos < len(tokens):
            if state["bar"] is None and progress:
                state["bar"] = tqdm(total=capacity(state["index"]), unit="tokens",
                                    desc=f"shard {state['index']}", file=sys.stderr)
            room = capacity(state["index"]) - state["count"]
            take = min(room, len(tokens) - pos)
            buf[state["count"]:state["count"] + take] = tokens[pos:pos + take]
            state["count"] += take
            pos += take
            if state["bar"] is not None:
                state["bar"].update(take)
            if state["count"] == capacity(state["index"]):
                flush()

    docs = iter_documents(inputs, doc_sep=doc_sep, text_field=text_field,
                          chunk_chars=chunk_chars)
    if workers == 1:
        enc = encoding_factory()
        for doc in docs:
            consume(tokenize_document(doc, enc))
            n_docs += 1
    else:
        ctx = mp.get_context("spawn" if sys.platform == "darwin" else None)
        with ctx.Pool(workers, initializer=_init_worker, initargs=(encoding_factory,)) as pool:
            for tokens in pool.imap(tokenize_document, docs, chunksize=chunksize):
                consume(tokens)
                n_docs += 1
    if state["count"] > 0:
        flush()
    if state["bar"] is not None:
        state["bar"].close()

    enc = encoding_factory()
    meta = {
        "encoding": getattr(enc, "name", type(enc).__name__),
        "eot_token": _eot_of(enc),
        "dtype": "uint16",
        "format": fmt,
        "documents": n_docs,
        "tokens": sum(s["tokens"] for s in shards),
        "shard_size": shard_size,
        "val_shard_size": val_shard_size,
        "shards": shards,
    }
    with open(os.path.join(out_dir, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    if len(shards) < 2:
        print(f"warning: {meta['tokens']} tokens filled only the val shard (shard 0); "
              f"lower --val-shard-size / --shard-size to get training shards", file=sys.stderr)
    return meta


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="python -m gpt2np.prepare",
        description="Tokenize text files into uint16 GPT-2 token shards (shard 0 = val).")
    ap.add_argument("--input", "-i", nargs="+", required=True,
                    help="text files (.txt: one document per file or per --doc-sep; "
                         ".jsonl: one document per line)")
    ap.add_argument("--out-dir", "-o", required=True, help="directory for the shards")
    ap.add_argument("--shard-size", type=int, default=10 ** 8, help="tokens per shard (1e8)")
    ap.add_argument("--val-shard-size", type=int, default=None,
                    help="tokens in shard 0, the val split (default: --shard-size)")
    ap.add_argument("--workers", type=int, default=None,
                    help="tokenizer processes (default: half the CPU cores)")
    ap.add_argument("--format", choices=("npy", "bin"), default="npy",
                    help="npy (numpy) or bin (llm.c's header + uint16)")
    ap.add_argument("--prefix", default="shard", help="shard file name prefix")
    ap.add_argument("--doc-sep", default=None,
                    help="split plain-text files into documents at this string")
    ap.add_argument("--text-field", default="text", help="the text field of .jsonl records")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    meta = prepare(args.input, args.out_dir, shard_size=args.shard_size,
                   val_shard_size=args.val_shard_size, workers=args.workers, fmt=args.format,
                   prefix=args.prefix, doc_sep=args.doc_sep, text_field=args.text_field,
                   progress=not args.no_progress)
    print(f"{meta['documents']} documents, {meta['tokens']:,} tokens in "
          f"{len(meta['shards'])} shards -> {args.out_dir}")
    return meta


if __name__ == "__main__":
    main()
