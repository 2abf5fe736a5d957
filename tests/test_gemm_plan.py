"""gpt2np.backends.gemm: the mapping of row-major (batched) matmuls onto cuBLAS's column-major GEMM,
checked on the CPU against a numpy model of cublasGemmStridedBatchedEx over raw memory."""
import numpy as np
import pytest

from gpt2np.backends import gemm


def cublas_gemm_strided_batched(call: gemm.GemmCall, mem, a_off, b_off):
    """What cuBLAS computes: for each batch i, C_i = op(A_i) @ op(B_i), every matrix read
    column-major from the flat buffer `mem` at its element offset, ld and batch stride.
    Returns the C_i stacked as column-major (m, n) matrices, i.e. as a row-major (n, m)."""
    def read(off, ld, op, rows, cols, i, stride):
        # op(X) is (rows, cols); X is stored (rows, cols) for N and (cols, rows) for T
        r, c = (rows, cols) if op == gemm.OP_N else (cols, rows)
        base = off + i * stride
        idx = base + np.arange(r)[:, None] + np.arange(c)[None, :] * ld  # column-major
        assert idx.min() >= 0 and idx.max() < mem.size, "cuBLAS would read outside the buffer"
        x = mem[idx]
        return x if op == gemm.OP_N else x.T

    out = []
    for i in range(call.batch):
        A = read(a_off, call.lda, call.transa, call.m, call.k, i, call.stride_a)
        B = read(b_off, call.ldb, call.transb, call.k, call.n, i, call.stride_b)
        out.append((A @ B).T)  # C column-major (m, n) -> row-major (n, m) = (M, N)
    return np.stack(out)


def run_planned(a, b, base):
    """a @ b the way the CuPy backend runs it: plan, or None where it would copy first."""
    la = gemm.operand_layout(a.shape, a.strides, a.itemsize)
    lb = gemm.operand_layout(b.shape, b.strides, b.itemsize)
    if la is None or lb is None:
        return None
    call = gemm.plan(a.shape, la, b.shape, lb)
    off = lambda x: (x.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // x.itemsize  # noqa: E731
    c = cublas_gemm_strided_batched(call, base, off(b), off(a))  # cuBLAS's A is our b
    return c.reshape(a.shape[:-2] + (a.shape[-2], b.shape[-1]))


def _views(base, rng):
    """(a, b) pairs of views into `base`, in the layouts the model makes."""
    def take(shape, offset=0):
        n = int(np.prod(shape))
        return base[offset:offset + n].reshape(shape)

    M, K, N = 5, 7, 3
    yield "contiguous", take((M, K)), take((K, N), 100)
    yield "b transposed (x @ W.T)", take((M, K)), take((N, K), 100).T
    yield "a transposed (x.T @ dout)", take((K, M)).T, take((K, N), 100)
    yield "both transposed", take((K, M)).T, take((N, K), 100).T
    yield "row stride wider than the row", take((M, 2 * K))[:, 3:3 + K], take((K, 3 * N), 200)[:, N:2 * N]
    yield "column vector", take((M, K)), take((K, 1), 100)
    yield "row vector", take((1, K)), take((K, N), 100)
    yield "batched 3-D", take((4, M, K)), take((4, K, N), 300)
    yield "batched, b transposed", take((4, M, K)), take((4, N, K), 300).transpose(0, 2, 1)
    yield "4-D collapsible", take((2, 3, M, K)), take((2, 3, K, N), 400)
    B, T, NH, hs = 2, 6, 2, 4
    qkv = take((B, T, 3 * NH * hs), 600)
    q, k, v = qkv.reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4)
    yield "attention q @ k^T (heads not collapsible: copied)", q, k.transpose(0, 1, 3, 2)
    att = take((B, NH, T, T), 800)
    yield "attention att @ v (v's heads copied)", att, v
    yield "attention att^T @ dy", att.transpose(0, 1, 3, 2), take((B, NH, T, hs), 1000)
    one = take((1, NH, T, hs), 1200)
    yield "batch of 1 with strided heads", one, take((1, NH, hs, T), 1300)


def test_planned_gemm_matches_numpy_matmul_in_every_layout():
    rng = np.random.default_rng(0)
    base = rng.standard_normal(2000)
    planned = 0
    for name, a, b in _views(base, rng):
        c = run_planned(a, b, base)
        if c is None:
            # the backend copies such operands: the copy must then plan
            a2, b2 = np.ascontiguousarray(a), np.ascontiguousarray(b)
            big = np.concatenate([a2.ravel(), b2.ravel()])
            a2, b2 = big[:a2.size].reshape(a.shape), big[a2.size:].reshape(b.shape)
            c = run_planned(a2, b2, big)
            assert "copied" in name, f"{name}: expected to run without a copy"
        else:
            planned += 1
        np.testing.assert_allclose(c, a @ b, rtol=1e-12, atol=1e-12, err_msg=name)
    assert planned >= 12


def test_layouts():
    f = 4
    assert gemm.operand_layout((3, 5), (5 * f, f), f) == gemm.Layout(gemm.OP_N, 5, 0)
    assert gemm.operand_layout((5, 3), (f, 5 * f), f) == gemm.Layout(gemm.OP_T, 5, 0)
    assert gemm.operand_layout((2, 3, 5), (15 * f, 5 * f, f), f) == gemm.Layout(gemm.OP_N, 5, 15)
    assert gemm.operand_layout((3, 5), (10 * f, 2 * f), f) is None  # every other column
    assert gemm.operand_layout((3, 5), (-5 * f, f), f) is None  # reversed rows
    assert gemm.operand_layout((2, 2, 3, 5), (99 * f, 15 * f, 5 * f, f), f) is None


def test_mismatched_shapes_are_refused():
    lay = gemm.Layout(gemm.OP_N, 4, 0)
    with pytest.raises(ValueError, match="do not match"):
        gemm.plan((3, 4), lay, (5, 2), lay)


def test_output_layouts():
    f = 4
    # a query block of y (B, NH, T, hs)[:, :, r0:r1]: rows contiguous, one batch stride
    y = np.zeros((2, 3, 10, 4), dtype=np.float32)[:, :, 2:6]
    assert gemm.output_layout(y.shape, y.strides, f) == gemm.Layout(gemm.OP_N, 4, 40)
    assert gemm.output_layout((5, 3), (3 * f, f), f) == gemm.Layout(gemm.OP_N, 3, 0)
    assert gemm.output_layout((5, 3), (f, 5 * f), f) is None  # columns contiguous: no
    assert gemm.output_layout((2, 5, 3), (f, 3 * f, f), f) is None  # batches overlap
    lay = gemm.output_layout(y.shape, y.strides, f)
    call = gemm.plan((2, 3, 4, 7), gemm.Layout(gemm.OP_N, 7, 28), (2, 3, 7, 4),
                     gemm.Layout(gemm.OP_N, 4, 28), lay)
    assert (call.ldc, call.stride_c) == (4, 40)
    with pytest.raises(ValueError, match="row by row"):
        gemm.plan((3, 4), gemm.Layout(gemm.OP_N, 4, 0), (4, 5), gemm.Layout(gemm.OP_N, 5, 0),
                  gemm.Layout(gemm.OP_T, 5, 0))
