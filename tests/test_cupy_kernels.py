"""The fused CUDA kernels (gpt2np/backends/cupy_kernels.py) against the reference layers and AdamW.

Every test needs CuPy and a GPU (marked `gpu`: skipped without them, as in CI). Inputs are
rounded to float32 first, so the float64 reference sees exactly what the kernels see and
the comparison measures only the kernels' float32 arithmetic, against the tolerance that
float32's rounding gives on each example (tests/rounding.py).
"""
import math

import numpy as np
import pytest

from gpt2np import layers as L
from gpt2np.optim import AdamW
from gradcheck import assert_close
from rounding import assert_matmul_close, assert_within_rounding, layer_sensitivity, sensitivity

pytestmark = pytest.mark.gpu


def _cp():
    import cupy

    return cupy


def _K():
    from gpt2np.backends import cupy_kernels

    return cupy_kernels


def _f32(a):
    """(float64 copy of a rounded to float32, the float32 cupy array)."""
    cp = _cp()
    a32 = np.asarray(a, dtype=np.float32)
    return a32.astype(np.float64), cp.asarray(a32)


def _host(a):
    return _cp().asnumpy(a)


# --------------------------------------------------------------------------------------
# LayerNorm


@pytest.mark.parametrize("shape", [(2, 3, 37), (5, 768), (1, 1, 1600), (1025, 33), (3000, 64)])
def test_layernorm_matches_reference(shape):
    K = _K()
    rng = np.random.default_rng(0)
    C = shape[-1]
    x64, x = _f32(2 * rng.standard_normal(shape) + 0.5)
    w64, w = _f32(1 + 0.1 * rng.standard_normal(C))
    b64, b = _f32(0.1 * rng.standard_normal(C))
    dout64, dout = _f32(rng.standard_normal(shape))
    expected, spread = layer_sensitivity("layernorm", [x64, w64, b64], dout64)

    out, cache = K.layernorm_forward(x, w, b)
    assert out.dtype == np.float32 and out.shape == shape
    grads = K.layernorm_backward(dout, cache)
    assert all(g.dtype == np.float32 for g in grads)
    ours = {"out": _host(out), **{f"grad {i}": _host(g) for i, g in enumerate(grads)}}
    assert_within_rounding(ours, expected, spread, "layernorm")
    again = K.layernorm_backward(dout, cache)  # no atomics: bit-identical
    for g, g2 in zip(grads, again):
        assert np.array_equal(_host(g), _host(g2))


def test_layernorm_copies_a_strided_input_and_rejects_float64():
    cp, K = _cp(), _K()
    rng = np.random.default_rng(1)
    xt64, xt = _f32(rng.standard_normal((37, 6)))  # x = xt.T: a (6, 37) strided view
    w64, w = _f32(1 + 0.1 * rng.standard_normal(37))
    b64, b = _f32(0.1 * rng.standard_normal(37))
    out, _ = K.layernorm_forward(xt.T, w, b)
    expected, spread = layer_sensitivity("layernorm", [xt64.T, w64, b64], None)
    assert_within_rounding({"out": _host(out)}, expected, spread, "strided x")
    with pytest.raises(ValueError, match="float32"):
        K.layernorm_forward(xt.T.astype(cp.float64), w, b)
    with pytest.raises(ValueError, match="weight"):
        K.layernorm_forward(xt.T, w[:5], b)


# --------------------------------------------------------------------------------------
# GELU


@pytest.mark.parametrize("shape", [(1,), (3, 37), (100003,)])
def test_gelu_matches_reference(shape):
    K = _K()
    rng = np.random.default_rng(2)
    x64, x = _f32(3 * rng.standard_normal(shape))
    dout64, dout = _f32(rng.standard_normal(shape))
    expected, spread = layer_sensitivity("gelu", [x64], dout64)
    out, cache = K.gelu_forward(x)
    ours = {"out": _host(out), "grad 0": _host(K.gelu_backward(dout, cache))}
    assert_within_rounding(ours, expected, spread, "gelu")


@pytest.mark.parametrize("shape", [(1, 1), (3, 37), (7, 3072)])
def test_gelu_with_bias_matches_reference_and_leaves_its_input(shape):
    # the fused bias + GELU (c_fc's bias added on the way) against the reference's
    # gelu_forward(x, bias); x itself is the caller's, and stays as it was
    K = _K()
    rng = np.random.default_rng(12)
    x64, x = _f32(3 * rng.standard_normal(shape))
    b64, b = _f32(rng.standard_normal(shape[-1]))
    dout64, dout = _f32(rng.standard_normal(shape))
    expected, spread = layer_sensitivity("gelu", [x64, b64], dout64)
    out, cache = K.gelu_forward(x, b)
    np.testing.assert_array_equal(_host(x), x64.astype(np.float32))
    ours = {"out": _host(out), "grad 0": _host(K.gelu_backward(dout, cache))}
    assert_within_rounding(ours, expected, spread, "bias+gelu")
    with pytest.raises(ValueError, match="bias"):
        K.gelu_forward(x, b[:-1])


# --------------------------------------------------------------------------------------
# cross-entropy


def _ce_case(rng, B, T, V, ignored=0.3, shift=0.0):
    logits = 3 * rng.standard_normal((B, T, V)) + shift
    targets = rng.integers(0, V, (B, T))
    targets[rng.random((B, T)) < ignored] = -1
    return _f32(logits), targets


@pytest.mark.parametrize("B,T,V", [(3, 7, 1001), (2, 5, 50304), (1, 3, 5), (2, 3, 1), (4, 33, 64)])
@pytest.mark.parametrize("dloss", [1.0, 2.5, "device"])
def test_cross_entropy_matches_reference(B, T, V, dloss):
    cp, K = _cp(), _K()
    rng = np.random.default_rng(3)
    (logits64, logits), targets = _ce_case(rng, B, T, V)
    targets[0, 0] = 0  # at least one counted row
    d = 0.5 if dloss == "device" else dloss
    expected, spread = layer_sensitivity("cross_entropy", [logits64, targets], d)

    loss, cache = K.cross_entropy_forward(logits, cp.asarray(targets))
    assert isinstance(loss, cp.ndarray) and loss.shape == () and loss.dtype == np.float32
    dl = K.cross_entropy_backward(cp.asarray(d, dtype=cp.float32) if dloss == "device" else d,
                                  cache)
    assert dl.shape == (B, T, V) and dl.dtype == np.float32
    assert_within_rounding({"out": _host(loss), "grad 0": _host(dl)}, expected, spread,
                           "cross-entropy")
    assert not _host(dl)[targets == -1].any()  # ignored rows: exactly zero


def test_cross_entropy_is_stable_for_large_logits_and_takes_int32_targets():
    cp, K = _cp(), _K()
    rng = np.random.default_rng(4)
    (logits64, logits), targets = _ce_case(rng, 2, 9, 300, shift=1000.0)
    # logits near 1000 carry float32's 6e-5 spacing into exp(logit - lse): the spread of
    # the float64 result under float32-sized moves includes it
    expected, spread = layer_sensitivity("cross_entropy", [logits64, targets], 1.0)
    loss, cache = K.cross_entropy_forward(logits, cp.asarray(targets, dtype=cp.int32))
    ours = {"out": _host(loss), "grad 0": _host(K.cross_entropy_backward(1.0, cache))}
    assert_within_rounding(ours, expected, spread, "cross-entropy at logits ~1000")


def test_cross_entropy_backward_writes_into_out():
    cp, K = _cp(), _K()
    rng = np.random.default_rng(5)
    (logits64, logits), targets = _ce_case(rng, 2, 4, 77)
    out = cp.full((2, 4, 77), cp.nan, dtype=cp.float32)
    loss, cache = K.cross_entropy_forward(logits, cp.asarray(targets), out=out)
    dl = K.cross_entropy_backward(1.0, cache)
    assert dl is out
    expected, spread = layer_sensitivity("cross_entropy", [logits64, targets], 1.0)
    assert_within_rounding({"grad 0": _host(out)}, {"grad 0": expected["grad 0"]}, spread,
                           "dlogits in out")
    with pytest.raises(ValueError, match="out"):
        K.cross_entropy_forward(logits, cp.asarray(targets), out=cp.empty((2, 4, 76), dtype=cp.float32))


def test_cross_entropy_backward_refuses_an_out_overlapping_logits():
    # float32 may write dlogits over logits itself (each element read, then written, by one
    # thread); the bf16 operand (rows of V uint16 in the first half of the bytes) would
    # overwrite logits rows other blocks have not read yet, and so would a float32 out at a
    # shifted address: both are refused rather than silently corrupting the gradient
    cp, K = _cp(), _K()
    rng = np.random.default_rng(7)
    B, T, V = 2, 3, 1500
    (logits64, _), targets = _ce_case(rng, B, T, V)
    expected, spread = layer_sensitivity("cross_entropy", [logits64, targets], 1.0)
    logits = cp.asarray(logits64.astype(np.float32))
    _, cache = K.cross_entropy_forward(logits, cp.asarray(targets), out=logits)
    with pytest.raises(ValueError, match="overlaps logits.*bf16"), L.matmul_precision("bf16"):
        K.cross_entropy_backward(1.0, cache, operand=True)
    assert_close(_host(logits), logits64, 0, "logits untouched by the refused call")
    assert K.cross_entropy_backward(1.0, cache) is logits  # float32 in place: allowed
    assert_within_rounding({"grad 0": _host(logits)}, {"grad 0": expected["grad 0"]}, spread,
                           "dlogits over logits")

    buf = cp.asarray(np.zeros(B * T * V + V, dtype=np.float32))
    shifted = buf[V:].reshape(B, T, V)  # logits one row further than out
    shifted[...] = cp.asarray(logits64.astype(np.float32))
    _, cache = K.cross_entropy_forward(shifted, cp.asarray(targets), out=buf[:-V].reshape(B, T, V))
    for precision in ("fp32", "bf16"):
        with pytest.raises(ValueError, match="overlaps logits"), L.matmul_precision(precision):
            K.cross_entropy_backward(1.0, cache, operand=True)
    separate = cp.empty((B, T, V), dtype=cp.float32)  # no overlap: the bf16 bits go to out
    _, cache = K.cross_entropy_forward(shifted, cp.asarray(targets), out=separate)
    with L.matmul_precision("bf16"):
        d16 = K.cross_entropy_backward(1.0, cache, operand=True)
    assert d16.data.ptr == separate.data.ptr
    assert_close(_host(shifted), logits64, 0, "logits untouched by the bf16 gradient")


def test_cross_entropy_all_ignored_is_nan_with_zero_gradient():
    cp, K = _cp(), _K()
    rng = np.random.default_rng(6)
    _, logits = _f32(rng.standard_normal((2, 3, 40)))
    loss, cache = K.cross_entropy_forward(logits, cp.full((2, 3), -1, dtype=cp.int64))
    assert math.isnan(float(loss))  # as torch: the mean over no tokens
    dl = _host(K.cross_entropy_backward(1.0, cache))
    assert np.all(dl == 0)


# --------------------------------------------------------------------------------------
# token + position embedding backward


def _embedding_backward_sensitivity(dx, cache, dwte=None):
    """sensitivity() of the reference embedding backward of dx (into a copy of dwte)."""
    def backward(r):
        ops = L.REFERENCE_OPS if r is None else r.ops()
        into = None if dwte is None else dwte.copy() if r is None else r(dwte)
        return dict(zip(("dwte", "dwpe"), ops.embedding_backward(dx, cache, dwte=into)))

    return sensitivity(backward)


@pytest.mark.parametrize("B,T,C", [(3, 13, 37), (2, 8, 768), (2, 5, 1100)])
def test_embedding_backward_matches_reference_and_is_deterministic(B, T, C):
    cp, K = _cp(), _K()
    rng = np.random.default_rng(7)
    V, block_size = 50, 16
    idx = rng.integers(0, 10, (B, T))  # ids 0..9: many repeats
    idx[0, :3] = [49, 20, 20]
    wte64, _ = _f32(rng.standard_normal((V, C)))
    wpe64, _ = _f32(rng.standard_normal((block_size, C)))
    _, cache_ref = L.embedding_forward(idx, wte64, wpe64)
    dx64, dx = _f32(rng.standard_normal((B, T, C)))
    cache = (cp.asarray(idx), (V, C), (block_size, C))

    expected, spread = _embedding_backward_sensitivity(dx64, cache_ref)
    dwte, dwpe = K.embedding_backward(dx, cache)
    assert dwte.shape == (V, C) and dwpe.shape == (block_size, C)
    assert_within_rounding({"dwte": _host(dwte), "dwpe": _host(dwpe)}, expected, spread, "embedding")
    dwte2, dwpe2 = K.embedding_backward(dx, cache)  # no atomics: bit-identical
    assert np.array_equal(_host(dwte), _host(dwte2)) and np.array_equal(_host(dwpe), _host(dwpe2))

    # accumulate into a given dwte (the tied lm_head's share)
    head64, head = _f32(rng.standard_normal((V, C)))
    dwte_acc, _ = K.embedding_backward(dx, cache, dwte=head)
    assert dwte_acc is head
    expected, spread = _embedding_backward_sensitivity(dx64, cache_ref, head64)
    assert_within_rounding({"dwte": _host(dwte_acc)}, {"dwte": expected["dwte"]}, spread,
                           "dwte accumulated")


def test_embedding_backward_one_long_run():
    cp, K = _cp(), _K()
    rng = np.random.default_rng(8)
    B, T, C, V = 4, 64, 40, 7
    idx = np.full((B, T), 3)  # every token the same id: one run of B*T rows
    dx64, dx = _f32(rng.standard_normal((B, T, C)))
    _, cache_ref = L.embedding_forward(idx, np.zeros((V, C)), np.zeros((T, C)))
    dwte, dwpe = K.embedding_backward(dx, (cp.asarray(idx), (V, C), (T, C)))
    expected, spread = _embedding_backward_sensitivity(dx64, cache_ref)
    assert_within_rounding({"dwte": _host(dwte), "dwpe": _host(dwpe)}, expected, spread, "embedding")


# --------------------------------------------------------------------------------------
# AdamW


_ADAM_SHAPES = {"a": (1,), "b": (37,), "c.w": (64, 33), "d.w": (3, 65536 + 5), "e": (200003,)}


def test_adamw_update_matches_reference_adamw():
    cp, K = _cp(), _K()
    rng = np.random.default_rng(9)
    params64 = {k: _f32(rng.standard_normal(s))[0] for k, s in _ADAM_SHAPES.items()}
    lrs = [1e-3, 6e-4, 2e-4]
    steps = [{k: _f32(rng.standard_normal(s))[0] for k, s in _ADAM_SHAPES.items()} for _ in lrs]

    def adamw(r):
        # float64 AdamW; or with what float32 rounds moved (tests/rounding.py): the
        # gradients on their way in, p, m and v as each step stores them
        move = np.copy if r is None else r
        opt = AdamW({k: move(p) for k, p in params64.items()}, lr=1e-3, weight_decay=0.1)
        out = {}
        for t, (lr, grads64) in enumerate(zip(lrs, steps), start=1):
            opt.step({k: move(g) for k, g in grads64.items()}, lr=lr)
            for what, state in (("param", opt.params), ("m", opt.m), ("v", opt.v)):
                for k in state:
                    state[k][...] = move(state[k])
                    out[f"step {t} {what} {k}"] = state[k].copy()
        return out

    expected, spread = sensitivity(adamw)
    opt = AdamW({k: p.copy() for k, p in params64.items()}, lr=1e-3, weight_decay=0.1)
    names = list(params64)
    ps = [cp.asarray(params64[k], dtype=cp.float32) for k in names]
    ms = [cp.zeros_like(p) for p in ps]
    vs = [cp.zeros_like(p) for p in ps]
    b1, b2 = opt.beta1, opt.beta2
    ours = {}
    for t, (lr, grads64) in enumerate(zip(lrs, steps), start=1):
        decays = [1.0 - lr * opt.weight_decay if opt.decays(k) else 1.0 for k in names]
        K.adamw_update(ps, [cp.asarray(grads64[k], dtype=cp.float32) for k in names], ms, vs, decays,
                       b1, b2, opt.eps, lr / (1.0 - b1 ** t), math.sqrt(1.0 - b2 ** t))
        for what, state in (("param", ps), ("m", ms), ("v", vs)):
            ours.update({f"step {t} {what} {k}": _host(a) for k, a in zip(names, state)})
    assert_within_rounding(ours, expected, spread, "fused AdamW vs float64")


def test_adamw_update_is_the_float32_reference_bit_for_bit():
    # the kernel rounds every operation as the unfused float32 sequence of AdamW._update
    # (here in numpy; no value comes near the denormals that CuPy's -ftz=true flushes)
    cp, K = _cp(), _K()
    rng = np.random.default_rng(10)
    f = np.float32
    b1, b2, eps, lr, wd = 0.9, 0.95, 1e-8, 3e-4, 0.1
    shapes = list(_ADAM_SHAPES.values())
    p_ref = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    m_ref = [0.1 * rng.standard_normal(s).astype(np.float32) for s in shapes]
    v_ref = [rng.random(s).astype(np.float32) * f(0.01) for s in shapes]
    g_ref = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    ps, ms, vs, gs = ([cp.asarray(a) for a in arrays] for arrays in (p_ref, m_ref, v_ref, g_ref))
    decays = [1.0 - lr * wd if len(s) >= 2 else 1.0 for s in shapes]
    t = 5
    step_size, sqrt_bias2 = lr / (1.0 - b1 ** t), math.sqrt(1.0 - b2 ** t)
    for _ in range(2):  # the second call reuses the cached pointer tables
        K.adamw_update(ps, gs, ms, vs, decays, b1, b2, eps, step_size, sqrt_bias2)
        for p, g, m, v, d in zip(p_ref, g_ref, m_ref, v_ref, decays):
            if d != 1.0:
                p *= f(d)
            m *= f(b1)
            m += g * f(1.0 - b1)
            v *= f(b2)
            v += (g * g) * f(1.0 - b2)
            p -= (m / (np.sqrt(v) / f(sqrt_bias2) + f(eps))) * f(step_size)
        for a, ref in zip(ps + ms + vs, p_ref + m_ref + v_ref):
            assert np.array_equal(_host(a), ref)


def test_adamw_update_checks_its_inputs():
    cp, K = _cp(), _K()
    p = cp.zeros((4, 6), dtype=cp.float32)
    g, m, v = cp.ones_like(p), cp.zeros_like(p), cp.zeros_like(p)
    with pytest.raises(ValueError, match="same length"):
        K.adamw_update([p], [g], [m], [v], [1.0, 1.0], 0.9, 0.95, 1e-8, 1e-3, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        K.adamw_update([p.T], [g.T], [m.T], [v.T], [1.0], 0.9, 0.95, 1e-8, 1e-3, 1.0)
    with pytest.raises(ValueError, match="shape"):
        K.adamw_update([p], [g], [m[:2]], [v], [1.0], 0.9, 0.95, 1e-8, 1e-3, 1.0)
    K.adamw_update([], [], [], [], [], 0.9, 0.95, 1e-8, 1e-3, 1.0)  # nothing to do


# --------------------------------------------------------------------------------------
# bf16 outputs: LayerNorm and bias+GELU writing the next GEMM's operand directly


def _same_bf16(got, expected, name):
    """bf16 bits equal to the float32 kernel's output cast by to_bf16. Bit for bit on the
    simulator; on a GPU the two instantiations may contract a multiply-add differently, so
    a rare element may round one bf16 ulp the other way, never more."""
    got, expected = _host(got), _host(expected)
    assert got.dtype == np.uint16 and got.shape == expected.shape, name
    as_float = [(a.astype(np.uint32) << 16).view(np.float32) for a in (got, expected)]
    np.testing.assert_allclose(as_float[0], as_float[1], rtol=2.0 ** -7, atol=0, err_msg=name)
    assert np.mean(got == expected) > 0.999, f"{name}: {np.mean(got != expected):.2%} differ"


def test_kernels_write_bf16_operands():
    # an operand in bf16 must equal the float32 kernel's output cast by to_bf16 (to_bf16:
    # round to nearest even, as torch), and leave the same state for the backward
    from gpt2np.backends import get_backend

    cp, K, be = _cp(), _K(), get_backend("cupy")
    rng = np.random.default_rng(0)
    x = cp.asarray(2 * rng.standard_normal((37, 96)), dtype=cp.float32)
    w = cp.asarray(1 + 0.1 * rng.standard_normal(96), dtype=cp.float32)
    b = cp.asarray(0.1 * rng.standard_normal(96), dtype=cp.float32)
    out32, c32 = K.layernorm_forward(x, w, b, operand=True)  # fp32: float32 operands
    with L.matmul_precision("bf16"):
        out16, c16 = K.layernorm_forward(x, w, b, operand=True)
    assert out32.dtype == cp.float32
    assert out16.dtype == cp.uint16 and out16.shape == x.shape
    _same_bf16(out16, be.to_bf16(out32), "layernorm")
    for a, a2 in zip(c32, c16):
        np.testing.assert_array_equal(_host(a), _host(a2))
    bias = cp.asarray(rng.standard_normal(96), dtype=cp.float32)
    out32, c32 = K.gelu_forward(x, bias, operand=True)
    with L.matmul_precision("bf16"):
        out16, c16 = K.gelu_forward(x, bias, operand=True)
    assert out32.dtype == cp.float32 and out16.dtype == cp.uint16
    _same_bf16(out16, be.to_bf16(out32), "bias+gelu")
    np.testing.assert_array_equal(_host(c16[0]), _host(c32[0]))  # x + bias
    logits = cp.asarray(3 * rng.standard_normal((2, 5, 50)), dtype=cp.float32)
    targets = cp.asarray(rng.integers(0, 50, (2, 5)))
    targets[0, 1] = -1  # an ignored row: zeros
    for out in (None, cp.empty((2, 5, 50), dtype=cp.float32)):  # into the first half of out
        _, cache = K.cross_entropy_forward(logits, targets, out=out)
        d32 = _host(K.cross_entropy_backward(1.0, cache, operand=True)).copy()  # fp32
        with L.matmul_precision("bf16"):
            d16 = K.cross_entropy_backward(1.0, cache, operand=True)
        assert d16.dtype == cp.uint16 and d16.shape == logits.shape
        _same_bf16(d16, be.to_bf16(cp.asarray(d32)), "cross-entropy dlogits")


def test_operands_come_as_bf16_bits_only_in_bf16():
    # the fused ops give what their references give through matmul_operand on the cupy
    # backend: bf16 bits for an operand in bf16, float32 otherwise
    from gpt2np.backends import get_backend

    cp, be = _cp(), get_backend("cupy")
    ops = be.layer_ops("float32")
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal((2, 4, 32)), dtype=cp.float32)
    w, b = cp.ones(32, dtype=cp.float32), cp.zeros(32, dtype=cp.float32)
    layers = (lambda o, **k: o.layernorm_forward(x, w, b, **k),
              lambda o, **k: o.gelu_forward(x, b, **k))
    for precision, operand in (("fp32", cp.float32), ("tf32", cp.float32), ("bf16", cp.uint16)):
        with L.matmul_precision(precision, be):
            for layer in layers:
                assert layer(ops, operand=True)[0].dtype == operand, precision
                assert layer(L.REFERENCE_OPS, operand=True)[0].dtype == operand, precision
                assert layer(ops)[0].dtype == cp.float32  # not an operand


# --------------------------------------------------------------------------------------
# tensor-core fragments (flash attention)


def test_mma_fragment_layout_is_the_hardwares():
    # flash_attention.cu loads mma.m16n8k16's fragments with ldmatrix as the PTX ISA lays
    # them out (and tests/cuda_sim emulates both instructions from that text): on a GPU
    # this checks the hardware agrees, for both ways the kernels stage the b operand
    from gpt2np.layers import round_mantissa

    cp = _cp()
    rng = np.random.default_rng(0)
    a = round_mantissa(rng.standard_normal((16, 16)).astype(np.float32), 7)
    b = round_mantissa(rng.standard_normal((16, 16)).astype(np.float32), 7)
    d_t, d_n = cp.zeros((16, 16), dtype=cp.float32), cp.zeros((16, 16), dtype=cp.float32)
    _K().get_kernel("flash_mma_check", "flash_attention.cu")(
        (1,), (32,), (cp.asarray(a), cp.asarray(b), d_t, d_n))
    a64, b64 = a.astype(np.float64), b.astype(np.float64)  # exact products, float32 sums
    assert_matmul_close(_host(d_t), a64, b64, name="b staged transposed (frag_b_t2)")
    assert_matmul_close(_host(d_n), a64, b64, name="b staged as it is (frag_b2)")
