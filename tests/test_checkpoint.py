"""Checkpoint files: round trip, and the SHA-256 that covers tensors and metadata alike."""
import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save as st_save

from gpt2np.io import checkpoint as C
from gpt2np.io import safetensors_layout
from gpt2np.io.checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint


def _ckpt(step=3):
    rng = np.random.default_rng(0)
    params = {"transformer.wte.weight": rng.standard_normal((5, 4)).astype(np.float32),
              "transformer.ln_f.bias": rng.standard_normal(4).astype(np.float32)}
    moments = lambda s: {k: v * s for k, v in params.items()}  # noqa: E731
    return Checkpoint(params=params, m=moments(0.1), v=moments(0.01), t=step,
                      state={"step": step, "lr": 1e-3, "data": {"position": 40}})


def _edit_header(path, edit):
    """Rewrite the safetensors JSON header through edit(header) -> None; tensor bytes kept."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    new += b" " * (-len(new) % 8)
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


def _same(a, b):
    assert a.t == b.t and a.state == b.state
    for d1, d2 in ((a.params, b.params), (a.m, b.m), (a.v, b.v)):
        assert d1.keys() == d2.keys() and all(np.array_equal(d1[k], d2[k]) for k in d1)


def test_round_trip(tmp_path):
    save_checkpoint(tmp_path / "c.safetensors", _ckpt())
    _same(load_checkpoint(tmp_path / "c.safetensors"), _ckpt())


def test_edited_step_in_header_is_an_error(tmp_path):
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, _ckpt(step=3))

    def bump_step(header):
        state = json.loads(header["__metadata__"]["state"])
        state["step"] = 4
        header["__metadata__"]["state"] = json.dumps(state)

    _edit_header(path, bump_step)
    with pytest.raises(CheckpointError, match="edited.*SHA-256"):
        load_checkpoint(path)


@pytest.mark.parametrize("key, value", [("t", "4"), ("sha256_scope", None), ("extra", "x")])
def test_any_metadata_edit_is_an_error(tmp_path, key, value):
    """Also dropping the scope key (which would make it look like an old checkpoint)."""
    path = tmp_path / "c.safetensors"
    save_checkpoint(path, _ckpt())

    def edit(header):
        if value is None:
            del header["__metadata__"][key]
        else:
            header["__metadata__"][key] = value

    _edit_header(path, edit)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(path)


def _save_old_format(path, ckpt):
    """A checkpoint as gpt2np wrote them before the metadata was covered: the SHA-256 of the
    tensors alone, no sha256_scope."""
    tensors = dict(ckpt.params)
    tensors.update({"optimizer.m." + k: v for k, v in ckpt.m.items()})
    tensors.update({"optimizer.v." + k: v for k, v in ckpt.v.items()})
    meta = {"format": C.FORMAT, "t": str(ckpt.t), "state": json.dumps(ckpt.state),
            "sha256": C._digest(tensors)}
    path.write_bytes(st_save(tensors, metadata=meta))


def test_old_checkpoints_still_load_and_their_tensors_are_checked(tmp_path):
    path = tmp_path / "old.safetensors"
    _save_old_format(path, _ckpt())
    _same(load_checkpoint(path), _ckpt())
    raw = bytearray(path.read_bytes())
    raw[-3] ^= 0x40  # inside the last tensor's bytes
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="SHA-256"):
        load_checkpoint(path)


def test_training_resumes_an_old_checkpoint(tmp_path):
    """A run whose checkpoint was written before the metadata was covered resumes."""
    from gpt2np.train.loop import train
    from tiny_run import tiny_config

    run = dict(out=tmp_path / "run", cache=tmp_path / "cache", warmup_steps=1, eval_interval=3)
    train(tiny_config(**run, max_steps=3))
    path = tmp_path / "run" / "ckpt.safetensors"
    _save_old_format(path, load_checkpoint(path))
    assert "sha256_scope" not in safetensors_layout.metadata(safetensors_layout.read_header(path)[0])
    res = train(tiny_config(**run, max_steps=5, resume=True))
    assert res.status == "done" and res.step == 5
    assert load_checkpoint(path).state["step"] == 5
