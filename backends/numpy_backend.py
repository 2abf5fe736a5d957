"""The NumPy backend: xp = numpy on the CPU."""
from __future__ import annotations

import numpy as np


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


_BACKEND = NumpyBackend()


def get():
    return _BACKEND
