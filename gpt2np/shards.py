"""Stream (x, y) batches from token shards, each rank reading its own slice.

The order is build-nanogpt's DataLoaderLite: within a shard, rank r of `world_size` reads
the B*T+1 tokens at offset B*T*r, then strides by B*T*world_size, so the ranks together
read the shard sequentially, one contiguous block of B*T*world_size tokens per step. When
the next such block would run past the shard's end, every rank moves on to the next shard
at the same step (the tail is skipped) and, after the last shard, back to the first.

    loader = ShardLoader("data/fineweb", B=16, T=1024, rank=r, world_size=w, split="train")
    x, y = loader.next_batch()          # int64 (B, T); y is x shifted by one token
    state = loader.state()              # same on every rank: {"shard": i, "position": p}
    loader.set_state(state)             # resume (also with another rank's state)

Shards are the files `gpt2np.prepare` writes (`*_val_*` / `*_train_*`, .npy or llm.c .bin),
memory-mapped so only the tokens read are paged in.
"""
from __future__ import annotations

import os

import numpy as np

from .prepare import load_shard

_EXTS = (".npy", ".bin")


def list_shards(data_dir: str, split: str) -> list[str]:
    """The shard files of a split ("train" or "val"), sorted (by their index)."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"no shard directory {data_dir!r} (make one with "
                                f"`python -m gpt2np.prepare --input ... --out-dir {data_dir}`)")
    names = sorted(n for n in os.listdir(data_dir)
                   if n.endswith(_EXTS) and f"_{split}_" in n and not n.endswith(".tmp"))
    if not names:
        raise FileNotFoundError(f"no {split} shards (*_{split}_*.npy / .bin) in {data_dir!r}")
    return [os.path.join(data_dir, n) for n in names]


class ShardLoader:
    """Sequential (x, y) batches over a split's shards with per-rank offsets; see the module
    docstring."""

    def __init__(self, data_dir: str, B: int, T: int, rank: int = 0, world_size: int = 1,
                 split: str = "train"):
        if B <= 0 or T <= 0:
            raise ValueError(f"B and T must be positive, got B={B}, T={T}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        self.data_dir, self.split = data_dir, split
        self.B, self.T, self.rank, self.world_size = B, T, rank, world_size
        self.shards = list_shards(data_dir, split)
        need = B * T * world_size + 1  # one step of every rank, plus the last target
        self.lengths = []
        for path in self.shards:
            n = len(load_shard(path))
            if n < need:
                raise ValueError(
                    f"{path} holds {n} tokens, fewer than one step of all ranks needs "
                    f"(B*T*world_size + 1 = {need}): use smaller batches or bigger shards")
            self.lengths.append(n)
        self.reset()

    @property
    def tokens_per_step(self) -> int:
        """Tokens all ranks together consume per next_batch()."""
        return self.B * self.T * self.world_size

    def reset(self):
        """Back to the start of the first shard (e.g. before every validation pass)."""
        self._load(0)
        self.position = self.B * self.T * self.rank

    def _load(self, shard: int):
        self.current_shard = shard
        self.tokens = load_shard(self.shards[shard])

    def next_batch(self):
        B, T = self.B, self.T
        buf = np.asarray(self.tokens[self.position:self.position + B * T + 1], dtype=np.int64)
        x = buf[:-1].reshape(B, T)
        y = buf[1:].reshape(B, T)
        self.position += self.tokens_per_step
        # all ranks advance together: move on when the next block of every rank won't fit
        if self.position - B * T * self.rank + self.tokens_per_step + 1 > len(self.tokens):
            self._load((self.current_shard + 1) % len(self.shards))
            self.position = B * T * self.rank
        return x, y

    def state(self) -> dict:
        """Where the next batch starts, independent of the rank (rank 0's offset)."""
        return {"shard": int(self.current_shard),
                "position": int(self.position - self.B * self.T * self.rank)}

    def set_state(self, state: dict):
        shard, position = int(state["shard"]), int(state["position"])
        if not 0 <= shard < len(self.shards):
            raise ValueError(f"loader state names shard {shard}, the {self.split} split has "
                             f"{len(self.shards)}")
        if position < 0:
            raise ValueError(f"loader state has a negative position {position}")
        self._load(shard)
        if position + self.tokens_per_step + 1 > len(self.tokens):
            # saved with a smaller step (batch or world size) near the shard's end: the next
            # step would not fit, so it starts the next shard, as next_batch() would have
            self._load((shard + 1) % len(self.shards))
            position = 0
        self.position = position + self.B * self.T * self.rank

    # the names gpt2np.data.BatchLoader and torch use, for the checkpoint code
    state_dict = state
    load_state_dict = set_state
