"""The NumPy backend: xp = numpy on the CPU, the reference layers, OpenBLAS's GEMMs."""
from __future__ import annotations

import contextlib

import numpy as np

from gpt2np import layers as L

try:  # the standard way to reach the BLAS's thread count at run time (scikit-learn's)
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - then serial_blas() is a no-op
    ThreadpoolController = None

_controller = None

# A GEMM of up to this many multiply-adds (2^26) runs on one BLAS thread:
# OpenBLAS wakes and joins its threads on every call, which costs more than such a GEMM
# saves, and far more when the cores are busy. Bigger GEMMs (GPT-2's c_fc, every lm_head)
# keep all threads. numpy calls the BLAS once per matrix of a stack (attention's per-head
# products), so a stack counts by its matrices.
SERIAL_GEMM = 1 << 26


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
    def synchronize():
        pass

    @staticmethod
    def matmul(a, b, out=None, precision="fp32"):
        """a @ b in `precision` (gpt2np.layers.reference_matmul: tf32 and bf16 emulated by
        rounding the operands); a small GEMM on one BLAS thread (SERIAL_GEMM)."""
        if a.ndim >= 2 and b.ndim >= 2 and a.shape[-2] * a.shape[-1] * b.shape[-1] <= SERIAL_GEMM:
            with NumpyBackend.serial_blas():
                return L.reference_matmul(a, b, out=out, precision=precision)
        return L.reference_matmul(a, b, out=out, precision=precision)

    @staticmethod
    def matmul_operand(x, precision):
        return x  # the CPU rounds the operands of each product as it runs it

    @staticmethod
    def serial_blas():
        """A context in which the BLAS runs on one thread (threadpoolctl; without it, a
        no-op)."""
        global _controller
        if ThreadpoolController is None:
            return contextlib.nullcontext()
        if _controller is None:
            _controller = ThreadpoolController()
        return _controller.limit(limits=1, user_api="blas")

    @staticmethod
    def layer_ops(dtype):
        return L.REFERENCE_OPS  # the reference layers, whatever the dtype

    @staticmethod
    def adamw_update(dtype):
        return None  # gpt2np.optim's reference update, walking cache-sized blocks


_BACKEND = NumpyBackend()


def get():
    return _BACKEND
