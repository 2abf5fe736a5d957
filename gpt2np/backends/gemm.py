"""How a row-major matmul, batched or not, maps onto one cuBLAS GEMM call (no GPU needed).

cuBLAS is column-major: it computes C = op(A) @ op(B) on matrices stored column by column.
A row-major (r, c) matrix with row stride ld is, read column-major with the same ld, its
transpose (c, r). So the row-major product C = a @ b, with C (M, N) written contiguously,
is the column-major product C^T = b^T @ a^T: cuBLAS's A is our b, its B is our a, m = N,
n = M, and each operand is read "N" (as stored) or "T" (transposed) depending on whether
its rows or its columns are the contiguous ones. Transposed views (weight.T, x.T, att^T)
therefore cost no copy, and neither do views with a row stride wider than their width (the
q, k, v slices of the fused qkv projection).

Pure Python over shapes and strides, so that tests check it on the CPU against a numpy
model of cuBLAS's column-major semantics.
"""
from __future__ import annotations

import math
from typing import NamedTuple


class Layout(NamedTuple):
    op: int  # 0 = CUBLAS_OP_N (rows contiguous), 1 = CUBLAS_OP_T (columns contiguous)
    ld: int  # leading dimension in elements: the stride between rows (N) or columns (T)
    batch_stride: int  # elements between consecutive matrices of the batch (0 if one)


OP_N, OP_T = 0, 1


def operand_layout(shape, strides, itemsize) -> Layout | None:
    """How cuBLAS can read the matrix (batch) `shape` (..., r, c) with byte `strides`, or
    None if it cannot as it is (make it contiguous first)."""
    if len(shape) < 2 or any(s % itemsize for s in strides):
        return None
    *batch, r, c = shape
    *bstrides, sr, sc = (s // itemsize for s in strides)
    batch_stride = _batch_stride(batch, bstrides)
    if batch_stride is None:
        return None
    if sc == 1 and sr >= max(1, c):
        return Layout(OP_N, max(1, sr), batch_stride)
    if sr == 1 and sc >= max(1, r):
        return Layout(OP_T, max(1, sc), batch_stride)
    return None


def _batch_stride(batch, strides):
    # the leading axes must collapse into one axis of uniform stride; axes of size 1 have
    # no stride that matters
    dims = [(n, s) for n, s in zip(batch, strides) if n != 1]
    if not dims:
        return 0
    for (n0, s0), (n1, s1) in zip(dims, dims[1:]):
        if s0 != s1 * n1:
            return None
    stride = dims[-1][1]
    return stride if stride > 0 else None


class GemmCall(NamedTuple):
    """The arguments of cublasGemmStridedBatchedEx for C = a @ b, apart from pointers, types."""
    transa: int
    transb: int
    m: int
    n: int
    k: int
    lda: int  # these three describe cuBLAS's A, which is our b
    stride_a: int
    ldb: int  # and these cuBLAS's B, our a
    stride_b: int
    ldc: int
    stride_c: int
    batch: int


def plan(a_shape, a_layout: Layout, b_shape, b_layout: Layout,
         c_layout: Layout | None = None) -> GemmCall:
    """C (..., M, N) = a (..., M, K) @ b (..., K, N); C contiguous, or laid out as c_layout
    (rows contiguous: a slice of a wider array, such as one query block of y)."""
    M, K = a_shape[-2:]
    K2, N = b_shape[-2:]
    if K != K2 or tuple(a_shape[:-2]) != tuple(b_shape[:-2]):
        raise ValueError(f"matmul shapes do not match: {tuple(a_shape)} @ {tuple(b_shape)}")
    batch = math.prod(a_shape[:-2])
    ldc, stride_c = N, M * N
    if c_layout is not None:
        if c_layout.op != OP_N or c_layout.ld < max(1, N):
            raise ValueError(f"cuBLAS writes C row by row: {c_layout} cannot hold (M, {N})")
        ldc, stride_c = c_layout.ld, c_layout.batch_stride
    return GemmCall(transa=b_layout.op, transb=a_layout.op, m=N, n=M, k=K,
                    lda=b_layout.ld, stride_a=b_layout.batch_stride,
                    ldb=a_layout.ld, stride_b=a_layout.batch_stride,
                    ldc=ldc, stride_c=stride_c, batch=batch)


def output_layout(shape, strides, itemsize) -> Layout | None:
    """The layout under which cuBLAS can write C (..., M, N) in place, or None: rows
    contiguous, row stride >= N, one batch stride, no two elements on one address."""
    lay = operand_layout(shape, strides, itemsize)
    if lay is None or lay.op != OP_N:
        return None
    *batch, M, N = shape
    if math.prod(batch) > 1 and lay.batch_stride < M * lay.ld and M > 1:
        return None  # batches would overlap
    return lay
