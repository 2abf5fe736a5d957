"""Fused CUDA kernels for float32 CuPy arrays: the wrappers around gpt2np/backends/cuda/kernels.cu.

Each layer function has the signature and contract of its reference in gpt2np.layers and
computes what it computes, in fewer passes over memory; adamw_update does what
gpt2np.optim.AdamW's update does. A forward's cache is its own backward's (the model calls
the pair of one LayerOps, gpt2np.backends.cupy_backend). Like the reference, `operand=True`
gives matmul_operand(out): in bf16 the bfloat16 bits that the cupy backend's GEMMs read,
written by the kernel itself; so the kernels run inside the model's
matmul_precision(precision, backend) context.

Every reduction runs in a fixed order (no float atomics), so results are bit-identical from
run to run. Inputs must be float32 cupy arrays; non-contiguous inputs are copied,
outputs handed in (out=, dwte=, the AdamW state) must be C-contiguous.

CuPy is imported inside the functions: this module (and its KERNEL_NAMES, which the
CPU compile test checks) imports without it.
"""
from __future__ import annotations

import functools
import os
import re

import numpy as np

from gpt2np import layers as L

_CUDA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda")

# Every kernel these wrappers look up in kernels.cu (tests/test_cuda_compile.py checks that
# each one is defined).
KERNEL_NAMES = (
    "layernorm_forward_kernel",
    "layernorm_forward_bf16_kernel",
    "layernorm_backward_kernel",
    "gelu_forward_kernel",
    "gelu_backward_kernel",
    "bias_gelu_forward_kernel",
    "bias_gelu_forward_bf16_kernel",
    "crossentropy_forward_kernel",
    "crossentropy_backward_kernel",
    "crossentropy_backward_bf16_kernel",
    "embedding_backward_kernel",
    "adamw_kernel",
)

_MAX_GRID = 1 << 16  # grid-stride kernels: more blocks than this only add launch work
_STATIC_SMEM = 48 * 1024  # dynamic shared memory available without an opt-in


def _cupy():
    import cupy

    return cupy


_INCLUDE = re.compile(r'^#include "(\w+\.cuh)"[^\n]*$', re.M)


def read_source(filename):
    """The text of gpt2np/backends/cuda/<filename> with its `#include "x.cuh"` lines replaced by
    those headers (once each): one self-contained source for NVRTC, whose cache (CuPy's,
    keyed by the source text) then also sees changes to the headers."""
    seen = set()

    def paste(m):
        name = m.group(1)
        if name in seen:
            return ""
        seen.add(name)
        return _INCLUDE.sub(paste, _read(name))

    return _INCLUDE.sub(paste, _read(filename))


def _read(filename):
    path = os.path.join(_CUDA_DIR, filename)
    if not os.path.exists(path):
        raise FileNotFoundError(f"CUDA source {filename} is not in {_CUDA_DIR}")
    with open(path, encoding="utf-8") as f:
        return f.read()


@functools.lru_cache(maxsize=None)
def load_module(filename="kernels.cu"):
    """The cupy.RawModule of gpt2np/backends/cuda/<filename>, built once per process.

    NVRTC compiles it at the first get_function, for the current device's architecture.
    """
    return _cupy().RawModule(code=read_source(filename), options=("-std=c++17",))


@functools.lru_cache(maxsize=None)
def _function(name, filename, device):
    return load_module(filename).get_function(name)


def get_kernel(name, filename="kernels.cu"):
    """Kernel `name` of gpt2np/backends/cuda/<filename>, loaded on the current device."""
    return _function(name, filename, _cupy().cuda.runtime.getDevice())


# --------------------------------------------------------------------------------------
# launch helpers. Kernel arguments: arrays pass as pointers; scalars must be numpy scalars
# of the kernel's C type (np.int32 for int, np.int64 for long long, np.float32 for float).


def _f32(x, name):
    """x as a C-contiguous float32 cupy array (a copy only if x is not contiguous)."""
    cp = _cupy()
    if not isinstance(x, cp.ndarray) or x.dtype != cp.float32:
        raise ValueError(f"{name} must be a float32 cupy array, got "
                         f"{type(x).__name__} of dtype {getattr(x, 'dtype', None)}")
    return cp.ascontiguousarray(x)


def _bf16_operand(operand):
    """Whether an output asked for as a matmul operand is written as bfloat16 bits."""
    return operand and L.get_matmul_precision() == "bf16"


def _out_f32(x, name, shape):
    """Check an output buffer handed in by the caller: we write into it, so no copies."""
    cp = _cupy()
    if not isinstance(x, cp.ndarray) or x.dtype != cp.float32:
        raise ValueError(f"{name} must be a float32 cupy array, got "
                         f"{type(x).__name__} of dtype {getattr(x, 'dtype', None)}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(x.shape)}, expected {tuple(shape)}")
    if not x.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (it is written in place)")
    return x


def _threads(n, cap):
    """A block size for n items per row: a multiple of 32, at most cap."""
    return min(cap, max(32, -(-n // 32) * 32))


def _ptr(a):
    return a.data.ptr  # the device address of a's first element


def _overlaps(a, b):
    """Do the bytes of contiguous arrays a and b overlap?"""
    return a.data.ptr < b.data.ptr + b.nbytes and b.data.ptr < a.data.ptr + a.nbytes


# --------------------------------------------------------------------------------------
# LayerNorm over the last axis


def layernorm_forward(x, weight, bias, eps=1e-5, operand=False):
    # x (..., C), weight (C,), bias (C,) -> out (..., C); float32, or for a GEMM operand in
    # bf16 its bfloat16 bits (uint16), written directly (no float32 copy to cast)
    cp = _cupy()
    bf16 = _bf16_operand(operand)
    x = _f32(x, "x")
    C = x.shape[-1]
    weight, bias = _f32(weight, "weight"), _f32(bias, "bias")
    if weight.shape != (C,) or bias.shape != (C,):
        raise ValueError(f"weight and bias must be ({C},), got {weight.shape} and {bias.shape}")
    N = x.size // C if C else 0
    out = cp.empty(x.shape, dtype=cp.uint16 if bf16 else cp.float32)
    mean = cp.empty(N, dtype=cp.float32)  # (N,) per row, for the backward
    rstd = cp.empty(N, dtype=cp.float32)
    if N:
        rows_per_block = 8  # one warp per row
        get_kernel("layernorm_forward_bf16_kernel" if bf16 else "layernorm_forward_kernel")(
            (-(-N // rows_per_block),), (32 * rows_per_block,),
            (x, weight, bias, out, mean, rstd, np.int64(N), np.int32(C), np.float32(eps)))
    # x itself is kept (not the normalised copy): the caller must not modify it in place
    # before the backward, which the layer code never does
    return out, (x, weight, mean, rstd)


_LN_MAX_BLOCKS = 1024  # blocks of the backward: each writes a (C,) partial dweight and dbias


def layernorm_backward(dout, cache):
    # dout (..., C) -> dx (..., C), dweight (C,), dbias (C,)
    cp = _cupy()
    x, weight, mean, rstd = cache
    dout = _f32(dout, "dout")
    if dout.shape != x.shape:
        raise ValueError(f"dout has shape {dout.shape}, the forward's x {x.shape}")
    C = x.shape[-1]
    N = mean.size
    dx = cp.empty_like(x)
    if N == 0:
        return dx, cp.zeros(C, dtype=cp.float32), cp.zeros(C, dtype=cp.float32)
    smem = (64 + 2 * C) * 4  # block_sum2's buffer + this block's dweight, dbias accumulators
    if smem > _STATIC_SMEM:
        max_c = (_STATIC_SMEM // 4 - 64) // 2
        raise ValueError(f"layernorm_backward supports C <= {max_c}, got {C}")
    # contiguous row ranges; the count depends only on N, so results do not vary by device
    rows_per_block = -(-N // _LN_MAX_BLOCKS)
    n_blocks = -(-N // rows_per_block)
    parts = cp.empty((2, n_blocks, C), dtype=cp.float32)  # per-block dweight, dbias
    get_kernel("layernorm_backward_kernel")(
        (n_blocks,), (_threads(C, 256),),
        (dout, x, weight, mean, rstd, dx, parts[0], parts[1],
         np.int64(N), np.int32(C), np.int64(rows_per_block)),
        shared_mem=smem)
    dweight, dbias = parts.sum(axis=1)  # (2, C): a fixed-order reduction, no atomics
    return dx, dweight, dbias


# --------------------------------------------------------------------------------------
# GELU, tanh approximation


def _elementwise_grid(n, threads=256):
    return (max(1, min(-(-n // threads), _MAX_GRID)),), (threads,)


def gelu_forward(x, bias=None, operand=False):
    # x (..., OC) -> gelu(x + bias) (..., OC); bias (OC,) or None. float32, or for a GEMM
    # operand in bf16 (c_proj's) its bfloat16 bits (uint16). With a bias the kernel adds it
    # on its way and saves x + bias for the backward: no pass of its own over (B,T,4C).
    cp = _cupy()
    x = _f32(x, "x")
    if bias is None:
        out = cp.empty_like(x)
        if x.size:
            grid, block = _elementwise_grid(x.size)
            get_kernel("gelu_forward_kernel")(grid, block, (x, out, np.int64(x.size)))
        return (L.matmul_operand(out) if operand else out), (x,)  # the backward recomputes s
    bias = _f32(bias, "bias")
    OC = x.shape[-1]
    if bias.shape != (OC,):
        raise ValueError(f"bias has shape {bias.shape}, expected ({OC},)")
    bf16 = _bf16_operand(operand)
    pre = cp.empty_like(x)  # x + bias: what the backward reads
    out = cp.empty(x.shape, dtype=cp.uint16 if bf16 else cp.float32)
    if x.size:
        grid, block = _elementwise_grid(x.size)
        get_kernel("bias_gelu_forward_bf16_kernel" if bf16 else "bias_gelu_forward_kernel")(
            grid, block, (x, bias, pre, out, np.int64(x.size), np.int32(OC)))
    return out, (pre,)


def gelu_backward(dout, cache):
    # dout (...) -> dx (...)
    cp = _cupy()
    (x,) = cache
    dout = _f32(dout, "dout")
    if dout.shape != x.shape:
        raise ValueError(f"dout has shape {dout.shape}, the forward's x {x.shape}")
    dx = cp.empty_like(x)
    if x.size:
        grid, block = _elementwise_grid(x.size)
        get_kernel("gelu_backward_kernel")(grid, block, (x, dout, dx, np.int64(x.size)))
    return dx


# --------------------------------------------------------------------------------------
# cross-entropy, mean over the rows whose target is not ignore_index


def cross_entropy_forward(logits, targets, ignore_index=-1, out=None):
    # logits (B,T,V), targets (B,T) int -> loss (0-d float32), cache.
    # out: optional (B,T,V) float32 buffer that the backward writes dlogits into.
    cp = _cupy()
    logits = _f32(logits, "logits")
    V = logits.shape[-1]
    N = logits.size // V if V else 0
    if tuple(targets.shape) != tuple(logits.shape[:-1]):
        raise ValueError(f"targets have shape {tuple(targets.shape)}, logits {logits.shape}")
    t = cp.ascontiguousarray(cp.asarray(targets).reshape(-1), dtype=cp.int64)  # (N,)
    if out is not None:
        out = _out_f32(out, "out", logits.shape)
    lse = cp.empty(N, dtype=cp.float32)  # (N,) log-sum-exp of each row
    losses = cp.empty(N, dtype=cp.float32)  # (N,) lse - logit[target]; 0 on ignored rows
    if N:
        get_kernel("crossentropy_forward_kernel")(
            (min(N, _MAX_GRID),), (_threads(V, 512),),
            (logits, t, lse, losses, np.int64(N), np.int32(V), np.int64(ignore_index)))
    # the mean over counted rows stays on the device (no sync): a fixed-order sum, and
    # 0/0 = nan when every row is ignored, as torch
    n_valid = cp.count_nonzero(t != ignore_index)  # 0-d int
    loss = (losses.sum(dtype=cp.float64) / n_valid).astype(cp.float32)
    inv_n = (1.0 / n_valid).astype(cp.float32)  # 0-d; inf if no row counts (then unused)
    return loss, (logits, t, lse, inv_n, out, ignore_index)


def cross_entropy_backward(dloss, cache, operand=False):
    # dloss scalar -> dlogits (B,T,V) = dloss * (softmax - onehot) / n_valid, zero on
    # ignored rows; written into the forward's `out` buffer when it was given one.
    # operand=True in bf16: as the bfloat16 bits (uint16) of the lm_head backward's GEMM
    # operand, in the first half of out's bytes (no float32 (B,T,V) written, no cast pass)
    cp = _cupy()
    bf16 = _bf16_operand(operand)
    logits, t, lse, inv_n, out, ignore_index = cache
    V = logits.shape[-1]
    N = t.size
    if out is not None and _overlaps(out, logits) and (bf16 or out.data.ptr != logits.data.ptr):
        # the kernel reads each row of logits while other blocks write theirs: only the very
        # same float32 buffer is safe (each element read, then written, by one thread). The
        # bf16 row r lands in bytes [2rV, 2(r+1)V), inside float rows r/2..(r+1)/2 of logits
        # that later blocks have not read yet.
        raise ValueError(
            "cross_entropy_backward: the forward's out buffer overlaps logits"
            + (", which the bf16 gradient would overwrite before it is read" if bf16 else
               " at another address") + "; pass a separate (B,T,V) float32 buffer as out "
            "(or out=None)" + ("" if bf16 else ", or logits itself for a float32 gradient"))
    if bf16:
        dlogits = (cp.empty(logits.shape, dtype=cp.uint16) if out is None
                   else out.reshape(-1).view(cp.uint16)[:logits.size].reshape(logits.shape))
    else:
        dlogits = cp.empty_like(logits) if out is None else out
    if isinstance(dloss, cp.ndarray):  # stays on the device: folded into the row weight
        scale, dloss = (inv_n * dloss).astype(cp.float32), 1.0
    else:
        scale, dloss = inv_n, float(dloss)
    if N:
        get_kernel("crossentropy_backward_bf16_kernel" if bf16 else "crossentropy_backward_kernel")(
            (min(N, _MAX_GRID),), (_threads(V, 512),),
            (logits, t, lse, scale, np.float32(dloss), dlogits,
             np.int64(N), np.int32(V), np.int64(ignore_index)))
    return dlogits


# --------------------------------------------------------------------------------------
# token + position embedding backward (the forward is the reference's gather)


def embedding_backward(dx, cache, dwte=None):
    # dx (B,T,C) -> dwte (V,C), dwpe (block_size,C); cache: layers.embedding_forward's
    # (idx, wte_shape, wpe_shape). dwte: optional (V,C) array to accumulate into.
    cp = _cupy()
    idx, wte_shape, wpe_shape = cache
    dx = _f32(dx, "dx")
    B, T, C = dx.shape
    V = wte_shape[0]
    dwpe = cp.zeros(wpe_shape, dtype=cp.float32)
    dx.sum(axis=0, out=dwpe[:T])  # every sequence uses positions 0..T-1; no atomics
    if dwte is None:
        dwte = cp.zeros(wte_shape, dtype=cp.float32)
    else:
        dwte = _out_f32(dwte, "dwte", wte_shape)
    N = B * T
    if N == 0 or C == 0:
        return dwte, dwpe
    # Sort (id, position) pairs: rows of one id become a run, in increasing position. The
    # keys are unique, so any sort gives the same order: a deterministic sum per id.
    flat = cp.asarray(idx).reshape(-1).astype(cp.int64)
    keys = cp.sort(flat * N + cp.arange(N, dtype=cp.int64))
    ids = keys // N  # floor division: an (invalid) negative id stays negative, and is skipped
    pos = keys - ids * N
    get_kernel("embedding_backward_kernel")(
        (min(N, _MAX_GRID),), (_threads(C, 1024),),
        (dx, ids, pos, dwte, np.int64(N), np.int32(C), np.int64(V)))
    return dwte, dwpe


# --------------------------------------------------------------------------------------
# AdamW: every tensor in a few launches (one per distinct decay factor)

_ADAM_CHUNK = 1 << 16  # elements per block
_ADAM_THREADS = 512
_ADAM_CACHE_SIZE = 16  # pointer / chunk tables kept per process
_adam_ptr_tables = {}  # (device, pointers) -> (4, n) uint64 device array
_adam_chunk_tables = {}  # (device, sizes) -> (sizes, chunk_tensor, chunk_start) device arrays


def _bounded_put(table, key, value):
    if len(table) >= _ADAM_CACHE_SIZE:  # e.g. fresh grad arrays every step: drop the old
        table.clear()
    table[key] = value
    return value


def _adam_tables(cp, ps, gs, ms, vs):
    # The device tables of one launch, cached: repeated steps on the same arrays upload
    # nothing but the kernel's scalar arguments.
    device = cp.cuda.runtime.getDevice()
    ptrs = tuple(_ptr(a) for arrays in (ps, gs, ms, vs) for a in arrays)
    ptr_table = _adam_ptr_tables.get((device, ptrs))
    if ptr_table is None:
        ptr_table = _bounded_put(_adam_ptr_tables, (device, ptrs),
                                 cp.asarray(np.array(ptrs, dtype=np.uint64)))
    sizes = tuple(p.size for p in ps)
    chunks = _adam_chunk_tables.get((device, sizes))
    if chunks is None:
        tensor = [i for i, n in enumerate(sizes) for _ in range(0, n, _ADAM_CHUNK)]
        start = [s for n in sizes for s in range(0, n, _ADAM_CHUNK)]
        chunks = _bounded_put(_adam_chunk_tables, (device, sizes), (
            cp.asarray(np.array(sizes, dtype=np.int64)),
            cp.asarray(np.array(tensor, dtype=np.int32)),
            cp.asarray(np.array(start, dtype=np.int64))))
    return ptr_table, chunks


def adamw_update(params, grads, ms, vs, decays, beta1, beta2, eps, step_size, sqrt_bias2):
    """In place, for each i: params[i] *= decays[i]; then the Adam moments ms[i], vs[i] and
    params[i] -= step_size * m / (sqrt(v) / sqrt_bias2 + eps), as optim.AdamW._update.

    All arrays float32, C-contiguous, params[i], grads[i], ms[i], vs[i] of one shape.
    """
    cp = _cupy()
    n = len(params)
    if not (len(grads) == len(ms) == len(vs) == len(decays) == n):
        raise ValueError("params, grads, ms, vs and decays must have the same length")
    grads = list(grads)
    for i, (p, m, v) in enumerate(zip(params, ms, vs)):
        for a, what in ((p, "params"), (m, "ms"), (v, "vs")):  # updated in place
            _out_f32(a, f"{what}[{i}]", p.shape)
        grads[i] = _f32(grads[i], f"grads[{i}]")  # only read: a strided one may be copied
        if grads[i].shape != p.shape:
            raise ValueError(f"grads[{i}] has shape {grads[i].shape}, params[{i}] {p.shape}")
    # one launch per distinct decay factor (in practice two: decayed weights and the rest)
    groups = {}
    for i, d in enumerate(decays):
        groups.setdefault(float(d), []).append(i)
    kernel = get_kernel("adamw_kernel")
    for decay, idx in groups.items():
        sel = lambda arrays: [arrays[i] for i in idx]  # noqa: E731
        ptr_table, (sizes, chunk_tensor, chunk_start) = _adam_tables(
            cp, sel(params), sel(grads), sel(ms), sel(vs))
        n_chunks = chunk_tensor.size
        if n_chunks == 0:
            continue
        f32 = np.float32  # (1 - beta) in float64, then rounded: as the reference's scalars
        kernel((min(n_chunks, _MAX_GRID),), (_ADAM_THREADS,),
               (ptr_table, sizes, chunk_tensor, chunk_start,
                np.int32(len(idx)), np.int64(n_chunks), np.int64(_ADAM_CHUNK),
                f32(decay), f32(beta1), f32(1.0 - beta1), f32(beta2), f32(1.0 - beta2),
                f32(eps), f32(step_size), f32(sqrt_bias2)))


__all__ = ["KERNEL_NAMES", "load_module", "get_kernel", "read_source", "layernorm_forward",
           "layernorm_backward", "gelu_forward", "gelu_backward", "cross_entropy_forward",
           "cross_entropy_backward", "embedding_backward", "adamw_update"]
