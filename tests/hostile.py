"""Hostile inputs for the reading-safety tests (tests/test_reads_*.py): small model folders,
checkpoints and shard folders to damage, sparse files, and a run under a memory limit.

  model_folder(path, **config)      a tiny HF folder (config.json + model.safetensors)
  sharded_folder(path)              the same model as model.safetensors.index.json + 2 shards
  edit_json(path, **changes)        change keys of a JSON file (None deletes the key)
  run_checkpoint(path, params=...)  a training-run checkpoint of a tiny GPT (valid SHA-256)
  shard_folder(path)                a prepared-style shard folder (meta.json + 2 .npy shards)
  sparse(path, size, head=b"")      a file of `size` bytes that takes no disk: `head`, then holes
  run_limited(code, mb)             `code` in a fresh interpreter whose address space is capped
  cli(main, argv, capsys)           a command's exit code, last stderr line and stdout
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

from gpt2np import GPT, GPTConfig, save_pretrained
from gpt2np.data.shards import shard_name, write_meta, write_shard
from gpt2np.io.checkpoint import Checkpoint, save_checkpoint
from gpt2np.io.hf_folder import hf_config

ROOT = Path(__file__).resolve().parents[1]
# the GPT-2 vocabulary, so that `generate`'s default prompt encodes; 4 channels keep it small
TINY = GPTConfig(block_size=8, vocab_size=50257, n_layer=1, n_head=1, n_embd=4)


def model_folder(path: Path, config: GPTConfig = TINY, seed: int = 0) -> Path:
    save_pretrained(GPT(config, seed=seed), path)
    return path


def sharded_folder(path: Path, config: GPTConfig = TINY) -> Path:
    """The model as transformers shards it: an index naming two files."""
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(hf_config(config)))
    state = GPT(config).state_dict()
    names = list(state)
    shards = {"model-00001-of-00002.safetensors": names[:2],
              "model-00002-of-00002.safetensors": names[2:]}
    for shard, keys in shards.items():
        save_file({k: np.ascontiguousarray(state[k]) for k in keys}, str(path / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return path


def edit_json(path: Path, **changes) -> Path:
    d = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            d.pop(k, None)
        else:
            d[k] = v
    path.write_text(json.dumps(d))
    return path


def run_checkpoint(path: Path, config: GPTConfig = TINY, params: dict | None = None,
                   state: dict | None = None) -> Path:
    """A checkpoint as the training loop writes one (its SHA-256 valid), of `params`."""
    params = GPT(config).state_dict() if params is None else params
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    state = {"step": 1, "run": {}, "model_config": config.to_dict()} if state is None else state
    save_checkpoint(path, Checkpoint(params=params, m=zeros, v=dict(zeros), t=1, state=state))
    return path


def shard_folder(path: Path, tokens: int = 600) -> Path:
    """meta.json + a val and a train .npy shard, as gpt2np prepare lays them out."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shards = []
    for index in (0, 1):
        name = shard_name("toy", index)
        write_shard(str(path / name), rng.integers(0, 50257, tokens).astype(np.uint16))
        shards.append({"file": name, "split": "val" if index == 0 else "train", "tokens": tokens})
    write_meta(str(path), {"shards": shards, "complete": True})
    return path


def sparse(path: Path, size: int, head: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(size)
    return path


def run_limited(code: str, mb: int = 400) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (the worktree's gpt2np) with its address space
    capped at `mb` MiB: anything that allocates what a file claims fails with MemoryError."""
    prelude = (f"import resource\nresource.setrlimit(resource.RLIMIT_AS, ({mb} << 20, {mb} << 20))\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1",
           "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], env=env,
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def cli(main, argv, capsys) -> tuple[int, str, str]:
    """(exit code, last stderr line, stdout) of a command's main(argv); no traceback allowed."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:  # argparse
        code = e.code
    out, err = capsys.readouterr()
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    return code, lines[-1] if lines else "", out


def tree_of(folder: Path) -> dict:
    """Every entry under folder: a link's target, a file's bytes, a folder's marker (to check
    that nothing under it changed)."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        out[rel] = (("link", os.readlink(p)) if p.is_symlink() else
                    ("file", p.read_bytes()) if p.is_file() else ("dir",))
    return out
