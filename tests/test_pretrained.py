"""Hugging Face weights in and out, checked against transformers' own GPT2LMHeadModel.

Real GPT-2 weights cannot be downloaded here, so tiny random GPT2LMHeadModels stand in:
saved by transformers (prefixed keys, no buffers), rewritten in the hub's openai-community
layout (no prefix, attn.bias buffers), and laid out as a huggingface_hub cache.
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file
from transformers import GPT2Config, GPT2LMHeadModel

import gpt2np
from gpt2np import GPT, GPTConfig
from gpt2np.io.hf_folder import load_config
from gradcheck import assert_close, rel_error

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
ROOT = Path(__file__).resolve().parents[1]

# n_embd >= 4: a LayerNorm over 2 or 3 channels is so ill-conditioned that two float32
# implementations of the same model differ by ~5e-6 relative; from 4 on, by ~1e-6.
hf_configs = st.fixed_dictionaries({
    "n_layer": st.integers(1, 3), "n_head": st.integers(1, 3), "hs": st.integers(4, 8),
    "vocab_size": st.integers(5, 60), "n_positions": st.integers(4, 16)})


def make_hf(n_layer=2, n_head=2, hs=4, vocab_size=40, n_positions=16, seed=0, dtype=torch.float32):
    """A random GPT2LMHeadModel in eval mode, every parameter (biases, LayerNorms too) nonzero,
    so that a misplaced or dropped tensor changes the logits."""
    cfg = GPT2Config(n_layer=n_layer, n_head=n_head, n_embd=n_head * hs, vocab_size=vocab_size,
                     n_positions=n_positions, bos_token_id=None, eos_token_id=None)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(cfg).to(dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def hf_logits(model, idx):
    with torch.no_grad():
        return model(torch.from_numpy(idx)).logits.numpy()


def hub_layout(model, folder):
    """Write `model` as the hub's openai-community/gpt2 files are: keys without
    "transformer.", attn.bias / attn.masked_bias buffers, an old-style config.json."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    n = cfg.n_positions
    tensors = {}
    for k, v in model.state_dict().items():
        if k == "lm_head.weight":
            continue
        tensors[k.removeprefix("transformer.")] = v.detach().numpy().copy()
    for i in range(cfg.n_layer):
        tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((n, n), dtype=np.float32))[None, None]
        tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, dtype=np.float32)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({
        "activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.1, "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256,
        "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
        "n_ctx": n, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "n_layer": cfg.n_layer,
        "n_positions": n, "resid_pdrop": 0.1, "vocab_size": cfg.vocab_size,
        "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}}))
    return folder


def _check_logits(hf, folder, dtype, rtol, seed=0):
    model = gpt2np.from_pretrained(folder, dtype=dtype)
    cfg = hf.config
    assert model.config == GPTConfig(block_size=cfg.n_positions, vocab_size=cfg.vocab_size,
                                     n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, cfg.vocab_size, (2, cfg.n_positions))
    logits, _ = model.forward(idx)
    assert logits.dtype == np.dtype(dtype)
    return assert_close(logits, hf_logits(hf, idx), rtol, f"logits {dtype}")


# ------------------------------------------------------------------------------ logits vs HF


@settings(max_examples=6)
@given(hf_configs, st.integers(0, 2**31 - 1))
def test_logits_match_hf_float32(c, seed):
    hf = make_hf(**c, seed=seed)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)  # transformers' layout: prefixed keys, no buffers
        _check_logits(hf, d, "float32", 1e-5, seed)


@settings(max_examples=6)
@given(hf_configs, st.integers(0, 2**31 - 1))
def test_logits_match_hf_float64(c, seed):
    hf = make_hf(**c, seed=seed, dtype=torch.float64)
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        _check_logits(hf, d, "float64", 1e-12, seed)


@settings(max_examples=4)
@given(hf_configs, st.integers(0, 2**31 - 1))
def test_hub_key_layout_with_buffers(c, seed):
    hf = make_hf(**c, seed=seed)
    with tempfile.TemporaryDirectory() as d:
        hub_layout(hf, d)
        _check_logits(hf, d, "float32", 1e-5, seed)
        # the params are a plain copy of the file, whichever layout it uses
        ours = gpt2np.from_pretrained(d).state_dict()
        for k, v in hf.state_dict().items():
            if k != "lm_head.weight":
                np.testing.assert_array_equal(ours[k], v.numpy(), err_msg=k)


def test_stored_lm_head_tied_is_accepted_untied_is_refused(tmp_path):
    hf = make_hf()
    sd = {k: v.numpy().copy() for k, v in hf.state_dict().items()}
    assert "lm_head.weight" in sd
    hub_layout(hf, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    save_file(sd, str(tmp_path / "model.safetensors"))  # prefixed, with lm_head.weight
    _check_logits(hf, tmp_path, "float32", 1e-5)
    sd["lm_head.weight"] = sd["lm_head.weight"] + 1.0
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match="lm_head.weight"):
        gpt2np.from_pretrained(tmp_path)


def test_sharded_checkpoint(tmp_path):
    hf = make_hf(n_layer=3, hs=8)
    hf.save_pretrained(tmp_path, max_shard_size="10KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    _check_logits(hf, tmp_path, "float32", 1e-5)


def test_half_precision_files_are_widened(tmp_path):
    from safetensors.torch import save_file as save_torch

    hf = make_hf()
    for tdtype in (torch.float16, torch.bfloat16):
        hub_layout(hf, tmp_path)
        sd = {k: v.to(tdtype).contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
        save_torch(sd, str(tmp_path / "model.safetensors"))
        model = gpt2np.from_pretrained(tmp_path, dtype="float32")
        for k, v in sd.items():
            np.testing.assert_array_equal(model.params[k], v.float().numpy(), err_msg=f"{tdtype} {k}")


# ------------------------------------------------------------------------------ the hub cache, offline


def _hf_cache(hub_cache: Path, repo_id: str, src: Path, revision="0123456789abcdef0123456789abcdef01234567"):
    """Lay `src`'s files out as huggingface_hub's cache does: content in blobs/, the snapshot
    holding relative symlinks to them, refs/main naming the snapshot's commit."""
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "blobs").mkdir()
    snap = repo / "snapshots" / revision
    snap.mkdir(parents=True)
    for f in src.iterdir():
        blob = repo / "blobs" / f"{abs(hash(f.read_bytes())):x}{f.name}"
        blob.write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(blob, snap))


def test_hub_names_load_from_the_cache_offline(tmp_path):
    hf = make_hf(n_layer=2, hs=5, vocab_size=33)
    src = hub_layout(hf, tmp_path / "src")
    hf_home = tmp_path / "hf_home"
    _hf_cache(hf_home / "hub", "openai-community/gpt2", src)
    # a fresh interpreter: huggingface_hub reads HF_HOME and HF_HUB_OFFLINE when imported
    script = f"""
import numpy as np, gpt2np
idx = np.load({str(tmp_path / 'idx.npy')!r})
for name in ("gpt2", "openai-community/gpt2"):
    logits, _ = gpt2np.from_pretrained(name).forward(idx)
    np.save({str(tmp_path)!r} + "/" + name.replace("/", "_") + ".npy", logits)
try:
    gpt2np.from_pretrained("gpt2-medium")  # not in the cache
except OSError as e:
    print("ERROR", e)
"""
    idx = np.random.default_rng(0).integers(0, 33, (2, 16))
    np.save(tmp_path / "idx.npy", idx)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    env.pop("HF_HUB_CACHE", None)
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    expected = hf_logits(hf, idx)
    for name in ("gpt2", "openai-community_gpt2"):
        assert_close(np.load(tmp_path / f"{name}.npy"), expected, 1e-5, name)
    assert "ERROR" in r.stdout and "openai-community/gpt2-medium" in r.stdout and "offline" in r.stdout


def test_cache_dir_and_local_files_only(tmp_path):
    hf = make_hf()
    src = hub_layout(hf, tmp_path / "src")
    _hf_cache(tmp_path / "cache", "someone/tiny-gpt2", src)
    model = gpt2np.from_pretrained("someone/tiny-gpt2", cache_dir=tmp_path / "cache",
                                   local_files_only=True)
    idx = np.arange(10)[None] % 40
    assert_close(model.forward(idx)[0], hf_logits(hf, idx), 1e-5, "logits")
    with pytest.raises(OSError, match="someone/other"):
        gpt2np.from_pretrained("someone/other", cache_dir=tmp_path / "cache", local_files_only=True)


# ------------------------------------------------------------------------------ export


@settings(max_examples=5)
@given(hf_configs, st.sampled_from(["float32", "float64"]), st.integers(0, 2**31 - 1))
def test_save_pretrained_round_trip(c, dtype, seed):
    cfg = GPTConfig(block_size=c["n_positions"], vocab_size=c["vocab_size"], n_layer=c["n_layer"],
                    n_head=c["n_head"], n_embd=c["n_head"] * c["hs"])
    model = GPT(cfg, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    for p in model.params.values():
        p += rng.normal(0, 0.3, p.shape).astype(dtype)
    with tempfile.TemporaryDirectory() as d:
        gpt2np.save_pretrained(model, d)
        hf, info = GPT2LMHeadModel.from_pretrained(d, output_loading_info=True,
                                                   dtype=getattr(torch, dtype))
        assert not info["missing_keys"] and not info["unexpected_keys"], info
        hf.eval()
        idx = rng.integers(0, cfg.vocab_size, (2, cfg.block_size))
        assert_close(model.forward(idx)[0], hf_logits(hf, idx), 1e-5 if dtype == "float32" else 1e-12,
                     "exported logits")
        back = gpt2np.from_pretrained(d, dtype=dtype).state_dict()
        for k, v in model.state_dict().items():
            np.testing.assert_array_equal(back[k], v, err_msg=k)


# ------------------------------------------------------------------------------ errors


@pytest.fixture
def saved(tmp_path):
    hf = make_hf()
    hf.save_pretrained(tmp_path)
    return tmp_path


def _rewrite(folder, edit):
    from safetensors.numpy import load_file

    sd = load_file(str(folder / "model.safetensors"))
    edit(sd)
    save_file(sd, str(folder / "model.safetensors"))


def _edit_config(folder, **changes):
    d = json.loads((folder / "config.json").read_text())
    d.update(changes)
    (folder / "config.json").write_text(json.dumps(d))


def test_missing_folder_or_files(tmp_path, saved):
    with pytest.raises(OSError, match="no such folder"):
        gpt2np.from_pretrained(tmp_path / "nope" / "deeper")
    with pytest.raises(OSError, match="no such folder"):
        gpt2np.from_pretrained("./not-here")
    with pytest.raises(OSError, match="is a file"):
        gpt2np.from_pretrained(saved / "config.json")
    (saved / "config.json").rename(saved / "c.json")
    with pytest.raises(OSError, match="config.json"):
        gpt2np.from_pretrained(saved)
    (saved / "c.json").rename(saved / "config.json")
    (saved / "model.safetensors").unlink()
    with pytest.raises(OSError, match="model.safetensors"):
        gpt2np.from_pretrained(saved)


def test_truncated_file(saved):
    f = saved / "model.safetensors"
    data = f.read_bytes()
    for cut in (5, len(data) // 2, len(data) - 1):
        f.write_bytes(data[:cut])
        with pytest.raises(OSError, match="model.safetensors"):
            gpt2np.from_pretrained(saved)


def test_key_and_shape_mismatches(saved):
    key = "transformer.h.1.mlp.c_fc.weight"
    _rewrite(saved, lambda sd: sd.pop(key))
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        gpt2np.from_pretrained(saved)
    saved_hf = make_hf()
    saved_hf.save_pretrained(saved)
    _rewrite(saved, lambda sd: sd.update({key: sd[key][:, :-1].copy()}))
    with pytest.raises(ValueError, match=r"c_fc\.weight.*shape"):
        gpt2np.from_pretrained(saved)
    saved_hf.save_pretrained(saved)
    _rewrite(saved, lambda sd: sd.update({"transformer.h.2.ln_1.weight": sd["transformer.h.1.ln_1.weight"]}))
    with pytest.raises(ValueError, match=r"unexpected key 'transformer\.h\.2\.ln_1\.weight'"):
        gpt2np.from_pretrained(saved)
    saved_hf.save_pretrained(saved)
    _edit_config(saved, n_embd=12, n_head=3)  # config and weights disagree
    with pytest.raises(ValueError, match="shape"):
        gpt2np.from_pretrained(saved)


@pytest.mark.parametrize("field,value", [
    ("activation_function", "relu"), ("scale_attn_weights", False),
    ("scale_attn_by_inverse_layer_idx", True), ("layer_norm_epsilon", 1e-6),
    ("n_inner", 12), ("tie_word_embeddings", False), ("model_type", "llama"), ("n_positions", None)])
def test_unsupported_config_is_refused(saved, field, value):
    _edit_config(saved, **{field: value})
    with pytest.raises(ValueError, match=field if value is not None else "n_positions or n_ctx"):
        gpt2np.from_pretrained(saved)


def test_config_in_gptconfig_names(tmp_path):
    cfg = GPTConfig(block_size=8, vocab_size=11, n_layer=1, n_head=2, n_embd=6)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert load_config(tmp_path / "config.json") == cfg
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        load_config(tmp_path / "config.json")


def test_pickle_only_with_opt_in(saved):
    hf = make_hf()
    (saved / "model.safetensors").unlink()
    torch.save(hf.state_dict(), saved / "pytorch_model.bin")
    with pytest.raises(OSError, match="allow_pickle"):
        gpt2np.from_pretrained(saved)
    model = gpt2np.from_pretrained(saved, allow_pickle=True)
    idx = np.arange(16)[None] % 40
    assert rel_error(model.forward(idx)[0], hf_logits(hf, idx)) <= 1e-5


# ------------------------------------------------------------------------------ training runs

from tiny_run import tiny_run  # noqa: E402,F401 (a fixture)


def _rebuilt(ckpt_path, dtype):
    """The model rebuilt by hand from a checkpoint's tensors and the config in its metadata."""
    from gpt2np.io.checkpoint import load_checkpoint

    ckpt = load_checkpoint(ckpt_path)
    return GPT(GPTConfig.from_dict(ckpt.state["model_config"]), dtype=dtype, params=ckpt.params)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_training_run_is_a_model(tiny_run, dtype):
    """A run's out-dir and its checkpoint file load as the model its tensors make, in either
    dtype (a float32 run as float64 too), with exactly that model's logits."""
    ref = _rebuilt(tiny_run / "ckpt.safetensors", dtype)
    idx = np.random.default_rng(0).integers(0, ref.config.vocab_size, (2, ref.config.block_size))
    want, _ = ref.forward(idx)
    for src in (tiny_run, tiny_run / "ckpt.safetensors", str(tiny_run)):
        model = gpt2np.from_pretrained(src, dtype=dtype)
        assert model.config == ref.config and model.dtype == dtype
        got, _ = model.forward(idx)
        np.testing.assert_array_equal(got, want)


def test_training_checkpoint_of_another_dtype_is_cast(tmp_path):
    from gpt2np.io.checkpoint import Checkpoint, save_checkpoint

    cfg = GPTConfig(block_size=8, vocab_size=30, n_layer=1, n_head=2, n_embd=8)
    params = GPT(cfg, dtype="float64", seed=3).state_dict()
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    save_checkpoint(tmp_path / "ckpt.safetensors", Checkpoint(
        params=params, m=zeros, v=zeros, t=0, state={"step": 0, "model_config": cfg.to_dict()}))
    model = gpt2np.from_pretrained(tmp_path, dtype="float32")
    for k, v in params.items():
        np.testing.assert_array_equal(model.params[k], v.astype(np.float32))


def test_training_run_errors(tmp_path):
    from gpt2np.io.checkpoint import Checkpoint, CheckpointError, save_checkpoint

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(OSError, match=r"is no model.*ckpt\.safetensors.*config\.json"):
        gpt2np.from_pretrained(empty)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(OSError, match="not a gpt2np training checkpoint"):
        gpt2np.from_pretrained(tmp_path / "notes.txt")
    # a checkpoint without the model config (not written by train)
    cfg = GPTConfig(block_size=8, vocab_size=30, n_layer=1, n_head=2, n_embd=8)
    params = GPT(cfg).state_dict()
    zeros = {k: np.zeros_like(v) for k, v in params.items()}
    run = tmp_path / "run"
    save_checkpoint(run / "ckpt.safetensors", Checkpoint(params=params, m=zeros, v=zeros, t=0,
                                                         state={"step": 0}))
    with pytest.raises(CheckpointError, match="model_config"):
        gpt2np.from_pretrained(run)
    # a model_config that does not fit the tensors
    bad = cfg.replace(n_embd=16).to_dict()
    save_checkpoint(run / "ckpt.safetensors", Checkpoint(params=params, m=zeros, v=zeros, t=0,
                                                         state={"model_config": bad}))
    with pytest.raises(CheckpointError, match="do not match its model_config"):
        gpt2np.from_pretrained(run / "ckpt.safetensors")
    # a damaged checkpoint is reported as such, whichever way it is named
    data = (run / "ckpt.safetensors").read_bytes()
    (run / "ckpt.safetensors").write_bytes(data[: len(data) // 2])
    for src in (run, run / "ckpt.safetensors"):
        with pytest.raises(CheckpointError, match="corrupt"):
            gpt2np.from_pretrained(src)


def test_a_folder_with_a_checkpoint_and_hf_files_loads_the_checkpoint(tiny_run, tmp_path):
    import shutil

    folder = tmp_path / "both"
    make_hf(n_layer=1, n_head=2, hs=4, vocab_size=40).save_pretrained(folder)
    shutil.copyfile(tiny_run / "ckpt.safetensors", folder / "ckpt.safetensors")
    assert gpt2np.from_pretrained(folder).config == gpt2np.from_pretrained(tiny_run).config
    (folder / "ckpt.safetensors").unlink()
    assert gpt2np.from_pretrained(folder).config.vocab_size == 40
