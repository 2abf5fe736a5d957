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
from safetensors import safe_open
from safetensors.numpy import save as st_save

from gpt2np import files
from gpt2np.config import GPTConfig
from gpt2np.io import safetensors_layout
from gpt2np.model import param_shapes
from gpt2np.untrusted import check_finite

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


def is_checkpoint(path) -> bool:
    """Whether `path` is a gpt2np training checkpoint (of any format version), by its
    metadata alone; a damaged one is then refused by load_checkpoint with its reason."""
    try:
        meta = safetensors_layout.metadata(safetensors_layout.read_header(path)[0])
    except (OSError, ValueError, AttributeError):
        return False
    return str(meta.get("format", "")).startswith(FORMAT_NAME)


def load_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint; any problem is a CheckpointError saying what is wrong.

    Everything the file claims is checked before the tensors are read: its header against
    the file's real size (gpt2np.io.safetensors_layout), its metadata, and the tensors'
    names and shapes against the model config it records. Then its SHA-256, and that every
    tensor is finite."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        header, offset = safetensors_layout.read_header(path)
        layout = safetensors_layout.check_tensors(path, header, offset)
    except ValueError as e:  # truncated file, garbage header, bad offsets ...
        raise CheckpointError(f"checkpoint {path} is corrupt (unreadable safetensors: {e})") from e
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{path} is not a gpt2np training checkpoint "
                              f"(format {found!r}, expected {FORMAT!r})")
    scope = meta.get("sha256_scope")
    if scope not in (None, SCOPE):
        raise CheckpointError(f"checkpoint {path} is corrupt: unknown sha256_scope {scope!r}")
    state, t = _state(path, meta)
    _check_layout(path, layout, state)
    tensors = _read_tensors(path)
    if _digest(tensors, meta if scope else None) != meta.get("sha256"):
        what = "its tensors and metadata do" if scope else "its tensors do"
        raise CheckpointError(f"checkpoint {path} is corrupt or was edited: {what} not match "
                              "the SHA-256 recorded when it was written")
    try:
        check_finite(tensors, f"checkpoint {path}")
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    params = {k: v for k, v in tensors.items() if not k.startswith("optimizer.")}
    m = {k[len(_M):]: v for k, v in tensors.items() if k.startswith(_M)}
    v = {k[len(_V):]: v for k, v in tensors.items() if k.startswith(_V)}
    return Checkpoint(params=params, m=m, v=v, t=t, state=state)


def _state(path: Path, meta: dict) -> tuple[dict, int]:
    """(state, t) from the metadata, checked: a JSON object, and a step count >= 0."""
    try:
        state = json.loads(meta["state"])
        t = int(meta["t"])
        if not isinstance(state, dict) or t < 0:
            raise ValueError(f"state {str(state)[:40]!r}, t {t}")
    except (KeyError, TypeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"checkpoint {path} is corrupt: bad metadata "
                              f"({type(e).__name__}: {e})") from e
    return state, t


def _check_layout(path: Path, layout: dict, state: dict):
    """The tensors the header lists: float32/float64, moments for every param, and, when the
    state records a model config, exactly that model's names and shapes (so a config that
    claims more than the file holds is refused before anything is allocated)."""
    wrong_dtype = [k for k, (dtype, _) in layout.items() if dtype not in ("F32", "F64")]
    if wrong_dtype:
        raise CheckpointError(f"checkpoint {path} is corrupt: {wrong_dtype[0]!r} is "
                              f"{layout[wrong_dtype[0]][0]}, not float32 or float64")
    params = {k: shape for k, (_, shape) in layout.items() if not k.startswith("optimizer.")}
    for prefix in (_M, _V):
        moments = {k[len(prefix):]: shape for k, (_, shape) in layout.items()
                   if k.startswith(prefix)}
        if moments != params:
            raise CheckpointError(f"checkpoint {path} is corrupt: optimizer moments do not "
                                  "cover the params")
    if "model_config" not in state:
        return  # (a checkpoint of other arrays than a GPT's)
    try:
        config = GPTConfig.from_dict(state["model_config"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path}: its metadata's model_config is unusable "
                              f"({e})") from e
    expected = param_shapes(config)
    if params != expected:
        wrong = [k for k in expected if params.get(k) != expected[k]]
        extra = [k for k in params if k not in expected]
        raise CheckpointError(f"{path}: its params do not match its model_config ({config}): "
                              f"missing or misshapen {wrong[:4]}, unexpected {extra[:4]}")


def _read_tensors(path: Path) -> dict[str, np.ndarray]:
    try:  # memory-mapped: each tensor is copied out once, the file is never read whole
        with safe_open(str(path), framework="np") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # the file changed since its header was checked
        raise CheckpointError(f"checkpoint {path} is corrupt (unreadable safetensors: {e})") from e
