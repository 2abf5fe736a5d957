"""The order training reads tokens in: build-nanogpt's DataLoaderLite, one implementation for
tiny Shakespeare (one token array, gpt2np.data.shakespeare.BatchLoader) and for a folder of
token shards (gpt2np.data.shards.ShardLoader).

Within a shard, rank r of `world_size` reads the B*T+1 tokens at offset B*T*r, then strides
by B*T*world_size, so the ranks together read the shard sequentially, one contiguous block
of B*T*world_size tokens per step. When the next such block would run past the shard's end,
every rank moves on to the next shard at the same step (the tail is skipped) and, after the
last shard, back to the first (one array: back to its start). That decision is the same on
every rank (unlike DataLoaderLite's, where each rank tests its own chunk and a later rank can
wrap a step early), so W ranks of B rows read exactly what one process of W*B rows reads,
also across the wrap.
"""
from __future__ import annotations

import numpy as np


class StridedLoader:
    """(x, y) int64 (B, T) batches in the order above; y is x shifted by one token.

    A subclass says how many shards are read (`n_used`, set before reset()) and how shard i's
    tokens are opened (`_open(i)`); it keeps its own state format on top of `current_shard`
    (the shard being read) and `position` (this rank's offset in it).
    """

    n_used = 1

    def __init__(self, B: int, T: int, rank: int = 0, world_size: int = 1):
        if B <= 0 or T <= 0:
            raise ValueError(f"B and T must be positive, got B={B}, T={T}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must lie in [0, world_size={world_size})")
        self.B, self.T, self.rank, self.world_size = B, T, rank, world_size

    def _open(self, shard: int):
        raise NotImplementedError

    @property
    def tokens_per_step(self) -> int:
        """Tokens all ranks together consume per next_batch()."""
        return self.B * self.T * self.world_size

    @property
    def rank_offset(self) -> int:
        """Where this rank reads, relative to rank 0."""
        return self.B * self.T * self.rank

    def reset(self):
        """Back to the start of the first shard (e.g. before every validation pass)."""
        self._load(0)
        self.position = self.rank_offset

    def _load(self, shard: int):
        self.current_shard = shard
        self.tokens = self._open(shard)

    def step_fits(self, start: int) -> bool:
        """Whether a step of all ranks from rank 0's offset `start` fits the current shard."""
        return start + self.tokens_per_step + 1 <= len(self.tokens)

    def next_batch(self) -> tuple[np.ndarray, np.ndarray]:
        B, T = self.B, self.T
        buf = np.asarray(self.tokens[self.position:self.position + B * T + 1], dtype=np.int64)
        self.position += self.tokens_per_step
        # rank-independent: does the next block of every rank fit (rank 0's position)?
        if not self.step_fits(self.position - self.rank_offset):
            self._load((self.current_shard + 1) % self.n_used)
            self.position = self.rank_offset
        return buf[:-1].reshape(B, T), buf[1:].reshape(B, T)
