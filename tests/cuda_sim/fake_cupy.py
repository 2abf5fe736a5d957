"""A stand-in for CuPy on the CPU, for running the CuPy backend's own code in tests.

`install(monkeypatch)` puts modules named cupy and cupy_backends.cuda.libs.cublas into
sys.modules: arrays are NumPy arrays of a subclass that `backends.backend_of` and
`layers.get_xp` take for device arrays (its module is "cupy") and whose `.data.ptr` is the host address; RawModule
builds the kernels with the CUDA simulator (tests/cuda_sim); cuBLAS's strided-batched GEMM
is computed from raw memory with cuBLAS's column-major semantics. What this checks is the
backend's Python side and the kernels' logic together; real CuPy, NVRTC and cuBLAS on a GPU
are for tests/test_cupy.py.
"""
from __future__ import annotations

import ctypes
import sys
import time
import types

import numpy as np

from gpt2np.layers import round_mantissa

from . import SimModule


class _Ptr:
    def __init__(self, ptr):
        self.ptr = ptr


class _Event:
    """cupy.cuda.Event: record() notes the host clock (launches here are synchronous)."""

    def __init__(self, *args, **kwargs):
        self.time = None

    def record(self, stream=None):
        self.time = time.perf_counter()

    def synchronize(self):
        pass


class ndarray(np.ndarray):
    """A "device" array: NumPy underneath."""

    @property
    def data(self):
        return _Ptr(self.ctypes.data)


ndarray.__module__ = "cupy"  # what backends.backend_of and layers.get_xp look at


def _dev(x):
    if type(x) is np.ndarray:
        return x.view(ndarray)
    if isinstance(x, np.generic):  # CuPy returns 0-d arrays where NumPy returns scalars
        return np.asarray(x).view(ndarray)
    if isinstance(x, tuple):
        return tuple(_dev(v) for v in x)
    return x


def _function(f):
    def wrapped(*args, **kwargs):
        return _dev(f(*args, **kwargs))

    wrapped.__name__ = getattr(f, "__name__", "f")
    return wrapped


def _asarray(a, dtype=None, order=None, **kw):
    # host -> device is a copy on a GPU: a host array handed in must not share memory
    if isinstance(a, ndarray):
        return np.asarray(a, dtype=dtype, order=order).view(ndarray)
    return np.array(a, dtype=dtype, order=order or "K", copy=True).view(ndarray)


def _module_getattr(name):
    obj = getattr(np, name)
    if callable(obj) and not isinstance(obj, (type, np.ufunc)):
        return _function(obj)
    return obj


_modules = {}


def _build():
    cp = types.ModuleType("cupy")
    cp.__getattr__ = _module_getattr
    cp.ndarray = ndarray
    cp.asnumpy = lambda a: np.array(a).view(np.ndarray)
    cp.asarray = _asarray
    cp.RawModule = SimModule
    cp.RawKernel = lambda code, name, **kw: SimModule(code).get_function(name)
    cp.get_default_memory_pool = lambda: types.SimpleNamespace(total_bytes=lambda: 0,
                                                               used_bytes=lambda: 0,
                                                               free_all_blocks=lambda: None)
    cp.cuda = types.SimpleNamespace(
        runtime=types.SimpleNamespace(getDeviceCount=lambda: 1, getDevice=lambda: 0),
        Device=lambda *a: types.SimpleNamespace(synchronize=lambda: None, id=0),
        device=types.SimpleNamespace(get_cublas_handle=lambda: 0),
        Event=_Event,  # every launch is synchronous here: host clocks
        get_elapsed_time=lambda a, b: 1e3 * (b.time - a.time),
    )
    cublas = types.ModuleType("cupy_backends.cuda.libs.cublas")
    cublas.gemmStridedBatchedEx = gemm_strided_batched_ex
    cublas.getPointerMode = lambda handle: _pointer_mode[0]
    cublas.setPointerMode = lambda handle, mode: _pointer_mode.__setitem__(0, mode)
    pkgs = {name: types.ModuleType(name) for name in
            ("cupy_backends", "cupy_backends.cuda", "cupy_backends.cuda.libs")}
    pkgs["cupy_backends"].cuda = pkgs["cupy_backends.cuda"]
    pkgs["cupy_backends.cuda"].libs = pkgs["cupy_backends.cuda.libs"]
    pkgs["cupy_backends.cuda.libs"].cublas = cublas
    return {"cupy": cp, "cupy_backends.cuda.libs.cublas": cublas, **pkgs}


def install(monkeypatch):
    """Make `import cupy` (and the backend's other CuPy imports) give the CPU stand-ins
    for this test, with a fresh CuPy backend; undone by monkeypatch at the test's end."""
    import gpt2np.backends.cupy_backend as cb

    if not _modules:
        _modules.update(_build())
    for name, mod in _modules.items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setattr(cb, "_BACKEND", None)
    clear_caches()
    return _modules["cupy"]


def clear_caches():
    """Forget kernels built so far: those of the simulator must not outlive it, nor the
    real GPU's leak into it."""
    import gpt2np.backends.cupy_attention as att
    import gpt2np.backends.cupy_kernels as ck

    for module in (ck, att):
        for name, value in vars(module).items():
            if hasattr(value, "cache_clear"):
                value.cache_clear()
            elif name.endswith("_tables") and isinstance(value, dict):
                value.clear()  # e.g. AdamW's pointer tables, keyed by addresses


# ------------------------------------------------------------------------------- cuBLAS

_TYPES = {0: (np.float32, 4), 14: ("bf16", 2)}  # CUDA_R_32F, CUDA_R_16BF
_pointer_mode = [0]  # the handle's: 0 host, 1 device


def _read(ptr, cuda_type, rows, cols, ld, stride, batch):
    """(batch, rows, cols) float64 from column-major memory at ptr."""
    kind, size = _TYPES[cuda_type]
    n = (batch - 1) * stride + (cols - 1) * ld + rows  # elements spanned
    raw = np.ctypeslib.as_array((ctypes.c_uint8 * (n * size)).from_address(ptr))
    if kind == "bf16":
        vals = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        vals = raw.view(np.float32)
    out = np.lib.stride_tricks.as_strided(vals, shape=(batch, rows, cols),
                                          strides=(stride * 4, 4, ld * 4))
    return out.astype(np.float64)


def gemm_strided_batched_ex(handle, transa, transb, m, n, k, alpha, A, Atype, lda, strideA,
                            B, Btype, ldb, strideB, beta, C, Ctype, ldc, strideC, batch,
                            compute, algo):
    """C_i = alpha * op(A_i) @ op(B_i) + beta * C_i, column-major, as cuBLAS computes it."""
    assert Ctype == 0, "the backend writes float32 results"
    assert _pointer_mode[0] == 0, "alpha and beta are host pointers: the handle must say so"
    a_shape = (m, k) if transa == 0 else (k, m)
    b_shape = (k, n) if transb == 0 else (n, k)
    for ld, shape, what in ((lda, a_shape, "lda"), (ldb, b_shape, "ldb"), (ldc, (m, n), "ldc")):
        if ld < max(1, shape[0]):  # cuBLAS's own argument check
            raise ValueError(f"cuBLAS: {what}={ld} < rows {shape[0]} (CUBLAS_STATUS_INVALID_VALUE)")
    opA = _read(A, Atype, *a_shape, lda, strideA, batch)
    opB = _read(B, Btype, *b_shape, ldb, strideB, batch)
    if transa:
        opA = opA.transpose(0, 2, 1)
    if transb:
        opB = opB.transpose(0, 2, 1)
    if compute == 77:  # CUBLAS_COMPUTE_32F_FAST_TF32: the tensor cores read TF32 operands
        opA = round_mantissa(opA.astype(np.float32), 10).astype(np.float64)
        opB = round_mantissa(opB.astype(np.float32), 10).astype(np.float64)
    al = ctypes.c_float.from_address(alpha).value
    be = ctypes.c_float.from_address(beta).value
    n_el = (batch - 1) * strideC + (n - 1) * ldc + m
    cmem = np.ctypeslib.as_array((ctypes.c_float * n_el).from_address(C))
    c = np.lib.stride_tricks.as_strided(cmem, shape=(batch, m, n), strides=(strideC * 4, 4, ldc * 4))
    result = al * (opA @ opB)
    if be != 0.0:
        result += be * c
    c[...] = result.astype(np.float32)
