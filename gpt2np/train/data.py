"""A training run's data: tiny Shakespeare (90/10 split) or token shards, as two loaders.

  load_data(cfg, run)  -> TrainData: the train and val loaders of this rank, the data's
                          identity (data_id, checked on resume) and sizes
  resume_position(...)    this rank's train-loader state from a checkpoint, also when the
                          number of ranks changed

May touch: the data files and the token cache (gpt2np.data.shakespeare, gpt2np.data.shards); nothing else.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np

from gpt2np.data.shakespeare import BatchLoader, find_data, load_tokens, split
from gpt2np.data.shards import ShardLoader
from gpt2np.train.settings import RunSettings, TrainConfig, TrainError


@dataclass
class TrainData:
    train: BatchLoader | ShardLoader  # this rank's batches, in the run's order
    val: BatchLoader | ShardLoader  # reset() before each evaluation: the same batches each time
    data_id: str  # a hash of the tokens (or the shards' names and sizes)
    source: str  # the file or folder, for messages
    flag: str  # the flag that names it: "--data" or "--data-shards"
    n_train: int
    n_val: int


def load_data(cfg: TrainConfig, run: RunSettings) -> TrainData:
    B, T, W = run.batch_size, run.block_size, cfg.world_size
    if run.data_shards:
        return _shards(cfg, run)
    # tiny Shakespeare: one tokenization, cached; 90/10 split
    source = find_data(cfg.data, cache=cfg.cache_dir)
    tokens = load_tokens(source, cache=cfg.cache_dir)
    data_id = hashlib.sha256(tokens.tobytes()).hexdigest()[:16]
    train_tokens, val_tokens = split(tokens)
    try:
        train = BatchLoader(train_tokens, B, T, rank=cfg.rank, world_size=W,
                            random=run.random_batches, seed=run.seed)
        val = BatchLoader(val_tokens, B, T)  # every rank reads all (see evaluators.ValLoss)
    except ValueError as e:
        raise TrainError(f"the data are too small for these batches: {e}") from e
    return TrainData(train, val, data_id, str(source), "--data", len(train_tokens),
                     len(val_tokens))


def _shards(cfg: TrainConfig, run: RunSettings) -> TrainData:
    # token shards (gpt2np prepare): shard 0 is val, the rest train
    B, T, W = run.batch_size, run.block_size, cfg.world_size
    if run.random_batches:
        raise TrainError("--random-batches is for tiny Shakespeare; shards are read in order")
    try:
        train = ShardLoader(run.data_shards, B, T, cfg.rank, W, "train")
        val = ShardLoader(run.data_shards, B, T, 0, 1, "val")  # all ranks: evaluators.ValLoss
    except FileNotFoundError as e:
        given = "" if cfg.data_shards else " (the checkpoint's; pass --data-shards DIR if it moved)"
        raise TrainError(f"--data-shards {run.data_shards}{given}: {e}") from e
    except ValueError as e:
        raise TrainError(f"the shards are too small for these batches: {e}") from e
    data_id = hashlib.sha256(json.dumps(
        [(os.path.basename(p), n) for loader in (val, train)
         for p, n in zip(loader.shards, loader.lengths)]).encode()).hexdigest()[:16]
    return TrainData(train, val, data_id, run.data_shards, "--data-shards",
                     sum(train.lengths), sum(val.lengths))


def resume_position(state: dict, loader, rank: int, world_size: int, run: RunSettings,
                    step: int) -> dict:
    """This rank's data-loader state from a checkpoint: its own when the world size is the
    one saved, else rank 0's moved to this rank's offset (so a run can resume on another
    number of processes)."""
    ranks = state.get("data_ranks")
    if ranks and len(ranks) == world_size:
        return ranks[rank]
    data = dict(state["data"])
    if isinstance(loader, ShardLoader) or rank == 0:
        return data  # ShardLoader states do not depend on the rank
    if run.random_batches:  # a fresh stream per rank, not rank 0's again
        data["rng"] = np.random.default_rng([run.seed, rank, step]).bit_generator.state
    else:
        data["position"] = int(data["position"]) + loader.B * loader.T * rank
    return data
