"""The CuPy backend: the same layer code on the GPU (marked `gpu`: skipped without CuPy and
a CUDA device, as in CI), and the clear error when CuPy or a GPU is missing (runs everywhere)."""
import subprocess
import sys

import numpy as np
import pytest

from gpt2np import GPT, AdamW, GPTConfig
from gpt2np import layers as L
from gradcheck import assert_close, assert_grads_close


def test_missing_cupy_gives_an_install_hint():
    code = ("import sys; sys.modules['cupy'] = None\n"
            "from gpt2np import GPT, GPTConfig\n"
            "try:\n"
            "    GPT(GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=4), backend='cupy')\n"
            "except RuntimeError as e:\n"
            "    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "ERR" in out.stdout and "cupy-cuda12x" in out.stdout and "cupy-cuda13x" in out.stdout


# ------------------------------------------------------------------ on a GPU only

def _cp():
    import cupy

    return cupy


def _layer_cases(rng):
    B, T, C, NH, V = 2, 16, 32, 4, 50
    x = rng.standard_normal((B, T, C))
    return {
        "layernorm": (L.layernorm_forward, L.layernorm_backward,
                      [x, 1 + 0.1 * rng.standard_normal(C), 0.1 * rng.standard_normal(C)]),
        "linear": (L.linear_forward, L.linear_backward,
                   [x, 0.2 * rng.standard_normal((C, 3 * C)), 0.1 * rng.standard_normal(3 * C)]),
        "gelu": (L.gelu_forward, lambda d, c: (L.gelu_backward(d, c),), [3 * x]),
        "attention": (lambda qkv: L.attention_forward(qkv, NH), lambda d, c: (L.attention_backward(d, c),),
                      [rng.standard_normal((B, T, 3 * C))]),
        "lm_head": (L.lm_head_forward, L.lm_head_backward, [x, 0.2 * rng.standard_normal((V, C))]),
    }


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["layernorm", "linear", "gelu", "attention", "lm_head"])
def test_layer_cupy_fp32_matches_numpy_fp64(name):
    cp = _cp()
    rng = np.random.default_rng(0)
    fwd, bwd, inputs = _layer_cases(rng)[name]
    out64, cache64 = fwd(*inputs)
    dout = rng.standard_normal(out64.shape)
    grads64 = bwd(dout, cache64)
    out32, cache32 = fwd(*[cp.asarray(a, dtype=cp.float32) for a in inputs])
    grads32 = bwd(cp.asarray(dout, dtype=cp.float32), cache32)
    assert isinstance(out32, cp.ndarray) and out32.dtype == cp.float32
    assert_close(cp.asnumpy(out32), out64, 1e-5, f"{name} forward")
    for i, (g32, g64) in enumerate(zip(grads32, grads64)):
        assert_close(cp.asnumpy(g32), g64, 1e-4, f"{name} grad {i}")


@pytest.mark.gpu
def test_cross_entropy_and_embedding_on_cupy():
    cp = _cp()
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 8, 50)) * 3
    targets = rng.integers(0, 50, (2, 8))
    targets[0, 0] = -1
    loss64, c64 = L.cross_entropy_forward(logits, targets)
    loss32, c32 = L.cross_entropy_forward(cp.asarray(logits, dtype=cp.float32), cp.asarray(targets))
    assert_close(float(loss32), float(loss64), 1e-5, "loss")
    assert_close(cp.asnumpy(L.cross_entropy_backward(1.0, c32)), L.cross_entropy_backward(1.0, c64), 1e-4, "dlogits")
    idx = rng.integers(0, 50, (2, 8))
    wte, wpe = rng.standard_normal((50, 16)), rng.standard_normal((8, 16))
    x64, e64 = L.embedding_forward(idx, wte, wpe)
    x32, e32 = L.embedding_forward(cp.asarray(idx), cp.asarray(wte, dtype=cp.float32), cp.asarray(wpe, dtype=cp.float32))
    dx = rng.standard_normal(x64.shape)
    for a, b in zip(L.embedding_backward(cp.asarray(dx, dtype=cp.float32), e32), L.embedding_backward(dx, e64)):
        assert_close(cp.asnumpy(a), b, 1e-5, "embedding")


@pytest.mark.gpu
def test_model_cupy_fp32_matches_numpy_fp64():
    cp = _cp()
    cfg = GPTConfig(block_size=64, vocab_size=500, n_layer=2, n_head=4, n_embd=64)
    ref = GPT(cfg, dtype="float64", seed=3)
    gpu = GPT(cfg, backend="cupy", dtype="float32", params=ref.state_dict())
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 500, (4, 64)), rng.integers(0, 500, (4, 64))
    logits64, loss64 = ref.forward(idx, targets)
    g64 = ref.backward()
    logits32, loss32 = gpu.forward(idx, targets)  # idx may come from the host
    g32 = gpu.backward()
    assert isinstance(logits32, cp.ndarray)
    assert_close(float(loss32), float(loss64), 1e-5, "loss")
    assert_close(cp.asnumpy(logits32), logits64, 1e-4, "logits")
    assert_grads_close({k: cp.asnumpy(v) for k, v in g32.items()}, g64, 1e-4, "cupy model")


@pytest.mark.gpu
def test_short_training_on_cupy_tracks_numpy():
    cfg = GPTConfig(block_size=32, vocab_size=100, n_layer=2, n_head=2, n_embd=32)
    rng = np.random.default_rng(0)
    # a learnable stream: each token determines the next, (t * 7 + 3) % 100
    starts = rng.integers(0, 100, (20, 4, 1))
    data = np.empty((20, 4, 33), dtype=np.int64)
    data[..., :1] = starts
    for t in range(1, 33):
        data[..., t] = (data[..., t - 1] * 7 + 3) % 100
    losses = {}
    for backend in ("numpy", "cupy"):
        model = GPT(cfg, backend=backend, seed=0)
        opt = AdamW(model.params, lr=3e-3)
        losses[backend] = []
        for batch in data:
            _, loss = model.forward(batch[:, :-1], batch[:, 1:])
            opt.step(model.backward())
            losses[backend].append(float(loss))
    assert losses["cupy"][-1] < losses["cupy"][0] - 0.5  # it learns
    np.testing.assert_allclose(losses["cupy"], losses["numpy"], rtol=2e-3)
