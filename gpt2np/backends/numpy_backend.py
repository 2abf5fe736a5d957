"""The NumPy backend: xp = numpy on the CPU."""
from __future__ import annotations

import contextlib

import numpy as np

try:  # the standard way to reach the BLAS's thread count at run time (scikit-learn's)
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - then serial_blas() is a no-op
    ThreadpoolController = None

_controller = None

# mantissa bits a float32 operand keeps in each matmul precision (float32 has 23)
MANTISSA_BITS = {"tf32": 10, "bf16": 7}


def round_mantissa(a, bits: int):
    """float32 `a` rounded to `bits` mantissa bits, to nearest with ties to even, as a new
    float32 array: the value a TF32 (bits=10) or bfloat16 (bits=7) operand holds.

    Works on the bit pattern: add half an ulp of the shorter format (minus one, plus the
    kept lowest bit, which makes ties go to even), then clear the dropped bits. A carry out
    of the mantissa bumps the exponent, which is exactly right, up to inf for the largest
    values. NaNs stay NaNs.
    """
    drop = 23 - bits
    a = np.asarray(a, dtype=np.float32)
    u = np.array(a, dtype=np.float32, order="C").view(np.uint32)  # a copy: ours to change
    nan = np.isnan(a)
    half = np.uint32((1 << (drop - 1)) - 1)
    u += half + ((u >> np.uint32(drop)) & np.uint32(1))
    u &= np.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
    r = u.view(np.float32)
    if nan.any():
        r[nan] = np.nan
    return r


class NumpyBackend:
    name = "numpy"
    xp = np

    @staticmethod
    def asarray(a, dtype=None):
        return np.asarray(a, dtype=dtype)

    @staticmethod
    def to_host(a):
        return np.asarray(a)

    @staticmethod
    def scatter_add(out, idx, vals):
        # out (V, C), idx (N,) int, vals (N, C): out[idx[n]] += vals[n], repeats accumulate.
        # ufunc.at has a fast path since numpy 1.25 and is deterministic (sequential order).
        np.add.at(out, idx, vals)

    @staticmethod
    def synchronize():
        pass

    @staticmethod
    def matmul(a, b, out=None, precision="fp32"):
        """a @ b in `precision`. The CPU has no TF32 or bf16 GEMM, so those are emulated:
        the operands are rounded as the tensor cores would see them, then multiplied in
        float32. A product of two such numbers is exact in float32, so this is the GPU's
        arithmetic up to the order of the float32 additions."""
        if precision == "fp32":
            return np.matmul(a, b, out=out)
        if a.dtype != np.float32 or b.dtype != np.float32:
            raise TypeError(f"precision {precision!r} needs float32 operands, got "
                            f"{a.dtype} and {b.dtype}")
        bits = MANTISSA_BITS[precision]
        return np.matmul(round_mantissa(a, bits), round_mantissa(b, bits), out=out)

    @staticmethod
    def serial_blas():
        """A context in which the BLAS runs on one thread.

        For small GEMMs, and stacks of them (attention's per-head (T,hs) @ (hs,T): numpy
        calls the BLAS once per matrix): OpenBLAS wakes and joins its threads on every
        call. On the shared 2-core box that hand-off cost more than the GEMMs, and with the
        cores busy far more: a (8,4,128,32) stack took 30-1000 ms on two threads against
        0.8 ms on one. gpt2np.layers decides which GEMMs are small. Without threadpoolctl
        this does nothing.
        """
        global _controller
        if ThreadpoolController is None:
            return contextlib.nullcontext()
        if _controller is None:
            _controller = ThreadpoolController()
        return _controller.limit(limits=1, user_api="blas")


_BACKEND = NumpyBackend()


def get():
    return _BACKEND
