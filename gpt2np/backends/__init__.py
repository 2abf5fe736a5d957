"""Array backends: what differs between NumPy and CuPy, and nothing else.

A backend is a small object with
  name            "numpy" | "cupy"
  xp              the array module (numpy or cupy)
  asarray(a, dtype=None)   host or device data -> this backend's array
  to_host(a)      -> numpy.ndarray
  scatter_add(out, idx, vals)   out[idx] += vals, accumulating repeated indices

The PyTorch reference model (gpt2np.backends.torch_reference) is not an array backend: it is the
gradient oracle, a separate nn.Module that loads and exports the same params dict.
"""
from __future__ import annotations

import importlib

# name -> module that defines `BACKEND`; imported lazily so numpy users never touch cupy
_ARRAY_BACKENDS = {
    "numpy": "gpt2np.backends.numpy_backend",
    "cupy": "gpt2np.backends.cupy_backend",
}
KNOWN_BACKENDS = tuple(_ARRAY_BACKENDS)


def get_backend(name: str):
    """The array backend called `name` ("numpy" or "cupy")."""
    if not isinstance(name, str) or name not in _ARRAY_BACKENDS:
        hint = ""
        if name == "torch":
            hint = (" ('torch' is the PyTorch reference model: use "
                    "gpt2np.backends.torch_reference.TorchGPT, or --backend torch in the training script)")
        raise ValueError(
            f"unknown backend {name!r}; known array backends: {', '.join(KNOWN_BACKENDS)}{hint}")
    return importlib.import_module(_ARRAY_BACKENDS[name]).get()


class KernelCache:
    """What a fused kernel's forward keeps for its backward.

    A backend with fused kernels (CuPy) returns one of these as a layer's cache; the layer's
    backward in gpt2np.layers sees the type and hands the work to `backward(dout, cache)`.
    """
    __slots__ = ("backward", "saved")

    def __init__(self, backward, *saved):
        self.backward = backward
        self.saved = saved


def backend_of(array):
    """The backend that owns `array` (numpy unless it is a cupy array)."""
    if type(array).__module__.startswith("cupy"):
        return get_backend("cupy")
    return get_backend("numpy")
