"""Every size a file states is checked (against sane bounds and the file's real size) before
anything of that size is allocated: GPTConfig's fields from config.json, checkpoint metadata
and llm.c headers; safetensors headers; token shard headers; JSON files and logs read whole.
Each hostile file is small (or sparse: no disk), and each read of one is watched by
tracemalloc (numpy's arrays included) or run under a capped address space."""
import json
import struct
import tracemalloc
from contextlib import contextmanager

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import gpt2np
from gpt2np.config import LIMITS, MAX_PARAMS, GPTConfig
from gpt2np.data.shards import ShardLoader, load_shard
from gpt2np.io.checkpoint import CKPT_NAME, CheckpointError, load_checkpoint
from gpt2np.io.llmc import HEADER_INTS, MODEL_MAGIC, LlmcFormatError, read_llmc
from gpt2np.train.outputs import read_jsonl
from hostile import TINY, edit_json, model_folder, run_checkpoint, run_limited, shard_folder, sparse

GB = 2 ** 30


@contextmanager
def allocates_at_most(mb: float):
    """Fail if the block allocates more than `mb` MiB at its peak (Python and numpy)."""
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < mb * 2 ** 20, f"peak {peak / 2 ** 20:.1f} MiB"


# ------------------------------------------------------------------------------ config fields

HOSTILE_CONFIGS = [
    ({"n_layer": 10 ** 9}, "n_layer must be positive and at most"),
    ({"n_embd": 2 ** 40, "n_head": 1}, "n_embd must be positive and at most"),
    ({"n_head": 10 ** 12}, "n_head must be positive and at most"),
    ({"vocab_size": 10 ** 10}, "vocab_size must be positive and at most"),
    ({"n_positions": 2 ** 40, "n_ctx": 2 ** 40}, "block_size must be positive and at most"),
    ({"n_layer": 1024, "n_embd": 65536, "n_head": 1}, "parameters, more than"),
    ({"n_layer": -3}, "n_layer must be positive and at most"),
    ({"n_layer": 0}, "n_layer must be positive and at most"),
    ({"n_layer": "12"}, "n_layer must be an int"),
    ({"n_layer": 12.0}, "n_layer must be an int"),
    ({"n_layer": True}, "n_layer must be an int"),
    ({"n_embd": 10, "n_head": 3}, "divisible"),
    # within every bound, but past what the weights file holds: refused from its header
    ({"n_layer": 1000}, "missing keys"),
    ({"n_embd": 4096}, "has shape"),
]


@pytest.mark.parametrize("changes, match", HOSTILE_CONFIGS, ids=lambda v: str(v)[:40])
def test_config_json_sizes_are_checked_before_allocating(tmp_path, changes, match):
    folder = model_folder(tmp_path / "m")
    edit_json(folder / "config.json", **changes)
    with allocates_at_most(16), pytest.raises(ValueError, match=match) as e:
        gpt2np.from_pretrained(folder)
    assert str(folder) in str(e.value)


def test_generate_with_a_billion_layers_fails_in_bounded_memory(tmp_path):
    """The reported case: a 500-byte config.json with n_layer 10**9 grew `generate` to 6 GB."""
    folder = model_folder(tmp_path / "m")
    edit_json(folder / "config.json", n_layer=10 ** 9)
    r = run_limited(f"""
        import sys
        from gpt2np.commands.generate import main
        sys.exit(main(["--model", {str(folder)!r}, "--max-new-tokens", "2"]))
        """, mb=400)
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 1 and "MemoryError" not in r.stderr, r.stderr
    assert last.startswith("error:") and "config.json" in last and "n_layer" in last


@given(st.fixed_dictionaries({k: st.integers(-5, 2 ** 70) for k in LIMITS}))
def test_a_gptconfig_is_within_its_bounds_or_refused(fields):
    try:
        config = GPTConfig(**fields)
    except ValueError:
        return
    assert all(1 <= getattr(config, k) <= v for k, v in LIMITS.items())
    assert config.num_params() <= MAX_PARAMS


def test_llmc_header_past_the_parameter_cap_is_refused(tmp_path):
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:8] = MODEL_MAGIC, 3, 1024, 50257, 1024, 1, 65536, 50304
    path = sparse(tmp_path / "m.bin", 4 * GB, header.tobytes())
    with allocates_at_most(4), pytest.raises(LlmcFormatError, match="parameters") as e:
        read_llmc(path)
    assert e.value.field == "num_params"


# ------------------------------------------------------------------------------ checkpoints


def _header_file(path, header: dict, body_size: int, length: int | None = None):
    text = json.dumps(header).encode()
    n = len(text) if length is None else length
    return sparse(path, 8 + len(text) + body_size, struct.pack("<Q", n) + text)


SPARSE_CHECKPOINTS = {
    "zeros": lambda p: sparse(p, 10 * GB),  # the reported case: a header length of 0
    "header length past the file": lambda p: sparse(p, 10 * GB, struct.pack("<Q", 2 ** 40)),
    "huge header length": lambda p: sparse(p, 10 * GB, struct.pack("<Q", 10 ** 9)),
    "tensor past the file": lambda p: _header_file(p, {
        "x": {"dtype": "F32", "shape": [10 ** 6, 10 ** 6], "data_offsets": [0, 4 * 10 ** 12]}},
        10 * GB),
    "shape not its bytes": lambda p: _header_file(p, {
        "x": {"dtype": "F32", "shape": [10 ** 9], "data_offsets": [0, 4]}}, 4),
    "negative shape": lambda p: _header_file(p, {
        "x": {"dtype": "F32", "shape": [-1, -4], "data_offsets": [0, 16]}}, 16),
    "unknown dtype": lambda p: _header_file(p, {
        "x": {"dtype": "F1024", "shape": [1], "data_offsets": [0, 128]}}, 128),
    "overlapping tensors": lambda p: _header_file(p, {
        "x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]},
        "y": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, 16),
    "bytes past the tensors": lambda p: _header_file(p, {
        "x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 10 * GB),
    "header is a list": lambda p: _header_file(p, [1, 2], 0),
    "header nests deeply": lambda p: sparse(p, 8 + 10 ** 6, struct.pack("<Q", 10 ** 6)
                                            + b"[" * 10 ** 6),
}


@pytest.mark.parametrize("make", SPARSE_CHECKPOINTS.values(), ids=SPARSE_CHECKPOINTS)
def test_damaged_checkpoints_are_refused_before_being_read(tmp_path, make):
    run = tmp_path / "run"
    run.mkdir()
    path = make(run / CKPT_NAME)
    with allocates_at_most(24), pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)
    with allocates_at_most(24), pytest.raises(CheckpointError):
        gpt2np.from_pretrained(run)  # a run's out-dir: the same reader


@pytest.mark.parametrize("make", SPARSE_CHECKPOINTS.values(), ids=SPARSE_CHECKPOINTS)
def test_damaged_weight_files_are_refused_before_being_read(tmp_path, make):
    folder = model_folder(tmp_path / "m")
    path = make(folder / "model.safetensors")
    with allocates_at_most(24), pytest.raises(OSError, match="cannot read .*model.safetensors"):
        gpt2np.from_pretrained(folder)
    assert path.stat().st_size > 0


@pytest.mark.parametrize("model_config, match", [
    ({**TINY.to_dict(), "n_layer": 1000}, "do not match its model_config"),
    ({**TINY.to_dict(), "n_layer": 10 ** 9}, "model_config is unusable.*n_layer"),
    ({**TINY.to_dict(), "vocab_size": 2 ** 40}, "model_config is unusable.*vocab_size"),
    ([1, 2], "model_config is unusable"),
])
def test_checkpoint_metadata_sizes_are_checked_before_reading(tmp_path, model_config, match):
    path = run_checkpoint(tmp_path / CKPT_NAME, state={"step": 1, "run": {},
                                                       "model_config": model_config})
    with allocates_at_most(8), pytest.raises(CheckpointError, match=match) as e:
        load_checkpoint(path)
    assert str(path) in str(e.value)


# ------------------------------------------------------------------------------ token shards


def _npy_claiming(path, n: int):
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<u2", "fortran_order": False,
                                               "shape": (n,)})
    return sparse(path, len(buf.getvalue()) + 1000, buf.getvalue())


def _bin_claiming(path, n: int):
    header = np.zeros(256, dtype="<i4")
    header[:3] = 20240520, 1, n
    return sparse(path, 1024 + 1000, header.tobytes())


@pytest.mark.parametrize("make", [lambda p: _npy_claiming(p, 10 ** 11),
                                  lambda p: _npy_claiming(p, 499),
                                  lambda p: _bin_claiming(p.with_suffix(".bin"), 2 ** 31 - 1),
                                  lambda p: _bin_claiming(p.with_suffix(".bin"), -7)],
                         ids=["npy 10^11", "npy a byte short", "bin 2^31", "bin negative"])
def test_shard_headers_are_checked_against_the_file(tmp_path, make):
    path = str(make(tmp_path / "toy_val_000000.npy"))
    for mmap in (True, False):
        with allocates_at_most(4), pytest.raises(ValueError, match="header counts") as e:
            load_shard(path, mmap=mmap)
        assert path in str(e.value)


def test_a_shard_folder_with_a_lying_shard_is_refused(tmp_path):
    folder = shard_folder(tmp_path / "data")
    _npy_claiming(folder / "toy_train_000001.npy", 10 ** 11)
    with allocates_at_most(4), pytest.raises(ValueError, match="toy_train_000001.npy"):
        ShardLoader(str(folder), 2, 8, split="train")


# ------------------------------------------------------------------------------ whole-file reads


@pytest.mark.parametrize("name", ["config.json", "model.safetensors.index.json", "meta.json"])
def test_json_files_are_refused_by_their_size(tmp_path, name):
    folder = model_folder(tmp_path / "m")
    if name == "model.safetensors.index.json":
        (folder / "model.safetensors").unlink()
    path = sparse(folder / name, 10 * GB, b"{")
    with allocates_at_most(4), pytest.raises((ValueError, OSError),
                                             match=f"{name} is 10,737,418,240 bytes"):
        if name == "meta.json":
            ShardLoader(str(folder), 2, 8)
        else:
            gpt2np.from_pretrained(folder)
    assert path.is_file()


def test_a_log_without_line_ends_is_read_in_bounded_memory(tmp_path):
    path = sparse(tmp_path / "log.jsonl", GB)  # one "line" of a GiB of zeros
    with allocates_at_most(16), pytest.warns(UserWarning, match="line 1"):
        assert read_jsonl(path) == []


def test_text_files_are_refused_from_their_head(tmp_path):
    from gpt2np.evals.loss import load_eval_tokens

    path = sparse(tmp_path / "corpus.txt", 10 * GB, b"ROMEO:\n")  # text, then holes
    with allocates_at_most(4), pytest.raises(ValueError, match=r"binary file \(a NUL byte at line 2"):
        load_eval_tokens(path)


def test_a_hellaswag_file_is_refused_by_its_size(tmp_path):
    from gpt2np.evals.hellaswag import load_items

    path = sparse(tmp_path / "hellaswag_val.jsonl", 10 * GB, b'{"ctx": "A"}\n')
    with allocates_at_most(4), pytest.raises(ValueError, match="is 10,737,418,240 bytes"):
        load_items(path)
