"""The CuPy backend: the same layer code on the GPU (marked `gpu`: skipped without CuPy and
a CUDA device, as in CI), and the clear error when CuPy or a GPU is missing (runs everywhere)."""
import subprocess
import sys

import numpy as np
import pytest

from gpt2np import GPT, AdamW, GPTConfig
from gpt2np import layers as L
from gradcheck import assert_close, assert_grads_close
from rounding import (OPERAND_EPS, assert_matmul_close, assert_within_rounding,
                      layer_sensitivity, model_sensitivity, sensitivity)


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


def _gpu():
    """The cupy backend and its layer ops for float32 (fused kernels, unless turned off)."""
    from gpt2np.backends import get_backend

    be = get_backend("cupy")
    return be, be.layer_ops("float32")


def _layer_case(name, ops, rng):
    """(forward, backward, inputs) of one layer of `ops`; the same inputs for the same rng."""
    B, T, C, NH, V = 2, 16, 32, 4, 50
    x = rng.standard_normal((B, T, C))
    return {
        "layernorm": lambda: (ops.layernorm_forward, ops.layernorm_backward,
                              [x, 1 + 0.1 * rng.standard_normal(C), 0.1 * rng.standard_normal(C)]),
        "linear": lambda: (ops.linear_forward, ops.linear_backward,
                           [x, 0.2 * rng.standard_normal((C, 3 * C)), 0.1 * rng.standard_normal(3 * C)]),
        "gelu": lambda: (ops.gelu_forward, lambda d, c: (ops.gelu_backward(d, c),),
                         [3 * x, rng.standard_normal(C)]),
        "attention": lambda: (lambda qkv: ops.attention_forward(qkv, NH),
                              lambda d, c: (ops.attention_backward(d, c),),
                              [rng.standard_normal((B, T, 3 * C))]),
        "lm_head": lambda: (ops.lm_head_forward, ops.lm_head_backward,
                            [x, 0.2 * rng.standard_normal((V, C))]),
    }[name]()


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["layernorm", "linear", "gelu", "attention", "lm_head"])
def test_layer_cupy_fp32_matches_numpy_fp64(name):
    cp = _cp()
    be, ops = _gpu()
    fwd64, _, inputs = _layer_case(name, L.REFERENCE_OPS, np.random.default_rng(0))
    dout = np.random.default_rng(1).standard_normal(fwd64(*inputs)[0].shape)

    def layer(r):  # float64, or moved as float32 would round it (tests/rounding.py)
        fwd64, bwd64, _ = _layer_case(name, L.REFERENCE_OPS if r is None else r.ops(),
                                      np.random.default_rng(0))
        with L.matmul_precision("fp32", r):
            out64, cache64 = fwd64(*inputs)
            return {"out": out64, **{f"grad {i}": g for i, g in enumerate(bwd64(dout, cache64))}}

    expected, spread = sensitivity(layer)
    fwd, bwd, _ = _layer_case(name, ops, np.random.default_rng(0))
    with L.matmul_precision("fp32", be):
        out32, cache32 = fwd(*[cp.asarray(a, dtype=cp.float32) for a in inputs])
        grads32 = bwd(cp.asarray(dout, dtype=cp.float32), cache32)
    assert isinstance(out32, cp.ndarray) and out32.dtype == cp.float32
    ours = {"out": cp.asnumpy(out32), **{f"grad {i}": cp.asnumpy(g) for i, g in enumerate(grads32)}}
    assert_within_rounding(ours, expected, spread, name)


@pytest.mark.gpu
def test_cross_entropy_and_embedding_on_cupy():
    cp = _cp()
    _, ops = _gpu()
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((2, 8, 50)) * 3
    targets = rng.integers(0, 50, (2, 8))
    targets[0, 0] = -1
    expected, spread = layer_sensitivity("cross_entropy", [logits, targets], 1.0)
    loss32, c32 = ops.cross_entropy_forward(cp.asarray(logits, dtype=cp.float32), cp.asarray(targets))
    ours = {"out": float(loss32), "grad 0": cp.asnumpy(ops.cross_entropy_backward(1.0, c32))}
    assert_within_rounding(ours, expected, spread, "cross-entropy")
    idx = rng.integers(0, 50, (2, 8))
    wte, wpe = rng.standard_normal((50, 16)), rng.standard_normal((8, 16))
    dx = rng.standard_normal((2, 8, 16))
    expected, spread = layer_sensitivity("embedding", [idx, wte, wpe], dx)
    x32, e32 = ops.embedding_forward(cp.asarray(idx), cp.asarray(wte, dtype=cp.float32),
                                     cp.asarray(wpe, dtype=cp.float32))
    dwte, dwpe = ops.embedding_backward(cp.asarray(dx, dtype=cp.float32), e32)
    ours = {"out": cp.asnumpy(x32), "grad 0": cp.asnumpy(dwte), "grad 1": cp.asnumpy(dwpe)}
    assert_within_rounding(ours, expected, spread, "embedding")


@pytest.mark.gpu
def test_model_cupy_fp32_matches_numpy_fp64():
    cp = _cp()
    cfg = GPTConfig(block_size=64, vocab_size=500, n_layer=2, n_head=4, n_embd=64)
    ref = GPT(cfg, dtype="float64", seed=3)
    gpu = GPT(cfg, backend="cupy", dtype="float32", params=ref.state_dict())
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 500, (4, 64)), rng.integers(0, 500, (4, 64))
    expected, spread = model_sensitivity(cfg, ref.state_dict(), idx, targets)
    logits32, loss32 = gpu.forward(idx, targets)  # idx may come from the host
    g32 = gpu.backward()
    assert isinstance(logits32, cp.ndarray)
    ours = {"logits": cp.asnumpy(logits32), "loss": float(loss32),
            **{k: cp.asnumpy(v) for k, v in g32.items()}}
    assert_within_rounding(ours, expected, spread, "cupy model")


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


@pytest.fixture
def unfused():
    """The reference layer code on CuPy arrays, fused kernels off, for this test only."""
    from gpt2np.backends import get_backend

    be = get_backend("cupy")
    old, be.fused = be.fused, False
    yield be
    be.fused = old


def _gemm_cases(cp, rng):
    M, K, N = 48, 40, 24
    qkv = cp.asarray(rng.standard_normal((2, 16, 3 * 4 * 8)), dtype=cp.float32)
    q, k, v = qkv.reshape(2, 16, 3, 4, 8).transpose(2, 0, 3, 1, 4)
    f = lambda *s: cp.asarray(rng.standard_normal(s), dtype=cp.float32)  # noqa: E731
    return {
        "contiguous": (f(M, K), f(K, N)),
        "x @ W.T": (f(M, K), f(N, K).T),
        "x.T @ dout": (f(K, M).T, f(K, N)),
        "wide row stride": (f(M, 2 * K)[:, 5:5 + K], f(K, N)),
        "batched 4-D": (f(2, 3, M, K), f(2, 3, K, N)),
        "att^T @ dy": (f(2, 3, N, M).transpose(0, 1, 3, 2), f(2, 3, N, K)),
        "q @ k^T (strided heads)": (q, k.transpose(0, 1, 3, 2)),
        "P @ v (strided heads)": (f(2, 4, 16, 16), v),
    }


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_cublas_matmul_in_every_layout_and_precision(precision):
    # bf16: exactly the float64 product of the bf16-rounded operands, up to float32
    # accumulation; tf32: the hardware's own rounding (or truncation) of the operands, within
    # one TF32 ulp each. Bounds: tests/rounding.py::assert_matmul_close
    cp = _cp()
    from gpt2np.backends import get_backend
    from gpt2np.layers import round_mantissa

    be = get_backend("cupy")
    rng = np.random.default_rng(0)
    operand_err = OPERAND_EPS["tf32"] if precision == "tf32" else 0.0
    for name, (a, b) in _gemm_cases(cp, rng).items():
        c = be.matmul(a, b, precision=precision)
        a64, b64 = cp.asnumpy(a), cp.asnumpy(b)
        if precision == "bf16":
            a64, b64 = round_mantissa(a64, 7), round_mantissa(b64, 7)
        a64, b64 = a64.astype(np.float64), b64.astype(np.float64)
        assert c.dtype == cp.float32
        assert_matmul_close(cp.asnumpy(c), a64, b64, operand_err, name=f"{name} {precision}")
        out = cp.zeros(c.shape[:-1] + (c.shape[-1] + 3,), dtype=cp.float32)[..., 1:-2]
        be.matmul(a, b, out=out, precision=precision)  # a strided out=
        assert_matmul_close(cp.asnumpy(out), a64, b64, operand_err, name=f"{name} {precision} out=")


@pytest.mark.gpu
def test_attention_kernels_match_their_numpy_specification():
    cp = _cp()
    from gpt2np.backends.cupy_attention import gpu_row_ops, numpy_row_ops

    rng = np.random.default_rng(0)
    gpu, ref = gpu_row_ops(), numpy_row_ops()
    # (n queries from q0) x (L = q0 + n keys): whole matrices (q0 = 0) and later blocks
    for n, q0 in ((1, 0), (7, 0), (300, 0), (256, 768), (5, 250), (1, 9)):
        L_ = q0 + n
        S = (3 * rng.standard_normal((2, 3, n, L_))).astype(np.float32)
        dP = rng.standard_normal((2, 3, n, L_)).astype(np.float32)
        D = rng.standard_normal((2, 3, n)).astype(np.float32)

        def rows(r):  # the specification in float64, or moved as float32 would round it
            move = np.copy if r is None else r
            P = move(S.astype(np.float64))
            lse = move(ref.causal_softmax(P, q0))
            P, R = move(P), move(S.astype(np.float64))
            ref.softmax_recompute(R, lse, q0)  # from the rounded lse, as the kernel's
            dS = move(dP.astype(np.float64))
            ref.softmax_backward(dS, P, move(D.astype(np.float64)))
            return {"P": P, "lse": lse, "recomputed P": move(R), "dS": move(dS)}

        expected, spread = sensitivity(rows)
        P = cp.asarray(S)
        lse = gpu.causal_softmax(P, q0)
        R = cp.asarray(S)
        gpu.softmax_recompute(R, lse, q0)
        dS = cp.asarray(dP)
        gpu.softmax_backward(dS, P, cp.asarray(D))
        ours = {"P": P, "lse": lse, "recomputed P": R, "dS": dS}
        assert_within_rounding({k: cp.asnumpy(v) for k, v in ours.items()}, expected, spread,
                               f"{n}x{L_}")


# ------------------------------------------------------------------ flash attention (bf16)

def _bf16(a):
    from gpt2np.layers import round_mantissa

    return round_mantissa(np.asarray(a, dtype=np.float32), 7).astype(np.float64)


def _flash_operands(qkv, n_head):
    # q*scale (scaled in float32, then rounded), k, v: bf16 values in float64, (B,NH,T,hs)
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    q, k, v = np.asarray(qkv, dtype=np.float32).reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)
    return _bf16(q * np.float32(1.0 / np.sqrt(hs))), _bf16(k), _bf16(v)


def _heads(a, n_head):  # (B,T,C) -> (B,NH,T,hs)
    B, T, C = a.shape
    return np.asarray(a, dtype=np.float64).reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)


def _flash_forward_emulation(qkv, n_head, tile=64):
    """What flash_attention.cu's forward computes, in float64 with its bf16 roundings: the
    online softmax over key tiles, P rounded before it is normalised. -> y (B,T,C), lse."""
    qs, k, v = _flash_operands(qkv, n_head)
    B, NH, T, hs = qs.shape
    S = qs @ k.transpose(0, 1, 3, 2)
    S[..., ~np.tril(np.ones((T, T), bool))] = -np.inf  # the future
    m = np.full((B, NH, T, 1), -np.inf)
    l, o = np.zeros((B, NH, T, 1)), np.zeros((B, NH, T, hs))
    for j in range(0, T, tile):
        s = S[..., j:j + tile]
        m_new = np.maximum(m, s.max(axis=-1, keepdims=True))
        alpha, p = np.exp(m - m_new), np.exp(s - m_new)
        l = l * alpha + p.sum(axis=-1, keepdims=True)
        o = o * alpha + _bf16(p) @ v[:, :, j:j + tile]
        m = m_new
    y = (o / l).transpose(0, 2, 1, 3).reshape(B, T, NH * hs)
    return y, (m + np.log(l))[..., 0]


def _flash_backward_emulation(qkv, dout, y, lse, n_head):
    """The backward kernels' arithmetic from the forward's own y and lse: P = exp(S - lse),
    D = rowsum(dy * y), and the products of bf16 dy, P and dS. -> dqkv (B,T,3C)."""
    qs, k, v = _flash_operands(qkv, n_head)
    B, NH, T, hs = qs.shape
    S = qs @ k.transpose(0, 1, 3, 2)
    P = np.where(np.tril(np.ones((T, T), bool)), np.exp(S - lse[..., None]), 0.0)
    dy = _heads(dout, n_head)
    D = (dy * _heads(y, n_head)).sum(axis=-1, keepdims=True)
    dy = _bf16(dy)
    dS = P * (dy @ v.transpose(0, 1, 3, 2) - D)
    dq = _bf16(dS) @ k / np.sqrt(hs)
    dk = _bf16(dS).transpose(0, 1, 3, 2) @ qs
    dv = _bf16(P).transpose(0, 1, 3, 2) @ dy
    return np.stack([g.transpose(0, 2, 1, 3) for g in (dq, dk, dv)], axis=2).reshape(qkv.shape)


@pytest.mark.gpu
@pytest.mark.parametrize("B,NH,T,hs", [(2, 2, 80, 16), (1, 3, 130, 32), (2, 1, 7, 16), (1, 2, 128, 64),
                                      (1, 1, 1000, 64), (1, 1, 70, 128)])
def test_flash_attention_in_bf16(B, NH, T, hs):
    # T not a multiple of the 64-row tiles, shorter than one tile, and several tiles
    cp = _cp()
    from gpt2np.backends.cupy_attention import FlashCache

    be, ops = _gpu()
    rng = np.random.default_rng(T)
    qkv = rng.standard_normal((B, T, 3 * NH * hs))
    dout = rng.standard_normal((B, T, NH * hs))
    with L.matmul_precision("bf16", be):
        y, cache = ops.attention_forward(cp.asarray(qkv, dtype=cp.float32), NH)
        assert isinstance(cache, FlashCache)
        dqkv = cp.asnumpy(ops.attention_backward(cp.asarray(dout, dtype=cp.float32), cache))
    y, lse = cp.asnumpy(y), cp.asnumpy(cache.lse)
    assert y.shape == (B, T, NH * hs) and dqkv.shape == qkv.shape
    # against the float64 oracle: within bf16's rounding of this example (tests/rounding.py)
    expected, spread = layer_sensitivity("attention", [qkv, NH], dout, precision="bf16")
    assert_within_rounding({"out": y, "grad 0": dqkv}, expected, spread, "flash vs float64")
    # against emulations of the kernels' own roundings: far closer. What differs: the order
    # of float32 sums and __expf, and through them a rare bf16 rounding of P or dS that
    # falls the other way (one bf16 ulp of one term: more of them at long T). So the max
    # error is bounded loosely, the RMS error (far below the error against float64) tightly
    y_emu, lse_emu = _flash_forward_emulation(qkv, NH)
    dqkv_emu = _flash_backward_emulation(qkv, dout, y, lse, NH)
    assert_close(lse, lse_emu, 1e-5, "lse vs flash emulation")
    for name, got, emu in (("y", y, y_emu), ("dqkv", dqkv, dqkv_emu)):
        assert_close(got, emu, 3e-3, f"{name} vs flash emulation")
        rms = np.sqrt(np.mean((got - emu) ** 2) / np.mean(emu ** 2))
        assert rms < 3e-4, f"{name} vs flash emulation: RMS relative error {rms:.1e}"


@pytest.mark.gpu
@pytest.mark.parametrize("n_head,precision", [(2, "bf16"), (4, "bf16"), (2, "fp32")])
def test_attention_adds_the_c_attn_bias_itself(n_head, precision):
    # the block's fused path hands qkv without c_attn's bias: flash attention adds it while
    # packing q, k, v; the query-block attention first. Either way: the same as qkv + bias
    cp = _cp()
    be, ops = _gpu()
    rng = np.random.default_rng(n_head)
    qkv = rng.standard_normal((2, 20, 96)).astype(np.float32)
    bias = rng.standard_normal(96).astype(np.float32)
    dout = cp.asarray(rng.standard_normal((2, 20, 32)), dtype=cp.float32)
    with L.matmul_precision(precision, be):
        y, c = ops.attention_forward(cp.asarray(qkv), n_head, bias=cp.asarray(bias))
        y_ref, c_ref = ops.attention_forward(cp.asarray(qkv + bias), n_head)  # float32 sum
        np.testing.assert_array_equal(cp.asnumpy(y), cp.asnumpy(y_ref))
        np.testing.assert_array_equal(cp.asnumpy(ops.attention_backward(dout, c)),
                                      cp.asnumpy(ops.attention_backward(dout, c_ref)))
    y_cpu, _ = L.attention_forward(qkv.astype(np.float64), n_head, bias=bias.astype(np.float64))
    y_cpu_ref, _ = L.attention_forward(qkv.astype(np.float64) + bias, n_head)
    np.testing.assert_array_equal(y_cpu, y_cpu_ref)


@pytest.mark.gpu
def test_flash_attention_is_used_only_where_it_applies(monkeypatch):
    cp = _cp()
    from gpt2np.backends.cupy_attention import FlashCache

    be, ops = _gpu()
    rng = np.random.default_rng(0)

    def flash(n_head, C=32, precision="bf16"):
        qkv = cp.asarray(rng.standard_normal((1, 8, 3 * C)), dtype=cp.float32)
        with L.matmul_precision(precision, be):
            return isinstance(ops.attention_forward(qkv, n_head)[1], FlashCache)

    assert flash(2)  # head size 16
    # a view at an odd float offset (the kernels read float pairs) and a strided view
    base = cp.asarray(rng.standard_normal(1 + 2 * 8 * 96 * 2), dtype=cp.float32)
    for qkv in (base[1:1 + 2 * 8 * 96].reshape(2, 8, 96), base[:2 * 8 * 192].reshape(2, 8, 192)[..., ::2]):
        ref = cp.ascontiguousarray(qkv).copy()
        with L.matmul_precision("bf16", be):
            y, cache = ops.attention_forward(qkv, 2)
            y_ref, _ = ops.attention_forward(ref, 2)
        assert isinstance(cache, FlashCache)
        np.testing.assert_array_equal(cp.asnumpy(y), cp.asnumpy(y_ref))
    assert not flash(4)  # head size 8: not compiled in
    assert not flash(2, precision="fp32")  # its products are bf16
    assert not flash(2, precision="tf32")
    monkeypatch.setenv("GPT2NP_FLASH", "0")
    assert not flash(2)


@pytest.mark.gpu
def test_layers_on_cupy_without_fused_kernels(unfused):
    assert unfused.layer_ops("float32") is L.REFERENCE_OPS
    assert unfused.adamw_update("float32") is None
    for name in ("layernorm", "gelu", "attention"):
        test_layer_cupy_fp32_matches_numpy_fp64(name)


@pytest.mark.gpu
def test_fused_and_reference_layers_give_the_same_model(unfused):
    cp = _cp()
    cfg = GPTConfig(block_size=64, vocab_size=300, n_layer=2, n_head=4, n_embd=64)
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 300, (4, 64)), rng.integers(0, 300, (4, 64))
    results = {}
    for fused in (False, True):
        unfused.fused = fused
        model = GPT(cfg, backend="cupy", seed=1)
        _, loss = model.forward(idx, targets)
        results[fused] = {"loss": float(loss), **{k: cp.asnumpy(v) for k, v in model.backward().items()}}
    # two float32 results: each within float32's rounding of the float64 one, so within
    # twice that of each other
    _, spread = model_sensitivity(cfg, GPT(cfg, seed=1).state_dict(), idx, targets)
    assert_within_rounding(results[True], results[False], spread, "fused vs reference", sides=2)


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_model_in_low_precision_on_gpu(precision, monkeypatch):
    # against the float64 oracle within the tolerance of the format (as on the CPU); for
    # bf16 also with flash attention off, against the CPU's emulation of the same rounding
    # (flash attention rounds P before normalising it: test_flash_attention_in_bf16)
    cfg = GPTConfig(block_size=32, vocab_size=96, n_layer=2, n_head=4, n_embd=64)
    ref = GPT(cfg, dtype="float64", seed=0)
    emu = GPT(cfg, dtype="float32", precision=precision, params=ref.state_dict())
    gpu = GPT(cfg, backend="cupy", precision=precision, params=ref.state_dict())
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 96, (3, 32)), rng.integers(0, 96, (3, 32))

    def run(m):
        logits, loss = m.forward(idx, targets)
        return (m.backend.to_host(logits).copy(),
                {k: m.backend.to_host(v).copy() for k, v in m.backward().items()})

    out = {name: run(m) for name, m in (("ref", ref), ("emu", emu), ("gpu", gpu))}
    # against float64 within this precision's rounding of this example (tests/rounding.py);
    # against the emulation of the same rounding (float32 in another order: a rare bf16
    # rounding falls the other way) the fixed bounds below
    _, spread = model_sensitivity(cfg, ref.state_dict(), idx, targets, precision)
    expected = {"logits": out["ref"][0], **out["ref"][1]}
    assert_within_rounding({"logits": out["gpu"][0], **out["gpu"][1]}, expected, spread,
                           f"{precision} vs float64")
    if precision == "bf16":
        monkeypatch.setenv("GPT2NP_FLASH", "0")
        logits, grads = run(gpu)
        assert_close(logits, out["emu"][0], 1e-3, "logits vs CPU emulation")
        assert_grads_close(grads, out["emu"][1], 1e-2, "grads vs CPU emulation")


@pytest.mark.gpu
def test_embedding_backward_is_deterministic_on_gpu():
    cp = _cp()
    _, ops = _gpu()
    rng = np.random.default_rng(0)
    idx = cp.asarray(rng.integers(0, 5, (8, 256)))  # many repeats of few ids
    wte = cp.asarray(rng.standard_normal((5, 64)), dtype=cp.float32)
    wpe = cp.asarray(rng.standard_normal((256, 64)), dtype=cp.float32)
    _, cache = ops.embedding_forward(idx, wte, wpe)
    dx = cp.asarray(rng.standard_normal((8, 256, 64)), dtype=cp.float32)
    first = [cp.asnumpy(g) for g in ops.embedding_backward(dx, cache)]
    for _ in range(3):
        again = [cp.asnumpy(g) for g in ops.embedding_backward(dx, cache)]
        for a, b in zip(first, again):
            np.testing.assert_array_equal(a, b)


@pytest.mark.gpu
@pytest.mark.sim_slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_shakespeare_on_cupy_end_to_end(tmp_path, precision):
    from testdata import shakespeare_path

    from gpt2np.commands.train import main

    data = shakespeare_path()
    if not data.exists():
        pytest.skip(f"no tiny Shakespeare at {data}")
    rc = main(["--backend", "cupy", "--precision", precision, "--data", str(data),
               "--out-dir", str(tmp_path / "run"), "--max-steps", "60", "--eval-interval", "30",
               "--batch-size", "8", "--block-size", "64", "--no-progress", "--num-samples", "1",
               "--sample-tokens", "8"])
    assert rc == 0
    import json

    log = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    assert [r["step"] for r in log] == list(range(60))  # all steps ran (not stopped early)
    train = [r["train_loss"] for r in log]
    assert train[-1] < train[0] - 1.0, train[::10]  # falling loss
    val = [r["val_loss"] for r in log if "val_loss" in r]
    assert len(val) == 2 and val[-1] < train[0] - 1.0
