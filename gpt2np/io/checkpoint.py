"""Training checkpoints: one safetensors file, written atomically, checked on load.

The file holds
  the params under their Hugging Face names (so `safetensors.numpy.load_file` of it, keys
    starting with "transformer.", is a plain GPT-2 state dict),
  AdamW's moments as "optimizer.m.<name>" and "optimizer.v.<name>",
  a JSON `state` in the safetensors metadata: step, optimizer step count, the run's
    settings, data position and RNG (whatever the training loop puts there),
  a SHA-256 over every tensor's bytes and the metadata beside it (format, t, state), so
    silent corruption or an edited header (say `state.step`) is caught, not trained on.
    Checkpoints written before the metadata was covered (no "sha256_scope" key) still load:
    their SHA-256 covers the tensors only. Dropping that key from a new file is caught too,
    since its SHA-256 then no longer matches the tensors alone.

It is written through gpt2np.files with fsync: a temporary file in the same folder, fsynced,
then renamed over the old one, so a crash at any moment leaves either the old or the new
checkpoint, never half of one.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from gpt2np import files
from gpt2np.io import safetensors_layout

CKPT_NAME = "ckpt.safetensors"  # a training run's checkpoint, in its out-dir

FORMAT_NAME = "gpt2np-checkpoint"  # the metadata's "format" is FORMAT_NAME-<version>
FORMAT = f"{FORMAT_NAME}-1"
_M, _V = "optimizer.m.", "optimizer.v."


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, corrupt, or not matching the run."""


@dataclass
class Checkpoint:
    params: dict[str, np.ndarray]
    m: dict[str, np.ndarray]  # AdamW first moments, same keys as params
    v: dict[str, np.ndarray]  # second moments
    t: int  # optimizer steps taken (for the bias correction)
    state: dict  # JSON-able: step, settings, data position, RNG ...


SCOPE = "tensors+metadata"  # what "sha256" covers; absent in older checkpoints: the tensors


def _digest(tensors: dict[str, np.ndarray], metadata: dict | None = None) -> str:
    """SHA-256 over the tensors (names, dtypes, shapes, bytes), then, when given, every
    metadata entry but the digest itself (sorted, as JSON)."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        a = tensors[k]
        h.update(f"{k}:{a.dtype.str}:{a.shape};".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    if metadata is not None:
        covered = {k: v for k, v in metadata.items() if k != "sha256"}
        h.update(json.dumps(covered, sort_keys=True).encode())
    return h.hexdigest()


def save_checkpoint(path: str | os.PathLike, ckpt: Checkpoint):
    """Write `ckpt` to `path` atomically and durably (temp file + fsync + rename)."""
    path = Path(path)
    if set(ckpt.m) != set(ckpt.params) or set(ckpt.v) != set(ckpt.params):
        raise ValueError("optimizer moments must have the same keys as the params")
    tensors = {k: np.ascontiguousarray(v) for k, v in ckpt.params.items()}
    tensors.update({_M + k: np.ascontiguousarray(v) for k, v in ckpt.m.items()})
    tensors.update({_V + k: np.ascontiguousarray(v) for k, v in ckpt.v.items()})
    metadata = {"format": FORMAT, "t": str(int(ckpt.t)), "state": json.dumps(ckpt.state),
                "sha256_scope": SCOPE}
    metadata["sha256"] = _digest(tensors, metadata)
    data = st_save(tensors, metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_bytes(path, data, fsync=True)


def _metadata(data: bytes) -> dict:
    return safetensors_layout.metadata(safetensors_layout.split(data)[0])


def is_checkpoint(path) -> bool:
    """Whether `path` is a gpt2np training checkpoint (of any format version), by its
    metadata alone; a damaged one is then refused by load_checkpoint with its reason."""
    try:
        meta = safetensors_layout.metadata(safetensors_layout.read_header(path)[0])
    except (OSError, ValueError, AttributeError):
        return False
    return str(meta.get("format", "")).startswith(FORMAT_NAME)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint; any problem is a CheckpointError saying what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    data = path.read_bytes()
    try:
        meta = _metadata(data)
        tensors = st_load(data)
    except Exception as e:  # truncated file, garbage header, bad offsets ...
        raise CheckpointError(f"checkpoint {path} is corrupt (unreadable safetensors: {e})") from e
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a gpt2np training checkpoint "
                              f"(format {meta.get('format')!r}, expected {FORMAT!r})")
    scope = meta.get("sha256_scope")
    if scope not in (None, SCOPE):
        raise CheckpointError(f"checkpoint {path} is corrupt: unknown sha256_scope {scope!r}")
    if _digest(tensors, meta if scope else None) != meta.get("sha256"):
        what = "its tensors and metadata do" if scope else "its tensors do"
        raise CheckpointError(f"checkpoint {path} is corrupt or was edited: {what} not match "
                              "the SHA-256 recorded when it was written")
    try:
        state = json.loads(meta["state"])
        t = int(meta["t"])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: bad metadata ({e})") from e
    params = {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}
    m = {k[len(_M):]: v for k, v in tensors.items() if k.startswith(_M)}
    v = {k[len(_V):]: v for k, v in tensors.items() if k.startswith(_V)}
    if set(m) != set(params) or set(v) != set(params):
        raise CheckpointError(f"checkpoint {path} is corrupt: optimizer moments do not "
                              "cover the params")
    return Checkpoint(params=params, m=m, v=v, t=t, state=state)
