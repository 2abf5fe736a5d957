"""The CuPy backend: xp = cupy, parameters and activations on an NVIDIA GPU.

The model code is the same `gpt2np` layer code as on the CPU; only the primitives that the
array API lacks live here.
"""
from __future__ import annotations

import numpy as np

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


class CupyBackend:
    name = "cupy"

    def __init__(self):
        self.xp = _import_cupy()
        import cupyx

        self._cupyx = cupyx

    def asarray(self, a, dtype=None):
        return self.xp.asarray(a, dtype=dtype)  # host -> device copy when `a` is on the host

    def to_host(self, a):
        return self.xp.asnumpy(a) if isinstance(a, self.xp.ndarray) else np.asarray(a)

    def scatter_add(self, out, idx, vals):
        # atomicAdd-based; float32 sums are not bit-deterministic across runs
        self._cupyx.scatter_add(out, idx, vals)

    def synchronize(self):
        self.xp.cuda.Device().synchronize()


_BACKEND = None


def get():
    global _BACKEND
    if _BACKEND is None:
        _BACKEND = CupyBackend()
    return _BACKEND
