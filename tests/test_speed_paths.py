"""The speed paths stay correct: buffers reused across training steps, in-place work that
never touches the caller's arrays, float32 kept float32, blocked cross-entropy. No timings
here (benchmarks are examples/bench.py)."""
import os

import numpy as np
import pytest

from gpt2np import GPT, AdamW, GPTConfig
from gpt2np import layers as L
from gpt2np.model import block_backward, block_forward

CFG = GPTConfig(block_size=16, vocab_size=97, n_layer=2, n_head=2, n_embd=8)


def _batch(rng, B, T, V=CFG.vocab_size):
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def _fresh_grads(model, idx, targets):
    """Gradients from a new model holding a copy of `model`'s params (no reused buffers)."""
    other = GPT(model.config, dtype=model.dtype, params=model.state_dict())
    _, loss = other.forward(idx, targets)
    return float(loss), {k: v.copy() for k, v in other.backward().items()}


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_reused_buffers_give_the_same_grads_as_a_fresh_model(dtype):
    rng = np.random.default_rng(0)
    model = GPT(CFG, dtype=dtype, seed=1)
    opt = AdamW(model.params, lr=1e-2)
    # steps of changing shapes: the buffers are remade when (B, T) changes, reused otherwise
    for B, T in [(2, 5), (2, 5), (3, 16), (1, 1), (3, 16)]:
        idx, targets = _batch(rng, B, T)
        ref_loss, ref = _fresh_grads(model, idx, targets)
        logits, loss = model.forward(idx, targets)
        logits_before = logits.copy()
        grads = model.backward()
        assert float(loss) == ref_loss
        for k in ref:
            np.testing.assert_array_equal(grads[k], ref[k], err_msg=k)
        np.testing.assert_array_equal(logits, logits_before)  # backward leaves logits alone
        opt.step(grads)


def test_inference_keeps_nothing_and_returns_its_own_logits():
    rng = np.random.default_rng(1)
    model = GPT(CFG, seed=2)
    idx, targets = _batch(rng, 2, 6)
    logits_inf, loss = model.forward(idx)
    assert loss is None and model._cache is None
    kept = logits_inf.copy()
    model.forward(idx[:, ::-1].copy(), targets)  # a training step must not write into it
    model.backward()
    np.testing.assert_array_equal(logits_inf, kept)
    with pytest.raises(RuntimeError):
        model.forward(idx)
        model.backward()


def test_training_logits_match_inference_logits():
    rng = np.random.default_rng(2)
    model = GPT(CFG, seed=3)
    idx, targets = _batch(rng, 2, 7)
    a, _ = model.forward(idx)
    b, _ = model.forward(idx, targets)
    np.testing.assert_array_equal(a, b)


def test_float32_stays_float32_everywhere():
    """A float64 scalar anywhere (np.sqrt(2/np.pi), np.float64(1e-5)) would promote."""
    rng = np.random.default_rng(3)
    model = GPT(CFG, seed=4)
    idx, targets = _batch(rng, 2, 9)
    logits, loss = model.forward(idx, targets)
    assert logits.dtype == np.float32 and loss.dtype == np.float32

    def arrays(obj):
        if isinstance(obj, np.ndarray):
            yield obj
        elif isinstance(obj, (tuple, list)):
            for o in obj:
                yield from arrays(o)
        elif isinstance(obj, dict):
            for o in obj.values():
                yield from arrays(o)

    floats = [a for a in arrays(model._cache) if a.dtype.kind == "f"]
    assert floats and all(a.dtype == np.float32 for a in floats)
    grads = model.backward()
    assert all(g.dtype == np.float32 for g in grads.values())
    opt = AdamW(model.params)
    opt.step(grads)
    assert all(p.dtype == np.float32 for p in model.params.values())
    assert all(m.dtype == np.float32 for m in opt.m.values())


def _copy(obj):
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in obj.items()}


def test_layers_do_not_modify_their_inputs():
    """In-place work happens on arrays a layer made itself, never on what it was handed."""
    rng = np.random.default_rng(4)
    B, T, C, NH = 2, 5, 6, 2
    x = rng.standard_normal((B, T, C))
    p = {"ln_1.weight": rng.standard_normal(C), "ln_1.bias": rng.standard_normal(C),
         "ln_2.weight": rng.standard_normal(C), "ln_2.bias": rng.standard_normal(C),
         "attn.c_attn.weight": rng.standard_normal((C, 3 * C)) * 0.3,
         "attn.c_attn.bias": rng.standard_normal(3 * C),
         "attn.c_proj.weight": rng.standard_normal((C, C)) * 0.3, "attn.c_proj.bias": rng.standard_normal(C),
         "mlp.c_fc.weight": rng.standard_normal((C, 4 * C)) * 0.3, "mlp.c_fc.bias": rng.standard_normal(4 * C),
         "mlp.c_proj.weight": rng.standard_normal((4 * C, C)) * 0.3, "mlp.c_proj.bias": rng.standard_normal(C)}
    ins = {"x": x.copy(), **_copy(p)}
    ops = L.REFERENCE_OPS
    out, cache = block_forward(ops, x, p, NH)
    dout = rng.standard_normal(out.shape)
    d0 = dout.copy()
    dx1, g1 = block_backward(ops, dout, cache)
    np.testing.assert_array_equal(x, ins["x"])
    np.testing.assert_array_equal(dout, d0)
    for k in p:
        np.testing.assert_array_equal(p[k], ins[k])
    # the cache is intact after a backward: a second backward gives the same answer
    dx2, g2 = block_backward(ops, dout, cache)
    np.testing.assert_array_equal(dx1, dx2)
    for k in g1:
        np.testing.assert_array_equal(g1[k], g2[k])
    # elementwise layers alone, with and without the bias they may add
    for bias in (False, True):
        h = rng.standard_normal((B, T, 4 * C))
        h0 = h.copy()
        out, cache = L.gelu_forward(h, p["mlp.c_fc.bias"] if bias else None)
        dh = rng.standard_normal(h.shape)
        dh0 = dh.copy()
        L.gelu_backward(dh, cache)
        np.testing.assert_array_equal(h, h0)
        np.testing.assert_array_equal(dh, dh0)
        qkv = rng.standard_normal((B, T, 3 * C))
        qkv0 = qkv.copy()
        y, cache = L.attention_forward(qkv, NH, p["attn.c_attn.bias"] if bias else None)
        dy = rng.standard_normal(y.shape)
        dy0 = dy.copy()
        L.attention_backward(dy, cache)
        np.testing.assert_array_equal(qkv, qkv0)
        np.testing.assert_array_equal(dy, dy0)


@pytest.mark.parametrize("block_bytes", [8, 64, 1 << 20])
@pytest.mark.parametrize("with_ignored", [False, True])
def test_blocked_cross_entropy_matches_a_direct_float64_one(monkeypatch, block_bytes, with_ignored):
    """Row blocks of any size (one row, a few rows with a ragged last block, all rows)."""
    monkeypatch.setattr(L, "_CE_BLOCK_BYTES", block_bytes)
    rng = np.random.default_rng(5)
    B, T, V = 3, 7, 11
    logits = rng.standard_normal((B, T, V)) * 5
    targets = rng.integers(0, V, (B, T))
    if with_ignored:
        targets[0, :3] = -1
    out = np.full((B, T, V), np.nan)  # a reused buffer holds garbage: all of it is written
    loss, cache = L.cross_entropy_forward(logits, targets, out=out)
    dlogits = L.cross_entropy_backward(2.0, cache)
    assert dlogits.base is out or dlogits is out or np.shares_memory(dlogits, out)
    lg = logits.reshape(-1, V)
    t = targets.reshape(-1)
    valid = t != -1
    lse = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1)
    ref_loss = (lse - lg[np.arange(len(t)), np.where(valid, t, 0)])[valid].mean()
    sm = np.exp(lg - lse[:, None])
    sm[np.arange(len(t))[valid], t[valid]] -= 1
    ref_d = 2.0 * sm * valid[:, None] / valid.sum()
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-13)
    np.testing.assert_allclose(dlogits.reshape(-1, V), ref_d, rtol=1e-12, atol=1e-15)


def test_cross_entropy_all_ignored_is_nan_with_zero_grad():
    logits = np.random.default_rng(6).standard_normal((1, 3, 5))
    loss, cache = L.cross_entropy_forward(logits, np.full((1, 3), -1))
    assert np.isnan(loss)
    assert np.all(L.cross_entropy_backward(1.0, cache) == 0)


def test_embedding_backward_accumulates_into_a_given_dwte():
    rng = np.random.default_rng(7)
    idx = np.array([[1, 2, 1], [0, 1, 3]])
    wte, wpe = rng.standard_normal((5, 4)), rng.standard_normal((6, 4))
    _, cache = L.embedding_forward(idx, wte, wpe)
    dx = rng.standard_normal((2, 3, 4))
    base = rng.standard_normal((5, 4))
    acc = base.copy()
    dwte, _ = L.embedding_backward(dx, cache, dwte=acc)
    alone, _ = L.embedding_backward(dx, cache)
    assert dwte is acc
    np.testing.assert_allclose(dwte, base + alone, rtol=1e-14)


def test_lm_head_writes_into_given_buffers():
    rng = np.random.default_rng(8)
    x, wte = rng.standard_normal((2, 3, 4)), rng.standard_normal((9, 4))
    buf = np.empty((2, 3, 9))
    logits, cache = L.lm_head_forward(x, wte, out=buf)
    assert np.shares_memory(logits, buf)
    np.testing.assert_allclose(logits, x @ wte.T, rtol=1e-14)
    dl = rng.standard_normal((2, 3, 9))
    dbuf = np.empty((9, 4))
    dx, dwte = L.lm_head_backward(dl, cache, dwte=dbuf)
    assert dwte is dbuf
    np.testing.assert_allclose(dwte, dl.reshape(-1, 9).T @ x.reshape(-1, 4), rtol=1e-13)
    np.testing.assert_allclose(dx, dl @ wte, rtol=1e-13)


def test_adamw_scratch_is_shared_but_params_are_independent():
    """One flat scratch array serves every param: no param may see another's numbers."""
    rng = np.random.default_rng(9)
    params = {"big": rng.standard_normal((6, 5)), "small": rng.standard_normal(3)}
    twins = {k: {k: v.copy()} for k, v in params.items()}  # each param alone in an optimizer
    opt = AdamW(params, lr=1e-2)
    solo = {k: AdamW(twins[k], lr=1e-2) for k in params}
    for _ in range(3):
        grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        opt.step(grads)
        for k in params:
            solo[k].step({k: grads[k]})
    for k in params:
        np.testing.assert_array_equal(params[k], twins[k][k])


def test_adamw_blocks_and_non_contiguous_params(monkeypatch):
    """The CPU update walks flat blocks (ragged last block here); a non-contiguous param,
    where a flat view would be a copy, is updated whole and still in place."""
    from gpt2np import optim

    monkeypatch.setattr(optim, "_ADAM_BLOCK", 7)
    rng = np.random.default_rng(10)
    base = rng.standard_normal((6, 8))
    params = {"w": rng.standard_normal((5, 9)), "t": base.T, "b": rng.standard_normal(4)}
    assert not params["t"].flags.c_contiguous
    ref = {k: v.copy() for k, v in params.items()}
    opt, ref_opt = AdamW(params, lr=1e-2), AdamW(ref, lr=1e-2)
    monkeypatch.setattr(optim, "_ADAM_BLOCK", 1 << 30)  # the reference: one block each
    for _ in range(3):
        grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        monkeypatch.setattr(optim, "_ADAM_BLOCK", 7)
        opt.step(grads)
        monkeypatch.setattr(optim, "_ADAM_BLOCK", 1 << 30)
        ref_opt.step(grads)
    for k in params:
        np.testing.assert_array_equal(params[k], ref[k])
    assert params["t"].base is base  # still the caller's array


@pytest.mark.parametrize("block", [1, 3, 4, 64])
def test_attention_in_query_blocks_matches_torch(monkeypatch, block):
    """Query blocks of any size (ragged last one included) give torch's attention and its
    gradient, with the softmax recomputed in the backward."""
    import torch

    from gpt2np.backends.torch_reference import ref_attention

    monkeypatch.setattr(L, "_ATT_BLOCK", block)
    rng = np.random.default_rng(11)
    B, T, NH, hs = 2, 10, 3, 4
    qkv = rng.standard_normal((B, T, 3 * NH * hs)) * 2
    y, cache = L.attention_forward(qkv, NH)
    dy = rng.standard_normal(y.shape)
    dqkv = L.attention_backward(dy, cache)
    tq = torch.from_numpy(qkv).requires_grad_(True)
    ty = ref_attention(tq, NH)
    (ty * torch.from_numpy(dy)).sum().backward()
    from gradcheck import assert_close

    assert_close(y, ty.detach().numpy(), 1e-12, "y")
    assert_close(dqkv, tq.grad.numpy(), 1e-12, "dqkv")


def test_serial_blas_limits_and_restores_the_blas_threads():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from gpt2np.backends.numpy_backend import NumpyBackend

    def blas_threads():  # numpy's own BLAS (torch, imported by other tests, brings its own)
        return [i["num_threads"] for i in threadpoolctl.threadpool_info()
                if i["user_api"] == "blas" and "numpy" in i["filepath"]]

    before = blas_threads()
    with NumpyBackend.serial_blas():
        assert all(n == 1 for n in blas_threads())
    assert blas_threads() == before


def test_numpy_matmul_runs_small_gemms_on_one_blas_thread(monkeypatch):
    """The numpy backend decides by each GEMM's size (of one matrix of a stack) whether it
    runs on one BLAS thread; the result is the reference matmul's either way."""
    import contextlib

    from gpt2np.backends import numpy_backend
    from gpt2np.backends.numpy_backend import NumpyBackend

    serial = []

    @contextlib.contextmanager
    def counting():
        serial.append(True)
        yield

    monkeypatch.setattr(NumpyBackend, "serial_blas", staticmethod(counting))
    monkeypatch.setattr(numpy_backend, "SERIAL_GEMM", 4 * 5 * 6)
    rng = np.random.default_rng(12)
    for a_shape, b_shape, small in [((4, 5), (5, 6), True), ((4, 5), (5, 7), False),
                                    ((9, 4, 5), (9, 5, 6), True), ((2, 4, 6), (2, 6, 6), False)]:
        a, b = rng.standard_normal(a_shape), rng.standard_normal(b_shape)
        serial.clear()
        for precision, dtype in (("fp32", np.float64), ("bf16", np.float32)):
            a_, b_ = a.astype(dtype), b.astype(dtype)
            c = NumpyBackend.matmul(a_, b_, precision=precision)
            np.testing.assert_array_equal(c, L.reference_matmul(a_, b_, precision=precision))
        assert serial == [True, True] if small else not serial, (a_shape, b_shape)


def test_profile_step_accounts_for_the_step(capsys):
    # examples/profile_step.py: every leaf layer timed, and the parts add up to the step
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "profile_step.py"
    spec = importlib.util.spec_from_file_location("profile_step", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from gpt2np import AdamW
    from gpt2np import layers as L

    before = (L.linear_forward, AdamW.step)
    assert mod.main(["--n-layer", "1", "--n-embd", "16", "--n-head", "2", "--vocab-size", "64",
                     "-T", "8", "-B", "2", "--steps", "2", "--precision", "bf16"]) == 0
    assert (L.linear_forward, AdamW.step) == before  # the timers are removed again
    out = capsys.readouterr().out
    rows = {line.split()[0]: float(line.split()[1]) for line in out.splitlines()[2:]
            if line and not line.startswith(("(", "#"))}
    for leaf in mod.LEAVES:
        assert f"{leaf}_forward" in rows and f"{leaf}_backward" in rows, leaf
    assert "adamw" in rows and "bf16" in out.splitlines()[0]
    assert out.splitlines()[-1].startswith("# attention") and "linears" in out.splitlines()[-1]


# ------------------------------------------------------------------------------------------
# the numpy backend's kernels (gpt2np.backends.numpy_kernels) against the reference


@pytest.fixture(params=[1, 3], ids=["1 thread", "3 threads"])
def threads(request, monkeypatch):
    """The kernels on one thread, and on three whatever the machine has (the results must
    not depend on it)."""
    from gpt2np.backends import numpy_kernels as K

    monkeypatch.setattr(K.BLAS, "count", lambda: request.param)
    return request.param


def _f32(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def test_float32_runs_the_cpu_kernels_and_float64_the_reference():
    from gpt2np.backends import get_backend
    from gpt2np.backends import numpy_kernels as K

    be = get_backend("numpy")
    assert be.layer_ops("float32") is K.CPU_OPS and be.adamw_update("float32") is K.adamw_update
    assert be.layer_ops("float64") is L.REFERENCE_OPS and be.adamw_update("float64") is None
    assert GPT(CFG, dtype="float32").ops is K.CPU_OPS


def test_row_kernels_equal_the_reference_bit_for_bit(threads, monkeypatch):
    """GELU and the cross-entropy in many small blocks of rows (a ragged last one), and
    LayerNorm: the reference's numbers exactly, on any number of threads."""
    from gpt2np.backends import numpy_kernels as K

    monkeypatch.setattr(K, "ROW_BLOCK_BYTES", 3 * 40 * 4)  # 3 rows of 40 floats per block
    monkeypatch.setattr(L, "_CE_BLOCK_BYTES", 2 * 50 * 4)
    rng = np.random.default_rng(20)
    x, b = _f32(rng, 2, 13, 40), _f32(rng, 40)
    for bias in (None, b):
        out, cache = K.gelu_forward(x, bias)
        ref_out, ref_cache = L.gelu_forward(x, bias)
        np.testing.assert_array_equal(out, ref_out)
        for got, want in zip(cache, ref_cache):
            np.testing.assert_array_equal(got, want)
        d = _f32(rng, *x.shape)
        np.testing.assert_array_equal(K.gelu_backward(d, cache), L.gelu_backward(d, ref_cache))
    w = _f32(rng, 40)
    for rows in (x * 3 + 1, x[:1, :2] * 3 + 1):  # many rows (the reference); generation's
        out, cache = K.layernorm_forward(rows, w, b)
        ref_out, ref_cache = L.layernorm_forward(rows, w, b)
        np.testing.assert_array_equal(out, ref_out)
        np.testing.assert_array_equal(cache[0], ref_cache[0])
        np.testing.assert_array_equal(cache[1], ref_cache[1])
    logits, targets = _f32(rng, 3, 7, 50, scale=4), rng.integers(0, 50, (3, 7))
    targets[0, :2] = -1
    loss, cache = K.cross_entropy_forward(logits, targets)
    ref_loss, ref_cache = L.cross_entropy_forward(logits, targets)
    assert loss == ref_loss
    np.testing.assert_array_equal(cache[0], ref_cache[0])
    np.testing.assert_array_equal(L.cross_entropy_backward(1.0, cache),
                                  L.cross_entropy_backward(1.0, ref_cache))
    rows, t = logits.reshape(-1, 50), targets.reshape(-1) % 50
    losses = K.cross_entropy_losses(rows, t)
    np.testing.assert_array_equal(losses, L.cross_entropy_losses(rows, t))
    lg = rows.astype(np.float64)
    direct = np.log(np.exp(lg).sum(-1)) - lg[np.arange(len(t)), t]
    assert losses.dtype == np.float64
    np.testing.assert_allclose(losses, direct, rtol=1e-6)


@pytest.mark.parametrize("att_block, task_bytes", [(1, 1), (3, 1), (4, 10 ** 6), (128, 1 << 18)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_attention_kernel_matches_torch(threads, monkeypatch, att_block, task_bytes, with_bias):
    """The CPU attention (heads grouped per task, whole batches of heads or single heads,
    query blocks of any size) gives torch's attention and gradient in float64."""
    import torch

    from gpt2np.backends import numpy_kernels as K
    from gpt2np.backends.torch_reference import ref_attention
    from gradcheck import assert_close

    monkeypatch.setattr(K, "ATT_BLOCK", att_block)
    monkeypatch.setattr(K, "ATT_TASK_BYTES", task_bytes)
    rng = np.random.default_rng(22)
    B, T, NH, hs = 3, 10, 2, 4
    qkv = rng.standard_normal((B, T, 3 * NH * hs)) * 2
    bias = rng.standard_normal(3 * NH * hs) if with_bias else None
    y, cache = K.attention_forward(qkv, NH, bias)
    dy = rng.standard_normal(y.shape)
    dqkv = K.attention_backward(dy, cache)
    tq = torch.from_numpy(qkv + (0 if bias is None else bias)).requires_grad_(True)
    ty = ref_attention(tq, NH)
    (ty * torch.from_numpy(dy)).sum().backward()
    assert_close(y, ty.detach().numpy(), 1e-12, "y")
    assert_close(dqkv, tq.grad.numpy(), 1e-12, "dqkv")


def test_attention_kernel_is_the_reference_to_float32_rounding_and_leaves_its_inputs(threads):
    from gpt2np.backends import numpy_kernels as K

    rng = np.random.default_rng(23)
    qkv, bias = _f32(rng, 2, 300, 3 * 4 * 16), _f32(rng, 3 * 4 * 16)
    dy = _f32(rng, 2, 300, 4 * 16)
    qkv0, dy0 = qkv.copy(), dy.copy()
    y, cache = K.attention_forward(qkv, 4, bias)
    dqkv = K.attention_backward(dy, cache)
    ref_y, ref_cache = L.attention_forward(qkv, 4, bias)
    ref_dqkv = L.attention_backward(dy, ref_cache)
    assert y.dtype == dqkv.dtype == np.float32
    np.testing.assert_allclose(y, ref_y, rtol=0, atol=1e-5 * np.abs(ref_y).max())
    np.testing.assert_allclose(dqkv, ref_dqkv, rtol=0, atol=1e-5 * np.abs(ref_dqkv).max())
    np.testing.assert_array_equal(qkv, qkv0)
    np.testing.assert_array_equal(dy, dy0)
    # a second backward from the same cache gives the same answer
    np.testing.assert_array_equal(K.attention_backward(dy, cache), dqkv)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_attention_kernel_past_its_fused_stabiliser(threads, monkeypatch, dtype):
    """A query whose score with an earlier key exceeds its own by more than exp's range
    (the fused blocks' stabiliser is the query's own score): its block is done the exact
    way, and the result is torch's (float64) or the reference's (float32), all finite."""
    import torch

    from gpt2np.backends import numpy_kernels as K
    from gpt2np.backends.torch_reference import ref_attention
    from gradcheck import assert_close

    exact = []
    monkeypatch.setattr(K, "_block_forward_exact",
                        lambda *a, f=K._block_forward_exact: exact.append(a[-2]) or f(*a))
    monkeypatch.setattr(K, "ATT_BLOCK", 4)
    rng = np.random.default_rng(29)
    B, T, NH, hs = 1, 9, 2, 4
    qkv = rng.standard_normal((B, T, 3, NH, hs))
    big = 60.0 if dtype == np.float64 else 12.0  # scores of +-big^2/2 apart: past 709 / 88
    qkv[0, 5, 0, 1] = [big, 0, 0, 0]  # query 5 of head 1,
    qkv[0, 2, 1, 1] = [big, 0, 0, 0]  # key 2 (an earlier block),
    qkv[0, 5, 1, 1] = [-big, 0, 0, 0]  # and its own key
    qkv = qkv.reshape(B, T, -1).astype(dtype)
    y, cache = K.attention_forward(qkv, NH)
    dy = rng.standard_normal(y.shape).astype(dtype)
    dqkv = K.attention_backward(dy, cache)
    assert exact == [4]  # the block of queries 4..7, and no other
    assert np.isfinite(y).all() and np.isfinite(dqkv).all()
    if dtype == np.float64:
        tq = torch.from_numpy(qkv).requires_grad_(True)
        ty = ref_attention(tq, NH)
        (ty * torch.from_numpy(dy)).sum().backward()
        assert_close(y, ty.detach().numpy(), 1e-12, "y")
        assert_close(dqkv, tq.grad.numpy(), 1e-12, "dqkv")
    else:
        ref_y, ref_cache = L.attention_forward(qkv, NH)
        ref_dqkv = L.attention_backward(dy, ref_cache)
        np.testing.assert_allclose(y, ref_y, rtol=0, atol=1e-5 * np.abs(ref_y).max())
        np.testing.assert_allclose(dqkv, ref_dqkv, rtol=0, atol=1e-5 * np.abs(ref_dqkv).max())


@pytest.mark.parametrize("shapes", [((300, 70), (70, 500)), ((700, 70), (70, 90)),
                                    ((3, 200, 70), (70, 150)), ((2, 90, 70), (2, 70, 120))],
                         ids=["columns", "rows", "a stack", "two stacks"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_threaded_matmul_is_the_product_and_independent_of_threads(monkeypatch, shapes, dtype):
    """A big product in pieces on the threads: within the float rounding of a K-term dot
    product of the BLAS's own (|error| <= K eps (|a| @ |b|)), whatever the threads, also
    for transposed views, into out=, and in emulated bf16."""
    from gpt2np.backends import numpy_backend as NB
    from gpt2np.backends import numpy_kernels as K

    monkeypatch.setattr(K, "GEMM_PIECE", 1 << 12)  # a few dozen pieces
    rng = np.random.default_rng(30)
    (sa, sb) = shapes
    a, b = rng.standard_normal(sa).astype(dtype), rng.standard_normal(sb).astype(dtype)
    runs = []
    for n in (1, 3):
        monkeypatch.setattr(K.BLAS, "count", lambda n=n: n)
        runs.append(K.threaded_matmul(a, b))
    np.testing.assert_array_equal(runs[0], runs[1])
    K_ = a.shape[-1]
    bound = K_ * np.finfo(dtype).eps * (np.abs(a) @ np.abs(b))
    assert np.all(np.abs(runs[0] - a @ b) <= bound)
    bt = np.ascontiguousarray(np.swapaxes(b, -1, -2))
    out = np.empty_like(runs[0])
    assert K.threaded_matmul(a, np.swapaxes(bt, -1, -2), out=out) is out
    assert np.all(np.abs(out - a @ b) <= bound)
    if dtype == np.float32:
        want = L.reference_matmul(a, b, precision="bf16")
        got = K.threaded_matmul(a, b, precision="bf16")
        assert np.all(np.abs(got - want) <= 2 * K_ * np.finfo(dtype).eps * (np.abs(a) @ np.abs(b)))
    # the backend sends products over SERIAL_GEMM multiply-adds there, and no smaller ones
    calls = []
    monkeypatch.setattr(K, "threaded_matmul", lambda *x, **kw: calls.append(x[0].shape))
    monkeypatch.setattr(NB, "SERIAL_GEMM", a.shape[-1] * b.shape[-1])  # m = 1's count
    NB.NumpyBackend.matmul(a, b)
    NB.NumpyBackend.matmul(a[..., :1, :], b)
    assert calls == [a.shape]


def test_the_numpy_backend_keeps_freed_memory_where_malloc_is_glibc():
    """Its import sets glibc's malloc to keep freed memory (numpy_kernels.keep_freed_memory)
    unless GPT2NP_DEFAULT_MALLOC=1; elsewhere it leaves the C library alone."""
    import platform
    import subprocess
    import sys

    code = ("import gpt2np.backends.numpy_backend as NB, gpt2np.backends.numpy_kernels as K; "
            "print(K.keep_freed_memory())")
    glibc = platform.libc_ver()[0] == "glibc"
    for env, want in (({}, str(glibc)), ({"GPT2NP_DEFAULT_MALLOC": "1"}, "False")):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                             env={**os.environ, **env}, check=True).stdout.strip()
        assert out == want


def test_kernels_do_not_depend_on_the_thread_count(monkeypatch):
    """The pieces are fixed by sizes, so one thread and five give the same bits."""
    from gpt2np.backends import numpy_kernels as K

    rng = np.random.default_rng(24)
    qkv, dy = _f32(rng, 2, 70, 3 * 4 * 8), _f32(rng, 2, 70, 4 * 8)
    x, w = _f32(rng, 60, 700), _f32(rng, 700, 3000)
    runs = []
    for n in (1, 5):
        monkeypatch.setattr(K.BLAS, "count", lambda n=n: n)
        y, cache = K.attention_forward(qkv, 4)
        runs.append((y, K.attention_backward(dy, cache), K.gelu_forward(x)[0],
                     K.streamed_matmul(x[:3], w), K.threaded_matmul(x, w)))
    for got, want in zip(*runs):
        np.testing.assert_array_equal(got, want)


def test_streamed_matmul_for_few_rows_and_big_matrices(threads, monkeypatch):
    from gpt2np.backends import numpy_backend as NB
    from gpt2np.backends import numpy_kernels as K

    rng = np.random.default_rng(25)
    w, wte = _f32(rng, 96, 1000), _f32(rng, 777, 96)
    x = _f32(rng, 2, 96)
    for b in (w, wte.T):  # a weight, and the tied lm_head's transposed view
        for precision in ("fp32", "bf16"):
            monkeypatch.setattr(K, "STREAM_SLICE_BYTES", 96 * 4 * 64)  # 64 columns a slice
            got = K.streamed_matmul(x, b, precision=precision)
            want = L.reference_matmul(x, b, precision=precision)
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
            out = np.empty_like(want)
            assert K.streamed_matmul(x, b, out=out, precision=precision) is out
    # the backend sends few rows times a big matrix there, and nothing else
    calls = []
    monkeypatch.setattr(K, "streamed_matmul", lambda *a, **k: calls.append(a[0].shape))
    monkeypatch.setattr(NB, "STREAM_BYTES", 96 * 1000 * 4)
    NB.NumpyBackend.matmul(x, w)
    NB.NumpyBackend.matmul(_f32(rng, NB.STREAM_ROWS + 1, 96), w)
    NB.NumpyBackend.matmul(x, w[:, :999])
    assert calls == [(2, 96)]


def test_threads_carry_the_matmul_precision_and_raise_errors(monkeypatch):
    from gpt2np.backends import get_backend
    from gpt2np.backends import numpy_kernels as K

    monkeypatch.setattr(K.BLAS, "count", lambda: 3)
    be = get_backend("numpy")
    rng = np.random.default_rng(26)
    qkv = _f32(rng, 2, 40, 3 * 4 * 8)
    with L.matmul_precision("bf16", be):  # every thread rounds the operands
        y, _ = K.attention_forward(qkv, 4)
        seen = []
        K.THREADS.run(lambda i: seen.append(L.get_matmul_precision()), range(8))
    monkeypatch.setattr(K.BLAS, "count", lambda: 1)
    with L.matmul_precision("bf16", be):
        y1, _ = K.attention_forward(qkv, 4)
    np.testing.assert_array_equal(y, y1)
    assert seen == ["bf16"] * 8

    def fails(i):
        if i == 5:
            raise ValueError("task 5")
    monkeypatch.setattr(K.BLAS, "count", lambda: 3)
    with pytest.raises(ValueError, match="task 5"):
        K.THREADS.run(fails, range(8))


@pytest.mark.parametrize("block", [7, 1 << 16])
def test_adamw_kernel_is_the_reference_update_bit_for_bit(threads, monkeypatch, block):
    """numpy_kernels.adamw_update (float32: what AdamW runs on the numpy backend) against
    gpt2np.optim's own update, several steps, decayed and not, blocks of any size."""
    from gpt2np.backends import numpy_kernels as K

    monkeypatch.setattr(K, "ADAM_BLOCK", block)
    rng = np.random.default_rng(27)
    params = {"w": _f32(rng, 13, 9), "b": _f32(rng, 9), "e": _f32(rng, 50, 3)}
    ref = {k: v.copy() for k, v in params.items()}
    opt = AdamW(params, lr=1e-2, weight_decay=0.1)
    ref_opt = AdamW(ref, lr=1e-2, weight_decay=0.1)
    assert opt.fused_update is K.adamw_update
    ref_opt.fused_update = None  # gpt2np.optim's per-tensor update
    for _ in range(4):
        grads = {k: _f32(rng, *v.shape) for k, v in params.items()}
        opt.step(grads, lr=3e-3)
        ref_opt.step(grads, lr=3e-3)
        for k in params:
            np.testing.assert_array_equal(params[k], ref[k], err_msg=k)
            np.testing.assert_array_equal(opt.m[k], ref_opt.m[k])
            np.testing.assert_array_equal(opt.v[k], ref_opt.v[k])


def test_float32_model_on_the_kernels_matches_the_reference_layers():
    """A whole float32 step, forward and backward, on numpy's kernels and on the reference
    layers: the same loss and gradients to float32 rounding."""
    rng = np.random.default_rng(28)
    cfg = GPTConfig(block_size=64, vocab_size=97, n_layer=2, n_head=4, n_embd=32)
    model = GPT(cfg, seed=5)
    ref = GPT(cfg, seed=5)
    ref.ops = L.REFERENCE_OPS
    idx, targets = _batch(rng, 3, 64, 97)
    _, loss = model.forward(idx, targets)
    grads = {k: v.copy() for k, v in model.backward().items()}
    _, ref_loss = ref.forward(idx, targets)
    ref_grads = ref.backward()
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-6)
    for k, g in ref_grads.items():
        np.testing.assert_allclose(grads[k], g, rtol=0, atol=2e-5 * np.abs(g).max(), err_msg=k)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_token_losses_are_the_training_loss_per_token(monkeypatch, dtype):
    """GPT.token_losses: the lm_head only at scored positions, in blocks of rows (as equal
    as can be under the budget), gives the training loss's terms; ignored positions are 0."""
    import dataclasses

    from gpt2np import model as M

    monkeypatch.setattr(M, "LOSS_LOGITS_BYTES", 7 * CFG.vocab_size * 8)
    rng = np.random.default_rng(29)
    model = GPT(CFG, dtype=dtype, seed=6)
    idx, targets = _batch(rng, 3, 11)
    targets[1, 4:] = -1
    blocks, lm_head = [], model.ops.lm_head_forward

    def counted(x, wte, out=None):
        blocks.append(x.shape[0])
        return lm_head(x, wte, out=out)

    model.ops = dataclasses.replace(model.ops, lm_head_forward=counted)
    losses = model.token_losses(idx, targets)
    # 26 scored rows, at most 14 (float32) or 7 (float64) a block
    assert blocks == ([13, 13] if dtype == "float32" else [7, 7, 7, 5])
    assert losses.shape == (3, 11) and losses.dtype == np.float64
    assert (losses[1, 4:] == 0).all() and (losses[targets != -1] > 0).all()
    _, loss = model.forward(idx, targets)
    rel = 1e-12 if dtype == "float64" else 1e-6
    assert losses.sum() / (targets != -1).sum() == pytest.approx(float(loss), rel=rel)
    # position by position: the full forward's logits, log-softmaxed in float64
    logits, _ = model.forward(idx)
    lg = logits.astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    b, t = np.nonzero(targets != -1)
    np.testing.assert_allclose(losses[b, t], lse[b, t] - lg[b, t, targets[b, t]],
                               rtol=rel, atol=rel)
    with pytest.raises(ValueError, match="targets"):
        model.token_losses(idx, None)


def test_batched_finite_differences_equal_one_perturbation_at_a_time(monkeypatch):
    """gradcheck stacks the perturbations of a block's tensors after that block: the same
    entries and the same losses as one whole forward per perturbation."""
    from gpt2np.evals import gradcheck as G

    cfg = GPTConfig(block_size=16, vocab_size=61, n_layer=3, n_head=2, n_embd=8)
    model = GPT(cfg, dtype="float64", seed=7)
    rng = np.random.default_rng(30)
    x, y = _batch(rng, 2, 6, 61)
    model.forward(x, y)
    grads = {k: np.array(g) for k, g in model.backward().items()}
    grads["transformer.h.1.attn.c_proj.weight"] *= 1.01  # one wrong gradient
    batched, tol = G.finite_differences(model, x, y, grads, k=3)
    monkeypatch.setattr(G, "FD_BATCH_ROWS", 1)  # one probed entry (its 4 steps) per evaluation
    single, _ = G.finite_differences(model, x, y, grads, k=3)
    f = G._SuffixLoss(model, x, y)
    flat = model.params["transformer.h.2.mlp.c_fc.weight"].reshape(-1)
    before = flat.copy()
    whole = []
    for value in (flat[5] + 1e-3, flat[5] - 1e-3):  # against the model's own forward
        flat[5], old = value, flat[5]
        whole.append(float(model.forward(x, y)[1]))
        flat[5] = old
    np.testing.assert_allclose(f.losses(2, [(flat, 5, before[5] + 1e-3),
                                            (flat, 5, before[5] - 1e-3)]), whole, rtol=1e-13)
    np.testing.assert_array_equal(flat, before)  # every entry restored exactly
    assert list(batched) == list(model.params)
    for k in batched:
        assert abs(batched[k] - single[k]) < 1e-9, k
    bad = "transformer.h.1.attn.c_proj.weight"
    assert batched[bad] > 1e-3 and batched[bad] > tol[bad]
    assert all(batched[k] <= tol[k] for k in batched if k != bad)


def test_decode_tuner_tries_both_threads_each_cycle_and_keeps_the_faster(monkeypatch):
    """numpy_backend.DecodeTuner: TRIAL steps on the kernels' threads, TRIAL on the BLAS's
    (the first of each not counted), then the faster by median, again every cycle; a cycle
    after a clear choice is twice as long (up to LONGEST), after a close one CYCLE again."""
    from gpt2np.backends import numpy_backend as NB

    tuner = NB.DecodeTuner()
    now = [0.0]
    monkeypatch.setattr(tuner, "clock", lambda: now[0])
    cost = {False: 2.0, True: 1.0}  # the BLAS's threads are faster, then slower

    def run(steps, spike=()):
        modes = []
        for i in range(steps):
            with tuner:
                modes.append(tuner.on_blas)
                now[0] += 100.0 if i in spike else cost[tuner.on_blas]
            assert not tuner.on_blas  # only inside a step
        return modes

    T, C = NB.DecodeTuner.TRIAL, NB.DecodeTuner.CYCLE
    trials = [False] * T + [True] * T
    assert run(C) == trials + [True] * (C - 2 * T)
    assert tuner.times == {False: [2.0] * (T - 1), True: [1.0] * (T - 1)}
    cost.update({False: 1.0, True: 3.0})  # 2x faster before: this cycle is 2C long
    assert run(2 * C) == trials + [False] * (2 * C - 2 * T)
    # the first step of a trial is not counted (the threads change over there)
    assert run(4 * C, spike=(0, T)) == trials + [False] * (4 * C - 2 * T)
    assert tuner.times == {False: [1.0] * (T - 1), True: [3.0] * (T - 1)}
    longest = NB.DecodeTuner.LONGEST
    assert longest == 16 * C
    assert run(8 * C) == trials + [False] * (8 * C - 2 * T)
    assert run(longest) == trials + [False] * (longest - 2 * T)  # 16C: the longest
    cost.update({False: 1.1, True: 1.0})  # a close call
    assert run(longest) == trials + [True] * (longest - 2 * T)  # the longest again
    assert run(C + 1) == trials + [True] * (C - 2 * T) + [False]  # C, then trials again


def test_generation_gives_the_same_tokens_on_either_threads(monkeypatch):
    """Greedy generation whose steps run on the kernels' threads, then on the BLAS's, then
    on the faster: the tokens of the full recompute, and the BLAS's thread count restored."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from gpt2np.backends import numpy_backend as NB

    tuner = NB.DecodeTuner()
    monkeypatch.setattr(NB, "DECODING", tuner)
    seen = []
    monkeypatch.setattr(NB.DecodeTuner, "__exit__",
                        lambda self, *e, f=NB.DecodeTuner.__exit__: seen.append(self.on_blas)
                        or f(self, *e))
    cfg = GPTConfig(block_size=64, vocab_size=300, n_layer=2, n_head=4, n_embd=64)
    model = GPT(cfg, seed=3)
    before = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    prompt = np.array([[1, 2, 3], [4, 5, 6]])
    n = 2 * NB.DecodeTuner.TRIAL + 3
    cached = model.generate(prompt, n, temperature=0)
    full = model.generate(prompt, n, temperature=0, use_cache=False)
    np.testing.assert_array_equal(cached, full)
    T = NB.DecodeTuner.TRIAL
    assert seen[:2 * T] == [False] * T + [True] * T and len(seen) == n - 1
    after = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    assert after == before


def test_masked_attention_kernel_is_the_reference_bit_for_bit(threads, monkeypatch):
    """numpy_kernels.masked_attention_forward: the reference on groups of rows (one row a
    task here), with the bias, any mask that lets each query see itself; and the reference
    with a causal mask is the causal attention."""
    from gpt2np.backends import numpy_kernels as K

    monkeypatch.setattr(K, "ATT_TASK_BYTES", 1)
    rng = np.random.default_rng(31)
    B, T, NH, hs = 3, 11, 2, 8
    qkv, bias = _f32(rng, B, T, 3 * NH * hs), _f32(rng, 3 * NH * hs)
    allow = (rng.random((B, 1, T, T)) < 0.5) | np.eye(T, dtype=bool)
    mask = np.where(allow, 0.0, -np.inf).astype(np.float32)
    got = K.masked_attention_forward(qkv, NH, mask, bias)
    np.testing.assert_array_equal(got, L.masked_attention_forward(qkv, NH, mask, bias))
    causal = np.where(np.tril(np.ones((T, T), dtype=bool)), 0.0, -np.inf)
    q64 = qkv.astype(np.float64)
    np.testing.assert_allclose(L.masked_attention_forward(q64, NH, np.broadcast_to(causal, (B, 1, T, T))),
                               L.attention_forward(q64, NH)[0], rtol=0, atol=1e-13)
