"""Array backends: what differs between NumPy and CuPy, and nothing else.

Every backend implements `Backend` below, all of it: the rest of gpt2np asks a backend for
what it needs and never probes for what it might have. The PyTorch reference model
(gpt2np.backends.torch_reference) is not an array backend: it is the gradient oracle, a
separate nn.Module that loads and exports the same params dict.
"""
from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING, Callable, ContextManager, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np

    from gpt2np.layers import LayerOps

# name -> module that defines `get()`; imported lazily so numpy users never touch cupy
_ARRAY_BACKENDS = {
    "numpy": "gpt2np.backends.numpy_backend",
    "cupy": "gpt2np.backends.cupy_backend",
}
KNOWN_BACKENDS = tuple(_ARRAY_BACKENDS)


@runtime_checkable
class Backend(Protocol):
    """What a backend is: every member the rest of gpt2np uses, each with its contract."""

    name: str  # "numpy" | "cupy"
    xp: ModuleType  # the array module (numpy or cupy)

    def asarray(self, a, dtype=None):
        """Host or device data -> this backend's array (a copy when it comes from the host)."""

    def to_host(self, a) -> np.ndarray:
        """An array of this backend (or a host one) -> numpy.ndarray."""

    def synchronize(self) -> None:
        """Wait until the device has finished the work queued so far (CPU: nothing)."""

    def matmul(self, a, b, out=None, precision: str = "fp32"):
        """a (..., M, K) @ b (..., K, N) -> (..., M, N) in `precision` ("fp32" | "tf32" |
        "bf16": operands rounded so, float32 accumulation and result), into `out` if given.
        gpt2np.layers.matmul calls it inside `matmul_precision(precision, backend)`."""

    def matmul_operand(self, x, precision: str):
        """x prepared for several matmuls in `precision`: the form `matmul` reads fastest
        (CuPy in bf16: its bfloat16 bits, cast once); elsewhere x itself."""

    def serial_blas(self) -> ContextManager:
        """A context in which the host BLAS runs on one thread (a no-op without one)."""

    def decoding(self) -> ContextManager:
        """A context around one step of generation (one new position for the batch): the
        backend may choose how that step's products run, by timing the steps (numpy: on
        its own threads or on the BLAS's); a no-op elsewhere."""

    def layer_ops(self, dtype) -> LayerOps:
        """The layer functions for arrays of `dtype`: gpt2np.layers.REFERENCE_OPS, with
        fused kernels in place of some where the backend has them (each with the
        reference's signature and contract). A model asks once, when it is made."""

    def adamw_update(self, dtype) -> Callable | None:
        """The fused multi-tensor AdamW update for params of `dtype` (the signature of
        gpt2np.backends.cupy_kernels.adamw_update), or None: then gpt2np.optim's reference
        update runs."""


def get_backend(name: str) -> Backend:
    """The array backend called `name` ("numpy" or "cupy")."""
    if not isinstance(name, str) or name not in _ARRAY_BACKENDS:
        hint = ""
        if name == "torch":
            hint = (" ('torch' is the PyTorch reference model: use "
                    "gpt2np.backends.torch_reference.TorchGPT, or --backend torch in the training script)")
        raise ValueError(
            f"unknown backend {name!r}; known array backends: {', '.join(KNOWN_BACKENDS)}{hint}")
    return importlib.import_module(_ARRAY_BACKENDS[name]).get()


def backend_of(array) -> Backend:
    """The backend that owns `array` (numpy unless it is a cupy array)."""
    if type(array).__module__.startswith("cupy"):
        return get_backend("cupy")
    return get_backend("numpy")
