"""Causal self-attention for the GPU: whole (T, T) score matrices, batched GEMMs, fused rows.

The reference (gpt2np.layers.attention_forward) walks query blocks so that a CPU never
holds a (B, NH, T, T) array and skips the masked triangle. A GPU prefers few, big launches:
here every head's scores come from one strided-batched cuBLAS GEMM (in the current matmul
precision, on the tensor cores for tf32/bf16), and the causal softmax, its recomputation in
the backward and its gradient are one fused kernel each (backends/cuda/attention.cu)
instead of the reference's six elementwise passes. The math is the reference's: the
softmax is not kept but recomputed from the scores and the stored log-sum-exp, and
D = rowsum(dy * y) replaces the (T, T) row sums of P * dP.

The row operations come in an `ops` object, so that the same orchestration runs on the
CPU with NumPy stand-ins (tests/test_cupy_attention.py checks it against the reference);
on the GPU they are the kernels.
"""
from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numpy as np

from . import KernelCache

_THREADS = 256


def attention_forward(qkv, n_head, ops=None):
    # qkv (B,T,3C) -> y (B,T,C)
    ops = ops or gpu_ops()
    xp = ops.xp
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    q, k, v = qkv.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)  # (B,NH,T,hs) views
    scale = 1.0 / math.sqrt(hs)
    qs = q * scale  # contiguous (B,NH,T,hs): the batched GEMM needs one batch stride
    k = xp.ascontiguousarray(k)
    v = xp.ascontiguousarray(v)
    att = ops.matmul(qs, k.transpose(0, 1, 3, 2))  # scores (B,NH,T,T)
    lse = ops.causal_softmax(att)  # att -> P in place (0 above the diagonal); lse (B,NH,T)
    y = ops.matmul(att, v)  # (B,NH,T,hs)
    del att
    out = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # merge heads
    backward = functools.partial(attention_backward, ops=ops)
    return out, KernelCache(backward, qs, k, v, y, lse, scale)


def attention_backward(dout, cache, ops=None):
    # dout (B,T,C) -> dqkv (B,T,3C)
    ops = ops or gpu_ops()
    xp = ops.xp
    qs, k, v, y, lse, scale = cache.saved
    B, NH, T, hs = qs.shape
    dy = xp.ascontiguousarray(dout.reshape(B, T, NH, hs).transpose(0, 2, 1, 3))  # (B,NH,T,hs)
    D = (dy * y).sum(axis=-1)  # (B,NH,T): rowsum(P * dP) = dy . y
    # each of these is a GEMM operand twice: on the GPU in bf16, cast once (layers.matmul_operand)
    qs_, k_, dy_ = ops.cast(qs), ops.cast(k), ops.cast(dy)
    att = ops.matmul(qs_, k_.transpose(0, 1, 3, 2))
    ops.softmax_recompute(att, lse)  # P = exp(S - lse), 0 above the diagonal
    dv = ops.matmul(att.transpose(0, 1, 3, 2), dy_)  # (B,NH,T,hs)
    datt = ops.matmul(dy_, v.transpose(0, 1, 3, 2))  # dP (B,NH,T,T)
    ops.softmax_backward(datt, att, D)  # dS = P * (dP - D) in place
    del att
    datt_ = ops.cast(datt)  # the biggest operand, (B,NH,T,T): one cast for both products
    dq = ops.matmul(datt_, k_)
    dq *= scale  # scores = (q * scale) @ k^T
    dk = ops.matmul(datt_.transpose(0, 1, 3, 2), qs_)
    del datt, datt_
    dqkv = xp.empty((B, T, 3, NH, hs), dtype=dout.dtype)
    for slot, g in enumerate((dq, dk, dv)):
        dqkv[:, :, slot] = g.transpose(0, 2, 1, 3)  # split heads back into the qkv layout
    return dqkv.reshape(B, T, 3 * NH * hs)


# ------------------------------------------------------------------------------ the ops


def numpy_ops():
    """The row operations in NumPy (any float dtype): the kernels' specification."""
    def causal_mask(T):
        return np.triu(np.ones((T, T), dtype=bool), k=1)  # True above the diagonal

    def causal_softmax(att):
        T = att.shape[-1]
        att[..., causal_mask(T)] = -np.inf
        m = att.max(axis=-1, keepdims=True)
        np.exp(att - m, out=att)
        s = att.sum(axis=-1, keepdims=True)
        att /= s
        return (np.log(s) + m)[..., 0]

    def softmax_recompute(att, lse):
        att -= lse[..., None]
        np.exp(att, out=att)
        att[..., causal_mask(att.shape[-1])] = 0.0

    def softmax_backward(datt, att, D):
        datt -= D[..., None]
        datt *= att

    from gpt2np import layers

    return SimpleNamespace(xp=np, matmul=layers.matmul, cast=layers.matmul_operand,
                           causal_softmax=causal_softmax, softmax_recompute=softmax_recompute,
                           softmax_backward=softmax_backward)


@functools.lru_cache(maxsize=1)
def gpu_ops():
    """The row operations as the kernels of backends/cuda/attention.cu."""
    import cupy as cp

    from gpt2np import layers

    from .cupy_kernels import load_module

    mod = load_module("attention.cu")
    fwd = mod.get_function("causal_softmax_forward")
    recompute = mod.get_function("causal_softmax_recompute")
    bwd = mod.get_function("causal_softmax_backward")

    def _check(*arrays):
        for a in arrays:
            if a.dtype != cp.float32 or not a.flags.c_contiguous:
                raise ValueError(f"attention kernels take C-contiguous float32 arrays, got "
                                 f"{a.dtype} with strides {a.strides}")

    def _grid(n):
        return (min(math.ceil(n / _THREADS), 65535 * 8),)

    def causal_softmax(att):
        _check(att)
        T = att.shape[-1]
        rows = att.size // T
        lse = cp.empty(att.shape[:-1], dtype=cp.float32)
        fwd((rows,), (_THREADS,), (att, lse, np.int32(T)))
        return lse

    def softmax_recompute(att, lse):
        _check(att, lse)
        recompute(_grid(att.size), (_THREADS,), (att, lse, np.int32(att.shape[-1]),
                                                 np.int64(att.size)))

    def softmax_backward(datt, att, D):
        D = cp.ascontiguousarray(D)
        _check(datt, att, D)
        bwd(_grid(datt.size), (_THREADS,), (datt, att, D, np.int32(datt.shape[-1]),
                                            np.int64(datt.size)))

    return SimpleNamespace(xp=cp, matmul=layers.matmul, cast=layers.matmul_operand,
                           causal_softmax=causal_softmax,
                           softmax_recompute=softmax_recompute, softmax_backward=softmax_backward)
