"""Evaluate a model: HellaSwag accuracy, or the loss (and perplexity) on a text or shards.

    gpt2np eval --model gpt2 --task hellaswag                  # (gpt2np eval ...)
    gpt2np eval --model runs/x --task loss --data input.txt --json loss.json
    gpt2np eval --model gpt2 --task loss --data data/fineweb_edu   # val shards
    torchrun --standalone --nproc_per_node=8 -m gpt2np eval --model gpt2 --task hellaswag \
        --backend cupy

--model is anything gpt2np.from_pretrained takes (a hub name, a folder, a training run).
`loss` scores every token of the data once: non-overlapping windows of the block size, each
token predicted from the window's earlier tokens (the first token of each window from none),
so it is what training's val_loss measures, not a sliding-window perplexity.
Under torchrun, items (or windows) are shared out by rank and the counts summed; rank 0 prints.
"""
from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt2np.config import GPT2_VOCAB_SIZE
from gpt2np.evals.hellaswag import (DEFAULT_LOGITS_BUDGET, FORWARD_TOKENS, logits_function,
                                    losses_function, token_losses)

TASKS = ("hellaswag", "loss")
BACKENDS = ("numpy", "cupy", "torch")


@dataclass
class LossResult:
    n_tokens: int  # tokens predicted
    sum_loss: float  # their summed cross-entropy (nats)

    @property
    def loss(self) -> float:
        return self.sum_loss / self.n_tokens if self.n_tokens else float("nan")

    @property
    def ppl(self) -> float:
        return math.exp(self.loss) if self.n_tokens else float("nan")

    def __str__(self) -> str:
        return f"loss: {self.loss:.4f} (perplexity {self.ppl:.2f}) over {self.n_tokens:,} tokens"


def load_eval_tokens(path) -> np.ndarray:
    """The tokens to score: a shard folder's val split (all its shards, in order), one shard
    file (.npy / .bin), or a text file (GPT-2 tokens, not cached)."""
    from gpt2np.data.shards import list_shards, load_shard

    p = Path(os.path.expanduser(str(path)))
    if p.is_dir():
        return np.concatenate([np.asarray(load_shard(s)) for s in list_shards(str(p), "val")])
    if not p.is_file():
        raise FileNotFoundError(f"no such file or shard folder: {str(p)!r}")
    if p.suffix in (".npy", ".bin"):
        return np.asarray(load_shard(str(p)))
    from gpt2np.data.shakespeare import decode_text, read_text_bytes
    from gpt2np.data.tokenizer import encode

    # as training reads text: UTF-8 with its line endings kept, binary files refused
    return np.asarray(encode(decode_text(read_text_bytes(p), p)), dtype=np.int64)


def windows(n_tokens: int, block_size: int) -> list[tuple[int, int]]:
    """(start, length) of the non-overlapping windows that predict tokens 1..n-1 once each."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if n_tokens < 2:
        raise ValueError(f"the data hold {n_tokens} token(s); the loss needs at least 2")
    return [(s, min(block_size, n_tokens - 1 - s)) for s in range(0, n_tokens - 1, block_size)]


def token_loss(model, tokens, *, block_size: int | None = None, limit: int | None = None,
               ctx=None, progress: bool = True, logits_budget: int = DEFAULT_LOGITS_BUDGET,
               backend=None) -> LossResult:
    """Mean cross-entropy of `tokens` (1-D ints) under the model, over non-overlapping
    block-size windows (the first `limit` of them). Rank r takes windows i % world == r.
    model: anything hellaswag.logits_function takes; backend: that of a plain function's
    logits (default: the model's `backend`, else numpy arrays). logits_budget bounds a
    plain function's logits per forward; a gpt2np.GPT makes none (GPT.token_losses) and
    takes FORWARD_TOKENS tokens of windows per forward."""
    config = getattr(model, "config", None)
    if block_size is None and config is None:
        raise ValueError("pass block_size= when the model is a plain logits function")
    block_size = block_size or config.block_size
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"limit must be None (every window) or an int >= 1, got {limit!r}")
    vocab = getattr(config, "vocab_size", None) or GPT2_VOCAB_SIZE
    tokens = np.asarray(tokens, dtype=np.int64)
    wins = windows(len(tokens), block_size)[:limit]
    rank, world = (ctx.rank, ctx.world_size) if ctx is not None else (0, 1)
    mine = wins[rank::world]
    # (B, T, V) float32 logits plus their float64 copy at every position: keep them in budget
    per_batch = max(1, logits_budget // (12 * vocab * block_size))
    score = losses_function(model)  # a gpt2np.GPT: no logits at all, so big batches
    if score is not None:
        per_batch = max(per_batch, FORWARD_TOKENS // block_size)
    logits_fn = logits_function(model)
    backend = backend or getattr(model, "backend", None)
    from tqdm import tqdm

    total, count = 0.0, 0
    with tqdm(total=len(mine), unit="window", desc="loss", file=sys.stderr, leave=False,
              disable=not progress or (ctx is not None and not ctx.is_main)) as bar:
        for b in range(0, len(mine), per_batch):
            group = mine[b:b + per_batch]
            for length in sorted({n for _, n in group}):  # the tail window alone
                same = [s for s, n in group if n == length]
                x = np.stack([tokens[s:s + length] for s in same])  # (B, T)
                y = np.stack([tokens[s + 1:s + length + 1] for s in same])
                rows, cols = np.divmod(np.arange(x.size), length)
                nll = (score(x, rows, cols, y.reshape(-1)) if score is not None else
                       token_losses(logits_fn(x), rows, cols, y.reshape(-1), backend))
                total += float(nll.sum())
                count += x.size
            bar.update(len(group))
    if ctx is not None and ctx.distributed:
        total, count = ctx.all_reduce_sum(np.array([total, count], dtype=np.float64))
    return LossResult(int(round(count)), float(total))
