"""Generation: KV-cache logits against the full forward, greedy decoding against transformers'
generate, sampling (seed, temperature, top-k), cropping past block_size, argument checks."""
import tempfile

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import gpt2np
from gpt2np import GPT, GPTConfig
from gpt2np.generate import KVCache, forward_cached, generate, sample_next
from gradcheck import assert_close
from test_pretrained import hf_configs, make_hf

configs = st.builds(
    lambda n_layer, n_head, hs, vocab, block: GPTConfig(block_size=block, vocab_size=vocab, n_layer=n_layer,
                                                       n_head=n_head, n_embd=n_head * hs),
    n_layer=st.integers(1, 3), n_head=st.integers(1, 3), hs=st.integers(2, 6),
    vocab=st.integers(5, 60), block=st.integers(2, 16))


def random_model(cfg, dtype="float32", seed=0):
    """A GPT whose every parameter carries signal (init leaves biases at 0, LayerNorms at 1)."""
    model = GPT(cfg, dtype=dtype, seed=seed)
    rng = np.random.default_rng(seed)
    for p in model.params.values():
        p += rng.normal(0, 0.3, p.shape).astype(dtype)
    return model


# ------------------------------------------------------------------------------ KV cache


@given(configs, st.sampled_from(["float32", "float64"]), st.integers(1, 3), st.integers(0, 2**31 - 1),
       st.data())
def test_kv_cache_logits_equal_full_forward(cfg, dtype, B, seed, data):
    """Feeding a sequence in chunks through the cache gives the full forward's logits."""
    T = data.draw(st.integers(1, cfg.block_size), label="T")
    cuts = sorted(data.draw(st.sets(st.integers(1, T - 1), max_size=4), label="cuts")) if T > 1 else []
    model = random_model(cfg, dtype, seed)
    idx = np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T))
    full, _ = model.forward(idx)
    cache = KVCache(model, B, T)
    parts = [forward_cached(model, idx[:, a:b], cache, all_logits=True)
             for a, b in zip([0] + cuts, cuts + [T])]
    assert cache.length == T
    assert_close(np.concatenate(parts, axis=1), full, 1e-5 if dtype == "float32" else 1e-12, "cached logits")
    # without all_logits only the last position's logits come back
    cache.reset()
    last = forward_cached(model, idx, cache)
    assert last.shape == (B, 1, cfg.vocab_size)
    assert_close(last, full[:, -1:], 1e-5 if dtype == "float32" else 1e-12, "last logits")


def test_kv_cache_capacity_is_enforced():
    model = random_model(GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=4))
    cache = KVCache(model, 1, 4)
    forward_cached(model, np.zeros((1, 3), dtype=np.int64), cache)
    with pytest.raises(ValueError, match="capacity"):
        forward_cached(model, np.zeros((1, 2), dtype=np.int64), cache)
    with pytest.raises(ValueError, match="capacity"):
        KVCache(model, 1, 9)


# ------------------------------------------------------------------------------ greedy vs HF


@settings(max_examples=6)
@given(hf_configs, st.integers(1, 3), st.integers(0, 2**31 - 1), st.data())
def test_greedy_equals_hf_generate(c, B, seed, data):
    # float64 on both sides: near-ties between the two best logits cannot flip the argmax
    hf = make_hf(**c, seed=seed, dtype=torch.float64)
    T = data.draw(st.integers(1, c["n_positions"] - 1), label="T")
    new = data.draw(st.integers(1, c["n_positions"] - T), label="new")  # HF cannot pass n_positions
    idx = np.random.default_rng(seed).integers(0, c["vocab_size"], (B, T))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = gpt2np.from_pretrained(d, dtype="float64")
    ours = model.generate(idx, new, temperature=0)
    with torch.no_grad():
        ref = hf.generate(torch.from_numpy(idx), attention_mask=torch.ones(B, T, dtype=torch.long),
                          do_sample=False, max_new_tokens=new, min_new_tokens=new, pad_token_id=0).numpy()
    np.testing.assert_array_equal(ours, ref)


def test_greedy_equals_hf_generate_float32():
    hf = make_hf(n_layer=3, n_head=2, hs=8, vocab_size=50, n_positions=32, seed=3)
    idx = np.random.default_rng(3).integers(0, 50, (4, 5))
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = gpt2np.from_pretrained(d)
    with torch.no_grad():
        ref = hf.generate(torch.from_numpy(idx), attention_mask=torch.ones(4, 5, dtype=torch.long),
                          do_sample=False, max_new_tokens=27, min_new_tokens=27, pad_token_id=0).numpy()
    np.testing.assert_array_equal(model.generate(idx, 27, temperature=0), ref)


# ------------------------------------------------------------------------------ cropping, cache vs recompute


def _greedy_reference(model, idx, n):
    """nanoGPT's loop: crop to block_size, full forward, argmax of the last position."""
    bs = model.config.block_size
    for _ in range(n):
        logits, _ = model.forward(idx[:, -bs:])
        idx = np.concatenate([idx, logits[:, -1].argmax(-1)[:, None]], axis=1)
    return idx


@settings(max_examples=8)
@given(configs, st.integers(1, 2), st.integers(0, 2**31 - 1), st.data())
def test_past_block_size_the_context_is_cropped(cfg, B, seed, data):
    model = random_model(cfg, "float64", seed)
    T = data.draw(st.integers(1, 2 * cfg.block_size), label="T")  # the prompt may be too long already
    new = data.draw(st.integers(1, 2 * cfg.block_size + 2), label="new")
    idx = np.random.default_rng(seed).integers(0, cfg.vocab_size, (B, T))
    ours = generate(model, idx, new, temperature=0)
    assert ours.shape == (B, T + new)
    np.testing.assert_array_equal(ours, _greedy_reference(model, idx, new))


@settings(max_examples=8)
@given(configs, st.integers(0, 2**31 - 1), st.floats(0.3, 2.0), st.sampled_from([None, 1, 3]), st.data())
def test_sampling_with_cache_equals_recompute(cfg, seed, temperature, top_k, data):
    model = random_model(cfg, "float64", seed)
    T = data.draw(st.integers(1, cfg.block_size), label="T")
    new = data.draw(st.integers(1, 2 * cfg.block_size), label="new")
    idx = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, T))
    kw = dict(temperature=temperature, top_k=top_k, seed=seed)
    np.testing.assert_array_equal(generate(model, idx, new, **kw),
                                  generate(model, idx, new, use_cache=False, **kw))


# ------------------------------------------------------------------------------ sampling


def test_seed_reproducible_and_prompt_kept():
    model = random_model(GPTConfig(block_size=32, vocab_size=50, n_layer=2, n_head=2, n_embd=8))
    idx = np.array([[1, 2, 3], [4, 5, 6]])
    a = model.generate(idx, 20, seed=7, top_k=10)
    b = model.generate(idx, 20, seed=7, top_k=10)
    c = model.generate(idx, 20, seed=8, top_k=10)
    assert a.shape == (2, 23) and a.dtype == np.int64
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a[:, :3], idx)
    assert not np.array_equal(a, c)  # 40 draws from ~10 tokens: another seed differs
    assert ((a >= 0) & (a < 50)).all()


def test_top_k_only_picks_among_the_k_best():
    model = random_model(GPTConfig(block_size=40, vocab_size=30, n_layer=2, n_head=2, n_embd=8), "float64")
    idx = np.array([[3, 1], [7, 7]])
    k = 3
    out = model.generate(idx, 30, temperature=2.0, top_k=k, seed=0)  # hot: without top-k, anything goes
    logits, _ = model.forward(out[:, :-1])
    for t in range(idx.shape[1], out.shape[1]):
        step = logits[:, t - 1]
        rank = (step > step[np.arange(2), out[:, t]][:, None]).sum(axis=-1)
        assert (rank < k).all(), (t, rank)
    np.testing.assert_array_equal(model.generate(idx, 10, top_k=1, seed=1),
                                  model.generate(idx, 10, temperature=0))


@pytest.mark.parametrize("temperature,top_k", [(1.0, None), (0.5, None), (2.0, 3)])
def test_sample_next_follows_the_tempered_softmax(temperature, top_k):
    logits = np.array([2.0, 1.0, 0.5, 0.0, -1.0])
    rng = np.random.default_rng(0)
    n = 40000
    draws = sample_next(np.tile(logits, (n, 1)), temperature, top_k, rng)
    z = logits / temperature
    if top_k is not None:
        z = np.where(z < np.sort(z)[-top_k], -np.inf, z)
    p = np.exp(z - z.max())
    p /= p.sum()
    freq = np.bincount(draws, minlength=5) / n
    # 5 binomial standard deviations at most (sd <= 0.0025 at n = 40000)
    assert (np.abs(freq - p) <= 5 * np.sqrt(p * (1 - p) / n) + 1e-12).all(), (freq, p)


def test_argument_checks():
    model = random_model(GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=4))
    idx = np.array([[1, 2]])
    np.testing.assert_array_equal(model.generate(idx, 0), idx)
    for bad, match in [(dict(max_new_tokens=-1), "max_new_tokens"), (dict(max_new_tokens=2.5), "max_new_tokens"),
                       (dict(temperature=-1.0), "temperature"), (dict(temperature=float("nan")), "temperature"),
                       (dict(top_k=0), "top_k")]:
        kw = {"max_new_tokens": 3, **bad}
        with pytest.raises(ValueError, match=match):
            model.generate(idx, kw.pop("max_new_tokens"), **kw)
    with pytest.raises(ValueError, match="outside"):
        model.generate(np.array([[10]]), 1)
    with pytest.raises(ValueError, match="shape"):
        model.generate(np.array([1, 2]), 1)
    with pytest.raises(TypeError, match="integer"):
        model.generate(np.array([[1.0]]), 1)


# ------------------------------------------------------------------------------ padded vocabulary


def test_padded_vocabulary_is_never_sampled():
    """With vocab 50304 the rows past GPT-2's 50257 tokens are no tokens: made the most likely
    logits on purpose here, they are still never sampled, by any sampler, cache or not."""
    from gpt2np.config import GPT2_VOCAB_SIZE

    cfg = GPTConfig(block_size=8, vocab_size=50304, n_layer=1, n_head=1, n_embd=4)
    model = GPT(cfg, seed=0)
    # ln_f makes every position's final vector (1,1,1,1); the padded rows of wte score 40
    # against it, the real rows at most ~0.3: the padded ids carry nearly all the mass
    model.params["transformer.ln_f.weight"][:] = 0
    model.params["transformer.ln_f.bias"][:] = 1
    model.params["transformer.wte.weight"][GPT2_VOCAB_SIZE:] = 10
    idx = np.array([[1, 2, 3], [50, 60, 70]])
    logits, _ = model.forward(idx)
    assert (logits.argmax(-1) >= GPT2_VOCAB_SIZE).all()  # what an unguarded sampler would pick
    for use_cache in (True, False):
        for kw in (dict(temperature=0), dict(temperature=1.0, top_k=5), dict(temperature=1.0),
                   dict(temperature=3.0, top_k=None)):
            out = model.generate(idx, 12, seed=1, use_cache=use_cache, **kw)
            assert out.shape == (2, 15) and out.max() < GPT2_VOCAB_SIZE, (use_cache, kw)


# ------------------------------------------------------------------------------ the command

from tiny_run import tiny_run  # noqa: E402,F401 (a fixture)


def test_generate_command_samples_a_training_run(tiny_run):
    """`gpt2np generate --model OUT_DIR` (the README's command) on a fresh run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "gpt2np", "generate", "--model", str(tiny_run), "--prompt", "ROMEO:",
           "--num-samples", "2", "--max-new-tokens", "6", "--seed", "7"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=root, timeout=300)
    assert p.returncode == 0, p.stderr
    samples = p.stdout.split("--- sample ")[1:]
    assert len(samples) == 2 and all(s.split("\n", 1)[1].startswith("ROMEO:") for s in samples)
    # the same tokens as model.generate with that seed (the prompt, then 6 new ones)
    from gpt2np.data.tokenizer import get_encoding

    enc = get_encoding()
    model = gpt2np.from_pretrained(tiny_run)
    ids = model.generate(np.array([enc.encode("ROMEO:")] * 2), 6, top_k=50, seed=7)
    assert [s.split("\n", 1)[1].rstrip("\n") for s in samples] == [enc.decode(r.tolist()) for r in ids]
