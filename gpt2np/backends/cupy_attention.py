"""Causal self-attention for the GPU: batched GEMMs over query blocks, fused row kernels.

The same algorithm as the reference (gpt2np.layers.attention_forward): queries in blocks,
each block's scores only against the keys up to its last position (the masked triangle
beyond is never computed), the softmax not kept but recomputed in the backward from the
scores and the stored log-sum-exp, and D = rowsum(dy * y) instead of the (T, T) row sums
of P * dP. What differs on the GPU: every product of a block, over all heads and the
batch, is one strided-batched cuBLAS GEMM in the current matmul precision (tensor cores
for tf32/bf16; bf16 operands cast once, not per product), and the causal softmax, its
recomputation and its gradient are one fused kernel each (gpt2np/backends/cuda/attention.cu)
instead of the reference's six elementwise passes. In bf16, for the head sizes compiled in,
flash attention instead (gpt2np/backends/cuda/flash_attention.cu): no (T, T) block at all.

attention_forward / attention_backward have the reference's signatures; which algorithm ran
is in the cache's type (BlockCache or FlashCache). The row operations of the query blocks
come in a `row_ops` object, so that the same orchestration runs on the CPU with NumPy
stand-ins (tests/test_cupy_attention.py checks it against the reference); on the GPU they
are the kernels.
"""
from __future__ import annotations

import functools
import math
import os
from types import SimpleNamespace
from typing import Any, NamedTuple

import numpy as np

from gpt2np import layers as L
from gpt2np.backends.cupy_kernels import get_kernel, load_module

_THREADS = 256
# Queries per block on the GPU: 256 skips 37.5% of the (T,T) scores at T = 1024 (the masked
# triangle beyond each block) in 4 rounds of launches; smaller blocks skip more but launch
# more (each round is ~10 kernels and GEMMs).
GPU_BLOCK = 256

FLASH_HEAD_SIZES = (16, 32, 64, 128)  # compiled in: the fragments are register arrays
FLASH_TILE = 64  # queries (or keys) per thread block; 4 warps of 16 rows
_FLASH_THREADS = 128
# a literal: tests/test_cuda_compile.py reads it from the source
KERNEL_NAMES = {"flash_attention.cu": (
    "flash_pack", "flash_backward_dot", "flash_mma_check", "flash_forward_d16", "flash_forward_d32",
    "flash_forward_d64", "flash_forward_d128", "flash_backward_dq_d16",
    "flash_backward_dq_d32", "flash_backward_dq_d64", "flash_backward_dq_d128",
    "flash_backward_dkdv_d16", "flash_backward_dkdv_d32", "flash_backward_dkdv_d64",
    "flash_backward_dkdv_d128",
)}


class BlockCache(NamedTuple):
    """What the query-block attention keeps: q * scale, k, v as GEMM operands (bf16 bits in
    bf16: half the bytes), y (B,NH,T,hs), the log-sum-exp (B,NH,T), and the row ops."""
    qs: Any
    k: Any
    v: Any
    y: Any
    lse: Any
    scale: float
    row_ops: Any


class FlashCache(NamedTuple):
    """What flash attention keeps: q * scale, k, v packed (3,B,NH,T,hs) in bf16 bits, y
    (B,T,C) and the log-sum-exp (B,NH,T)."""
    qkv16: Any
    y: Any
    lse: Any
    n_head: int


def use_flash(head_size):
    """Whether the GPU attention runs as flash attention: in bf16 (its products are bf16 on
    the tensor cores), for the head sizes compiled in, unless GPT2NP_FLASH=0."""
    return (L.get_matmul_precision() == "bf16" and head_size in FLASH_HEAD_SIZES
            and os.environ.get("GPT2NP_FLASH", "1") != "0")


def attention_forward(qkv, n_head, bias=None, row_ops=None):
    # qkv (B,T,3C) -> y (B,T,C); bias: c_attn's (3C,) bias if qkv comes without it.
    # row_ops: the query blocks' row operations (default: the GPU kernels, or flash attention
    # where use_flash says so)
    if row_ops is None and use_flash(qkv.shape[-1] // 3 // n_head):
        return flash_attention_forward(qkv, n_head, bias)
    if bias is not None:
        qkv = qkv + bias
    ops = row_ops or gpu_row_ops()
    xp = ops.xp
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    q, k, v = qkv.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)  # (B,NH,T,hs) views
    scale = 1.0 / math.sqrt(hs)
    qs = q * scale  # contiguous (B,NH,T,hs): the batched GEMM needs one batch stride
    k = xp.ascontiguousarray(k)
    v = xp.ascontiguousarray(v)
    qs_, k_, v_ = ops.cast(qs), ops.cast(k), ops.cast(v)  # each read by every block
    y = xp.empty((B, n_head, T, hs), dtype=qkv.dtype)
    lse = xp.empty((B, n_head, T), dtype=qkv.dtype)  # log-sum-exp of each score row
    for r0, r1 in _blocks(T, ops.block):
        att = ops.matmul(qs_[:, :, r0:r1], k_[:, :, :r1].transpose(0, 1, 3, 2))  # (B,NH,n,r1)
        lse[:, :, r0:r1] = ops.causal_softmax(att, r0)  # att -> P in place, 0 where masked
        ops.matmul(att, v_[:, :, :r1], out=y[:, :, r0:r1])  # (B,NH,n,hs)
        del att
    out = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # merge heads
    # the backward only multiplies q, k, v: keep them as GEMM operands (bf16: half the bytes)
    return out, BlockCache(qs_, k_, v_, y, lse, scale, ops)


def attention_backward(dout, cache):
    # dout (B,T,C) -> dqkv (B,T,3C), by the algorithm that made the cache
    if isinstance(cache, FlashCache):
        return flash_attention_backward(dout, cache)
    qs_, k_, v_, y, lse, scale, ops = cache  # q * scale, k, v as the forward's operands
    xp = ops.xp
    B, NH, T, hs = qs_.shape
    dy = xp.ascontiguousarray(dout.reshape(B, T, NH, hs).transpose(0, 2, 1, 3))  # (B,NH,T,hs)
    D = (dy * y).sum(axis=-1)  # (B,NH,T): rowsum(P * dP) = dy . y
    dy_ = ops.cast(dy)  # a GEMM operand twice per block: on the GPU in bf16, cast once
    dq = xp.empty((B, NH, T, hs), dtype=dout.dtype)
    dk = xp.zeros((B, NH, T, hs), dtype=dout.dtype)  # keys and values gather from every
    dv = xp.zeros((B, NH, T, hs), dtype=dout.dtype)  # later block of queries
    for r0, r1 in _blocks(T, ops.block):
        att = ops.matmul(qs_[:, :, r0:r1], k_[:, :, :r1].transpose(0, 1, 3, 2))
        ops.softmax_recompute(att, xp.ascontiguousarray(lse[:, :, r0:r1]), r0)  # P
        dv[:, :, :r1] += ops.matmul(att.transpose(0, 1, 3, 2), dy_[:, :, r0:r1])
        datt = ops.matmul(dy_[:, :, r0:r1], v_[:, :, :r1].transpose(0, 1, 3, 2))  # dP
        ops.softmax_backward(datt, att, xp.ascontiguousarray(D[:, :, r0:r1]))  # dS in place
        del att
        datt_ = ops.cast(datt)  # the biggest operand: one cast for both products
        ops.matmul(datt_, k_[:, :, :r1], out=dq[:, :, r0:r1])
        dk[:, :, :r1] += ops.matmul(datt_.transpose(0, 1, 3, 2), qs_[:, :, r0:r1])
        del datt, datt_
    dq *= scale  # scores = (q * scale) @ k^T
    dqkv = xp.empty((B, T, 3, NH, hs), dtype=dout.dtype)
    for slot, g in enumerate((dq, dk, dv)):
        dqkv[:, :, slot] = g.transpose(0, 2, 1, 3)  # split heads back into the qkv layout
    return dqkv.reshape(B, T, 3 * NH * hs)


# -------------------------------------------------------------------- flash attention


def flash_attention_forward(qkv, n_head, bias=None):
    # qkv (B,T,3C) float32 -> y (B,T,C); keeps bf16 q*scale, k, v, y and the (B,NH,T) log-sum-exp
    import cupy as cp

    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    if hs not in FLASH_HEAD_SIZES or hs * n_head != C:
        raise ValueError(f"flash attention needs a head size in {FLASH_HEAD_SIZES}, got "
                         f"n_embd {C} / n_head {n_head}")
    if qkv.dtype != cp.float32:
        raise ValueError(f"flash attention takes float32 qkv, got {qkv.dtype}")
    if B * n_head > 65535:
        raise ValueError(f"flash attention launches one block row per (batch, head): "
                         f"B * n_head = {B * n_head} is over CUDA's 65535")
    scale = 1.0 / math.sqrt(hs)
    qkv16 = _pack(qkv, n_head, 3, scale, bias)  # (3,B,NH,T,hs) bf16: q * scale, k, v
    y = cp.empty((B, T, C), dtype=cp.float32)
    lse = cp.empty((B, n_head, T), dtype=cp.float32)
    _flash_kernel("forward", hs)(_flash_grid(B, n_head, T), (_FLASH_THREADS,),
                                 (qkv16, y, lse, np.int32(T), np.int32(n_head)))
    # the backward reads q, k, v only as bf16 tiles: qkv itself (twice the bytes) is not kept
    return y, FlashCache(qkv16, y, lse, n_head)


def flash_attention_backward(dout, cache):
    # dout (B,T,C) -> dqkv (B,T,3C)
    import cupy as cp

    qkv16, y, lse, n_head = cache
    B, T, C = y.shape
    hs = C // n_head
    dout = _aligned(cp.ascontiguousarray(dout, dtype=cp.float32))
    Dv = cp.empty((B, n_head, T), dtype=cp.float32)  # rowsum(dy * y) per head
    rows = B * T * n_head
    _flash_kernel("backward_dot")((min(math.ceil(rows / 256), 65535 * 8),), (256,), (
        dout, y, Dv, np.int32(T), np.int32(n_head), np.int32(hs), np.int64(rows)))
    dy16 = _pack(dout, n_head, 1, 1.0)  # (1,B,NH,T,hs) bf16: read by both kernels
    dqkv = cp.empty((B, T, 3 * C), dtype=cp.float32)  # every element is written once: dq
    args = (qkv16, dy16, lse, Dv, dqkv, np.int32(T), np.int32(n_head),  # by one kernel,
            np.float32(1.0 / math.sqrt(hs)))                            # dk and dv by the other
    grid = _flash_grid(B, n_head, T)
    _flash_kernel("backward_dq", hs)(grid, (_FLASH_THREADS,), args)
    _flash_kernel("backward_dkdv", hs)(grid, (_FLASH_THREADS,), args)
    return dqkv


def _pack(x, n_head, slots, scale0, bias=None):
    # x (B,T,slots*C) float32 (+ bias (slots*C,)) -> (slots,B,NH,T,hs) bf16 bits, slot 0
    # times scale0
    import cupy as cp

    x = _aligned(x)  # read as float pairs
    B, T, SC = x.shape
    hs = SC // slots // n_head
    if bias is not None:
        if bias.shape != (SC,) or bias.dtype != cp.float32:
            raise ValueError(f"bias must be float32 ({SC},), got {bias.dtype} {bias.shape}")
        bias = _aligned(bias)
    out = cp.empty((slots, B, n_head, T, hs), dtype=cp.uint16)
    n_pairs = x.size // 2
    _flash_kernel("pack")((max(1, min(math.ceil(n_pairs / 256), 65535 * 8)),), (256,), (
        x, x if bias is None else bias, out, np.int32(bias is not None), np.int32(T),
        np.int32(n_head), np.int32(hs), np.int32(slots), np.float32(scale0), np.int64(n_pairs)))
    return out


def _aligned(a):
    # C-contiguous, 8-byte aligned: the kernels read float pairs (float2). Fresh arrays
    # are (CuPy allocates 256-byte aligned); a view at an odd offset is copied.
    import cupy as cp

    a = cp.ascontiguousarray(a)
    return a if a.data.ptr % 8 == 0 else a.copy()


def _flash_grid(B, n_head, T):
    return (math.ceil(T / FLASH_TILE), B * n_head)


def _flash_kernel(kind, hs=None):
    return get_kernel(f"flash_{kind}" + (f"_d{hs}" if hs else ""), "flash_attention.cu")


def _blocks(T, block):
    # query blocks [r0, r1): block r0..r1-1 needs keys 0..r1-1 only, so the masked upper
    # triangle beyond r1 is never computed (at T = 1024 and blocks of 256: 62.5% of T x T)
    return [(r0, min(T, r0 + block)) for r0 in range(0, T, block)]


# -------------------------------------------------------------------------- the row ops


def numpy_row_ops(block=GPU_BLOCK):
    """The row operations in NumPy (any float dtype): the kernels' specification.
    att is (..., n, K): queries q0..q0+n-1 against keys 0..K-1."""
    def causal_mask(n, K, q0):
        return np.arange(K)[None, :] > (q0 + np.arange(n))[:, None]  # True: a future key

    def causal_softmax(att, q0):
        att[..., causal_mask(*att.shape[-2:], q0)] = -np.inf
        m = att.max(axis=-1, keepdims=True)
        np.exp(att - m, out=att)
        s = att.sum(axis=-1, keepdims=True)
        att /= s
        return (np.log(s) + m)[..., 0]

    def softmax_recompute(att, lse, q0):
        att -= lse[..., None]
        np.exp(att, out=att)
        att[..., causal_mask(*att.shape[-2:], q0)] = 0.0

    def softmax_backward(datt, att, D):
        datt -= D[..., None]
        datt *= att

    return SimpleNamespace(xp=np, block=block, matmul=L.matmul, cast=L.matmul_operand,
                           causal_softmax=causal_softmax, softmax_recompute=softmax_recompute,
                           softmax_backward=softmax_backward)


@functools.lru_cache(maxsize=1)
def gpu_row_ops():
    """The row operations as the kernels of gpt2np/backends/cuda/attention.cu."""
    import cupy as cp

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

    def causal_softmax(att, q0):
        _check(att)
        n, K = att.shape[-2:]
        lse = cp.empty(att.shape[:-1], dtype=cp.float32)
        fwd((att.size // K,), (_THREADS,), (att, lse, np.int32(n), np.int32(K), np.int32(q0)))
        return lse

    def softmax_recompute(att, lse, q0):
        _check(att, lse)
        n, K = att.shape[-2:]
        recompute(_grid(att.size), (_THREADS,), (att, lse, np.int32(n), np.int32(K),
                                                 np.int32(q0), np.int64(att.size)))

    def softmax_backward(datt, att, D):
        D = cp.ascontiguousarray(D)
        _check(datt, att, D)
        bwd(_grid(datt.size), (_THREADS,), (datt, att, D, np.int32(datt.shape[-1]),
                                            np.int64(datt.size)))

    return SimpleNamespace(xp=cp, block=GPU_BLOCK, matmul=L.matmul,
                           cast=L.matmul_operand, causal_softmax=causal_softmax,
                           softmax_recompute=softmax_recompute, softmax_backward=softmax_backward)
