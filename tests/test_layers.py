"""Each hand-written layer against PyTorch autograd (float64, ~1e-10) and central finite
differences (float64, tiny shapes, independent of torch), over hypothesis-drawn shapes,
values and seeds.

The scalar checked is L = sum(out * dout) for a random upstream gradient dout, so every
output entry's gradient path is exercised, not just a sum. The finite differences have no
fixed tolerance: each probed entry gets the one its error model gives, the measured
truncation plus the rounding of float64 at the function's scale
(tests/gradcheck.py::assert_fd_close), so a correct gradient cannot fail however curved or
badly scaled the layer is at the drawn point.
"""
import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st

from gpt2np.backends import torch_reference as R
from gpt2np import layers as L
from gpt2np.model import block_backward, block_forward
from gradcheck import assert_close, assert_fd_close, torch_grads

TORCH_RTOL = 1e-10  # float64, same math in another order: agreement to near machine precision


def _rng(seed):
    return np.random.default_rng(seed)


def check_layer(forward, backward, ref, inputs, wrt, fd_wrt=None, seed=0, n_probe=40,
                torch_rtol=TORCH_RTOL, out_atol=0.0, grad_atol=0.0):
    """forward(**inputs) -> (out, cache); backward(dout, cache) -> dict of grads for `wrt`.

    out_atol, grad_atol: where the output or a gradient is a small difference of large
    terms (the cross-entropy of a confident, correct prediction: lse - logit, and p - 1 for
    its target), their rounding in torch as here, as absolute allowances on top of the
    relative tolerance. (The finite differences need none: their error model includes it.)
    Returns the finite differences' closest call, error / tolerance (<= 1)."""
    out, cache = forward(**inputs)
    rng = _rng(seed + 1)
    dout = rng.standard_normal(np.shape(out))
    ours = backward(dout, cache)
    # oracle 1: torch autograd on the same float64 inputs
    ref_out, ref_grads = torch_grads(ref, inputs, dout)
    _close(out, ref_out, torch_rtol, out_atol, "forward")
    for k in wrt:
        _close(ours[k], ref_grads[k], torch_rtol, grad_atol, f"d{k} vs torch")
    # oracle 2: finite differences, no torch involved
    closest = 0.0
    for k in (fd_wrt if fd_wrt is not None else wrt):
        def f(x, k=k):
            return forward(**{**inputs, k: x})[0]

        closest = max(closest, assert_fd_close(f, inputs[k], dout, ours[k], n_probe=n_probe,
                                               rng=rng, name=f"d{k}"))
    return closest


def _close(got, want, rtol, atol, name):
    if not atol:
        return assert_close(got, want, rtol, name)
    err = np.max(np.abs(np.asarray(got, dtype=np.float64) - want))
    assert err <= rtol * np.max(np.abs(want)) + atol, \
        f"{name}: error {err:.3e} > {rtol:.0e} relative + {atol:.1e}"


shapes = st.fixed_dictionaries(dict(
    B=st.integers(1, 3), T=st.integers(1, 6), C=st.integers(1, 8), seed=st.integers(0, 2**31 - 1)))


@given(shapes, st.integers(2, 20), st.integers(0, 4))
def test_embedding(s, V, extra_positions):
    rng = _rng(s["seed"])
    B, T, C = s["B"], s["T"], s["C"]
    idx = rng.integers(0, V, size=(B, T))  # repeated ids are likely: the scatter-add must sum them
    inputs = dict(idx=idx, wte=rng.standard_normal((V, C)), wpe=rng.standard_normal((T + extra_positions, C)))

    def backward(dx, cache):
        dwte, dwpe = L.embedding_backward(dx, cache)
        return dict(wte=dwte, wpe=dwpe)

    check_layer(L.embedding_forward, backward, R.ref_embedding, inputs, ["wte", "wpe"], seed=s["seed"])


@given(shapes, st.floats(0.01, 100.0))
def test_layernorm(s, scale):
    rng = _rng(s["seed"])
    # C >= 3: with C = 2 the normalised output is +-1 whatever x is, so the true dx is ~0
    # (it only flows through eps) and a relative comparison would measure round-off alone
    B, T, C = s["B"], s["T"], s["C"] + 2
    inputs = dict(x=scale * rng.standard_normal((B, T, C)) + rng.standard_normal(),
                  weight=rng.standard_normal(C), bias=rng.standard_normal(C))

    def backward(dout, cache):
        dx, dw, db = L.layernorm_backward(dout, cache)
        return dict(x=dx, weight=dw, bias=db)

    check_layer(L.layernorm_forward, backward, R.ref_layernorm, inputs, ["x", "weight", "bias"],
                seed=s["seed"])


@given(shapes, st.integers(1, 9))
def test_linear(s, OC):
    rng = _rng(s["seed"])
    B, T, C = s["B"], s["T"], s["C"]
    inputs = dict(x=rng.standard_normal((B, T, C)), weight=rng.standard_normal((C, OC)),
                  bias=rng.standard_normal(OC))

    def backward(dout, cache):
        dx, dw, db = L.linear_backward(dout, cache)
        return dict(x=dx, weight=dw, bias=db)

    check_layer(L.linear_forward, backward, R.ref_linear, inputs, ["x", "weight", "bias"], seed=s["seed"])


@given(st.integers(1, 3), st.integers(1, 7), st.integers(1, 3), st.integers(1, 4),
       st.floats(0.1, 3.0), st.integers(0, 2**31 - 1))
def test_attention(B, T, n_head, hs, scale, seed):
    rng = _rng(seed)
    C = n_head * hs
    inputs = dict(qkv=scale * rng.standard_normal((B, T, 3 * C)), n_head=n_head)

    def backward(dy, cache):
        return dict(qkv=L.attention_backward(dy, cache))

    check_layer(L.attention_forward, backward, R.ref_attention, inputs, ["qkv"], seed=seed)


@given(shapes, st.floats(0.1, 30.0))
def test_gelu(s, scale):
    """torch's tanh form 0.5 * x * (1 + tanh(u)) cancels where tanh(u) ~ -1 (x < -4): one ulp
    of (1 + tanh u) is an absolute error of ~|x| * 1e-16 in its result (ours, x * sigmoid(2u),
    does not cancel), so errors are measured against the size of the terms before
    cancellation, not of the tiny result."""
    from gpt2np.layers import _GELU_K

    rng = _rng(s["seed"])
    x = scale * rng.standard_normal((s["B"], s["T"], s["C"]))
    dout = rng.standard_normal(x.shape)
    out, cache = L.gelu_forward(x)
    dx = L.gelu_backward(dout, cache)
    ref_out, ref_grads = torch_grads(R.ref_gelu, dict(x=x), dout)
    # terms before cancellation: forward 0.5 * |x| * (1 + |tanh|) <= |x|;
    # backward |dout| * (0.5 * (1 + |t|) + 0.5 * |x| * (1 + t^2) * du) <= |dout| * (1 + |x| * du)
    fwd_scale = max(np.abs(ref_out).max(), np.abs(x).max())
    bwd_scale = max(np.abs(ref_grads["x"]).max(),
                    np.abs(dout * (1 + np.abs(x) * _GELU_K * (1 + 3 * 0.044715 * x * x))).max())
    assert np.abs(out - ref_out).max() <= TORCH_RTOL * fwd_scale, "forward vs torch"
    assert np.abs(dx - ref_grads["x"]).max() <= TORCH_RTOL * bwd_scale, "dx vs torch"
    assert_fd_close(lambda xx: L.gelu_forward(xx)[0], x, dout, dx, n_probe=40, rng=rng,
                    name="gelu dx")
    # where nothing cancels (x > -2), the plain relative comparison must hold as for any layer
    keep = x > -2
    if keep.any():
        assert_close(out[keep], ref_out[keep], TORCH_RTOL, "forward (x > -2)")
        assert_close(dx[keep], ref_grads["x"][keep], TORCH_RTOL, "dx (x > -2)")


@given(shapes, st.integers(1, 9))
def test_gelu_with_bias_is_gelu_of_the_sum(s, OC):
    """gelu_forward(x, bias): the GELU of x + bias (the fused kernel's signature), and its
    backward the gradient with respect to that sum, so also to x and (summed) to bias."""
    rng = _rng(s["seed"])
    x = rng.standard_normal((s["B"], s["T"], OC))
    bias = rng.standard_normal(OC)
    x0 = x.copy()
    out, cache = L.gelu_forward(x, bias)
    ref, ref_cache = L.gelu_forward(x + bias)
    np.testing.assert_array_equal(out, ref)
    np.testing.assert_array_equal(x, x0)  # the caller's x is left alone
    dout = rng.standard_normal(out.shape)
    np.testing.assert_array_equal(L.gelu_backward(dout, cache), L.gelu_backward(dout, ref_cache))


def test_gelu_float32_keeps_its_relative_precision_in_the_negative_tail():
    """Computed as x * s, s = 1 / (1 + exp(-2u)), GELU has no cancellation: in float32 its
    value and derivative keep a relative error within the rounding of u's chain (5 roundings,
    magnified |2u| times by the exp, |2u| < 88 before exp(-2u) overflows) plus a few ulps of
    exp, the reciprocal and the products: (5 |2u| + 8) eps. The tanh form's 1 + tanh(u)
    loses every digit there (x = -5: 30% off, x = -6: 0 returned)."""
    from gpt2np.layers import _GELU_K

    x64 = -np.linspace(2.0, 10.0, 81)
    eps = np.finfo(np.float32).eps
    u = _GELU_K * (x64 + 0.044715 * x64 ** 3)
    tol = (5 * np.abs(2 * u) + 8) * eps
    out64, cache64 = L.gelu_forward(x64)  # float64: relative error ~1e-15 here (no cancellation)
    out32, cache32 = L.gelu_forward(x64.astype(np.float32))
    d64 = L.gelu_backward(np.ones_like(x64), cache64)
    d32 = L.gelu_backward(np.ones(x64.shape, np.float32), cache32)
    assert out32.dtype == d32.dtype == np.float32
    assert np.all(np.abs(out32 - out64) <= tol * np.abs(out64)), "forward"
    assert np.all(np.abs(d32 - d64) <= tol * np.abs(d64)), "backward"


def test_gelu_backward_is_finite_for_huge_inputs():
    # exp(-2u) overflows to inf for x < -10 in float32 (then s = 0), and 1/cosh^2 would here
    x = np.array([-1e4, -50.0, 0.0, 50.0, 1e4], dtype=np.float32)
    out, cache = L.gelu_forward(x)
    dx = L.gelu_backward(np.ones_like(x), cache)
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(dx))
    np.testing.assert_allclose(dx, [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    assert out.dtype == dx.dtype == np.float32


@given(shapes, st.integers(2, 30), st.floats(0.1, 20.0), st.booleans())
def test_cross_entropy(s, V, scale, with_ignored):
    rng = _rng(s["seed"])
    B, T = s["B"], s["T"]
    targets = rng.integers(0, V, size=(B, T))
    if with_ignored:
        targets[rng.random((B, T)) < 0.3] = -1
        targets.reshape(-1)[0] = 0  # keep at least one counted token
    inputs = dict(logits=scale * rng.standard_normal((B, T, V)), targets=targets)

    def backward(dloss, cache):
        return dict(logits=L.cross_entropy_backward(float(dloss), cache))

    # the loss is lse - logit[target], terms of size ~scale: when it is tiny (a confident,
    # correct prediction) its rounding is ~eps * scale, in torch as here, and the target's
    # p - 1 rounds by ~eps: allow ~10x those
    check_layer(L.cross_entropy_forward, backward, R.ref_cross_entropy, inputs, ["logits"],
                seed=s["seed"], out_atol=2e-15 * (1.0 + scale), grad_atol=2e-15)


def test_cross_entropy_ignored_rows_get_zero_gradient():
    rng = _rng(3)
    logits = rng.standard_normal((2, 3, 5))
    targets = np.array([[1, -1, 2], [-1, -1, 4]])
    loss, cache = L.cross_entropy_forward(logits, targets)
    dlogits = L.cross_entropy_backward(1.0, cache)
    assert np.all(dlogits[targets == -1] == 0)
    assert np.all(dlogits[targets != -1].sum(-1) < 1e-12)  # softmax - onehot sums to 0 per row


@given(shapes, st.integers(2, 12))
def test_lm_head(s, V):
    rng = _rng(s["seed"])
    inputs = dict(x=rng.standard_normal((s["B"], s["T"], s["C"])), wte=rng.standard_normal((V, s["C"])))

    def backward(dlogits, cache):
        dx, dwte = L.lm_head_backward(dlogits, cache)
        return dict(x=dx, wte=dwte)

    check_layer(L.lm_head_forward, backward, lambda x, wte: x @ wte.T, inputs, ["x", "wte"], seed=s["seed"])


@given(st.integers(1, 2), st.integers(1, 5), st.integers(1, 3), st.integers(3, 4), st.integers(0, 2**31 - 1))
@example(2, 4, 1, 3, 6250548)  # dx 1.08e-6 off its central differences: a fixed 1e-6 failed it
def test_block(B, T, n_head, hs, seed):
    """The whole pre-norm block (LN, attention, residual, LN, MLP, residual); C >= 3 as in
    test_layernorm."""
    import torch

    from gpt2np.config import GPTConfig

    rng = _rng(seed)
    C = n_head * hs
    cfg = GPTConfig(block_size=8, vocab_size=4, n_layer=1, n_head=n_head, n_embd=C)
    block = R.Block(cfg).double()
    p = {k: rng.standard_normal(tuple(v.shape)) * (0.5 if k.endswith("weight") else 0.1)
         for k, v in block.named_parameters()}
    with torch.no_grad():
        for k, v in block.named_parameters():
            v.copy_(torch.from_numpy(p[k]))
    x = rng.standard_normal((B, T, C))
    ops = L.REFERENCE_OPS
    out, cache = block_forward(ops, x, p, n_head)
    dout = rng.standard_normal(out.shape)
    dx, g = block_backward(ops, dout, cache)

    xt = torch.from_numpy(x).requires_grad_(True)
    ref = block(xt)
    (ref * torch.from_numpy(dout)).sum().backward()
    assert_close(out, ref.detach().numpy(), TORCH_RTOL, "block forward")
    assert_close(dx, xt.grad.numpy(), TORCH_RTOL, "block dx")
    assert set(g) == set(p)
    for k, v in block.named_parameters():
        assert_close(g[k], v.grad.numpy(), TORCH_RTOL, f"block d{k}")

    def f(xx):
        return block_forward(ops, xx, p, n_head)[0]

    assert_fd_close(f, x, dout, dx, n_probe=20, rng=rng, name="block dx")
