"""The NumPy backend: xp = numpy on the CPU."""
from __future__ import annotations

import contextlib

import numpy as np

try:  # the standard way to reach the BLAS's thread count at run time (scikit-learn's)
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - then serial_blas() is a no-op
    ThreadpoolController = None

_controller = None


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
