"""The CuPy backend: xp = cupy, parameters and activations on an NVIDIA GPU.

The model code is the same `gpt2np` code as on the CPU; only the primitives that the array
API lacks live here (gpt2np.backends.Backend), with two ways to go faster than plain CuPy:
  - every matmul is one cuBLAS GEMM (strided-batched for attention's per-head products) in
    the precision asked for: float32, TF32, or bfloat16 operands with float32 accumulation
    and a float32 result, on the tensor cores (gpt2np/backends/gemm.py maps the layouts);
  - fused kernels for LayerNorm, attention, GELU, the softmax cross-entropy, the embedding
    backward and AdamW (gpt2np/backends/cupy_kernels.py, cupy_attention.py, cuda/*.cu),
    the layer ops and the optimizer update of float32 models. GPT2NP_FUSED=0 in the
    environment (or `backend.fused = False` before a model is made) turns them off, leaving
    the reference layer code on CuPy arrays.
"""
from __future__ import annotations

import contextlib
import math
import os
from dataclasses import replace

import numpy as np

from gpt2np import layers as L
from gpt2np.backends import cupy_attention, gemm
from gpt2np.backends import cupy_kernels as K

_INSTALL_HINT = (
    "the cupy backend needs CuPy and an NVIDIA GPU with a working CUDA driver; install the "
    "wheel that matches your CUDA toolkit: `pip install cupy-cuda12x` (CUDA 12) or "
    "`pip install cupy-cuda13x` (CUDA 13), or `pip install -e '.[cupy]'`")


def _import_cupy():
    try:
        import cupy
    except ImportError as e:  # not installed, or a wheel for the wrong CUDA
        raise RuntimeError(f"CuPy is not importable ({e}); {_INSTALL_HINT}") from e
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, or the runtime cannot talk to it
        raise RuntimeError(f"CuPy cannot reach a CUDA device ({e}); {_INSTALL_HINT}") from e
    if n == 0:
        raise RuntimeError(f"CuPy found no CUDA device; {_INSTALL_HINT}")
    return cupy


# The layer functions of a float32 model: the fused kernels, each with its reference's
# signature; the rest (the embedding's gather, linear and lm_head: cuBLAS GEMMs either way)
# is the reference code on CuPy arrays.
FUSED_OPS = replace(
    L.REFERENCE_OPS,
    embedding_backward=K.embedding_backward,  # deterministic, where atomics are not
    layernorm_forward=K.layernorm_forward, layernorm_backward=K.layernorm_backward,
    attention_forward=cupy_attention.attention_forward,
    attention_backward=cupy_attention.attention_backward,
    gelu_forward=K.gelu_forward, gelu_backward=K.gelu_backward,
    cross_entropy_forward=K.cross_entropy_forward,
    cross_entropy_backward=K.cross_entropy_backward)

# cuBLAS / CUDA enum values (cublas_api.h, library_types.h; unchanged since CUDA 11)
_CUDA_R_32F, _CUDA_R_16BF = 0, 14
_CUBLAS_COMPUTE_32F, _CUBLAS_COMPUTE_32F_FAST_TF32 = 68, 77
_CUBLAS_GEMM_DEFAULT = -1
_CUBLAS_POINTER_MODE_HOST = 0
_ONE = np.ones((), dtype=np.float32)  # alpha and beta, read from host memory by cuBLAS
_ZERO = np.zeros((), dtype=np.float32)


class CupyBackend:
    name = "cupy"

    def __init__(self):
        self.xp = _import_cupy()
        from cupy_backends.cuda.libs import cublas

        self._cublas = cublas
        self.fused = os.environ.get("GPT2NP_FUSED", "1") != "0"

    def asarray(self, a, dtype=None):
        return self.xp.asarray(a, dtype=dtype)  # host -> device copy when `a` is on the host

    def to_host(self, a):
        return self.xp.asnumpy(a) if isinstance(a, self.xp.ndarray) else np.asarray(a)

    def synchronize(self):
        self.xp.cuda.Device().synchronize()

    def serial_blas(self):
        return contextlib.nullcontext()  # no host BLAS to hold back

    def decoding(self):
        return contextlib.nullcontext()  # the GPU's products are cuBLAS's to run

    # ------------------------------------------------------------------ fused kernels

    def layer_ops(self, dtype):
        """FUSED_OPS for float32 (the kernels are float32), unless fused is off; the
        reference layers otherwise."""
        return FUSED_OPS if self.fused and np.dtype(dtype) == np.float32 else L.REFERENCE_OPS

    def adamw_update(self, dtype):
        """The multi-tensor AdamW kernel for float32 params, unless fused is off."""
        return K.adamw_update if self.fused and np.dtype(dtype) == np.float32 else None

    # ------------------------------------------------------------------ matmul

    def matmul(self, a, b, out=None, precision="fp32"):
        """a (..., M, K) @ b (..., K, N) -> float32 (..., M, N) as one cuBLAS call.

        fp32: float32 GEMM; tf32: float32 operands read as TF32 by the tensor cores; bf16:
        the operands cast to bfloat16 (round to nearest even; an operand that is already
        the uint16 output of to_bf16 is used as it is), float32 accumulation and result.
        Leading (batch) axes must match; operands whose batch axes do not collapse to one
        stride (attention's q, k, v views of qkv) are copied first.
        """
        cp = self.xp
        if cp.uint16 in (a.dtype, b.dtype) and precision != "bf16":
            raise TypeError("uint16 operands are bfloat16 bits from to_bf16: they need "
                            f"precision 'bf16', not {precision!r}")
        if a.dtype not in (cp.float32, cp.uint16) or b.dtype not in (cp.float32, cp.uint16):
            if precision != "fp32":
                raise TypeError(f"precision {precision!r} needs float32 operands, got "
                                f"{a.dtype} and {b.dtype}")
            return cp.matmul(a, b, out=out)  # float64: CuPy's own (DGEMM)
        if (a.ndim < 2 or a.ndim != b.ndim or a.shape[:-2] != b.shape[:-2]
                or a.shape[-1] != b.shape[-2] or 0 in a.shape or 0 in b.shape):
            if precision != "fp32":
                raise ValueError(f"matmul in {precision} takes (..., M, K) @ (..., K, N) with "
                                 f"equal batch axes, got {a.shape} @ {b.shape}")
            return cp.matmul(a, b, out=out)
        if precision == "bf16":
            # an operand already cast (uint16 bits) is used as it is: a caller multiplying
            # one array twice (attention's dS) casts it once
            a = a if a.dtype == cp.uint16 else self.to_bf16(a)
            b = b if b.dtype == cp.uint16 else self.to_bf16(b)
        elif precision not in ("tf32", "fp32"):
            raise ValueError(f"unknown precision {precision!r}")
        a, la = self._gemm_operand(a)
        b, lb = self._gemm_operand(b)
        shape = a.shape[:-2] + (a.shape[-2], b.shape[-1])
        c, lc = out, None
        if c is not None and c.dtype == cp.float32 and tuple(c.shape) == shape:
            lc = gemm.output_layout(c.shape, c.strides, c.itemsize)  # written in place
        if lc is None:
            c = cp.empty(shape, dtype=cp.float32)
            lc = gemm.output_layout(c.shape, c.strides, c.itemsize)
        self._cublas_gemm(gemm.plan(a.shape, la, b.shape, lb, lc), a, b, c, precision)
        if out is not None and c is not out:
            out[...] = c  # an out= cuBLAS cannot write (wrong dtype, columns strided): a copy
            return out
        return c

    def _cublas_gemm(self, call, a, b, c, precision):
        """c = a @ b as cublasGemmStridedBatchedEx in `precision` (bf16: a, b are bf16 bits)."""
        ab_type, compute = {"fp32": (_CUDA_R_32F, _CUBLAS_COMPUTE_32F),
                            "tf32": (_CUDA_R_32F, _CUBLAS_COMPUTE_32F_FAST_TF32),
                            "bf16": (_CUDA_R_16BF, _CUBLAS_COMPUTE_32F)}[precision]
        cublas = self._cublas
        handle = self.xp.cuda.device.get_cublas_handle()
        # alpha and beta live in host memory: make sure the shared handle reads them there
        mode = cublas.getPointerMode(handle)
        if mode != _CUBLAS_POINTER_MODE_HOST:
            cublas.setPointerMode(handle, _CUBLAS_POINTER_MODE_HOST)
        try:
            cublas.gemmStridedBatchedEx(
                handle, call.transa, call.transb, call.m, call.n, call.k, _ONE.ctypes.data,
                b.data.ptr, ab_type, call.lda, call.stride_a,  # cuBLAS's A is our b (gemm.py)
                a.data.ptr, ab_type, call.ldb, call.stride_b,
                _ZERO.ctypes.data, c.data.ptr, _CUDA_R_32F, call.ldc, call.stride_c,
                call.batch, compute, _CUBLAS_GEMM_DEFAULT)
        finally:
            if mode != _CUBLAS_POINTER_MODE_HOST:
                cublas.setPointerMode(handle, mode)

    def matmul_operand(self, x, precision):
        """x for several matmuls in `precision`: in bf16 its bf16 bits, cast once."""
        return self.to_bf16(x) if precision == "bf16" and x.dtype == self.xp.float32 else x

    def _gemm_operand(self, x):
        lay = gemm.operand_layout(x.shape, x.strides, x.itemsize)
        if lay is None:
            x = self.xp.ascontiguousarray(x)
            lay = gemm.operand_layout(x.shape, x.strides, x.itemsize)
        return x, lay

    def to_bf16(self, x):
        """float32 x -> its bfloat16 bits (uint16), same shape. A C-contiguous x, or a
        transposed view of one (weight.T, att^T), keeps its layout: no extra copy."""
        cp = self.xp
        if not x.flags.c_contiguous and x.ndim >= 2 and x.swapaxes(-1, -2).flags.c_contiguous:
            return self.to_bf16(x.swapaxes(-1, -2)).swapaxes(-1, -2)
        x = cp.ascontiguousarray(x)
        y = cp.empty(x.shape, dtype=cp.uint16)
        n = x.size
        if n:
            threads = 256
            blocks = min(math.ceil(n / threads), 65535 * 4)
            kernel = K.load_module("convert.cu").get_function("f32_to_bf16")
            kernel((blocks,), (threads,), (x, y, np.int64(n)))
        return y


_BACKEND = None


def get():
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = CupyBackend()
    return _BACKEND
