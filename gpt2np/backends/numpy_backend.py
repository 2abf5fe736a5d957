"""The NumPy backend: xp = numpy on the CPU, OpenBLAS's GEMMs, and for float32 the threaded,
cache-blocked kernels of gpt2np.backends.numpy_kernels (float64, the precision the
gradients are checked in, runs the reference layers themselves)."""
from __future__ import annotations

import time

import numpy as np

from gpt2np import layers as L
from gpt2np.backends import numpy_kernels as K

# A GEMM of up to this many multiply-adds (2^26) runs on one BLAS thread:
# waking other threads costs more than such a GEMM saves, and far more when the cores are
# busy. Bigger GEMMs (GPT-2's c_fc, every lm_head) are cut into pieces for the kernels'
# threads (numpy_kernels.threaded_matmul), so that the BLAS's own threads never run: after
# each call they would spin, waiting for the next, on the cores the kernels need. numpy
# calls the BLAS once per matrix of a stack (attention's per-head products), so a stack
# counts by its matrices.
SERIAL_GEMM = 1 << 26
# A product of a few rows with a big matrix (generation's matrix-vector products) reads the
# matrix once and does little arithmetic per byte: its speed is memory bandwidth, which two
# cores have more of than one. Such products run as numpy_kernels.streamed_matmul.
STREAM_ROWS = 8
STREAM_BYTES = 1 << 20


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
        rounding the operands); a small GEMM on one BLAS thread (SERIAL_GEMM), a product of
        few rows with a big matrix in slices on the threads (STREAM_*), a bigger one in
        pieces on the threads (numpy_kernels.threaded_matmul)."""
        if a.ndim >= 2 and b.ndim >= 2 and not DECODING.on_blas:
            m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
            if m <= STREAM_ROWS and b.ndim == 2 and k * n * b.itemsize >= STREAM_BYTES:
                return K.streamed_matmul(a, b, out=out, precision=precision)
            if m * k * n <= SERIAL_GEMM:
                with NumpyBackend.serial_blas():
                    return L.reference_matmul(a, b, out=out, precision=precision)
            return K.threaded_matmul(a, b, out=out, precision=precision)
        return L.reference_matmul(a, b, out=out, precision=precision)

    @staticmethod
    def matmul_operand(x, precision):
        return x  # the CPU rounds the operands of each product as it runs it

    @staticmethod
    def serial_blas():
        """A context in which the BLAS runs on one thread (threadpoolctl; without it, a
        no-op)."""
        return K.BLAS.serial()

    @staticmethod
    def decoding():
        """DECODING: a generation step's products on the threads that ran such steps
        fastest."""
        return DECODING

    @staticmethod
    def layer_ops(dtype):
        """float32: the kernels of gpt2np.backends.numpy_kernels (threads, cache blocks)
        for attention, GELU, the cross-entropy and generation's LayerNorm, the reference
        for the rest;
        float64: the reference layers (what the gradient checks test, and patch)."""
        return K.CPU_OPS if np.dtype(dtype) == np.float32 else L.REFERENCE_OPS

    @staticmethod
    def adamw_update(dtype):
        """float32: numpy_kernels.adamw_update (the reference update in blocks, on the
        threads); float64: None, gpt2np.optim's own update."""
        return K.adamw_update if np.dtype(dtype) == np.float32 else None


class DecodeTuner:
    """Which threads run a generation step's products, chosen by timing the steps.

    A step (one new position) is ~50 matrix-vector products, each reading a weight once.
    On the kernels' threads (numpy_kernels.streamed_matmul, every other product on one
    BLAS thread), a helper thread must be woken for each product; the BLAS's own threads
    wait for the next call busy, so they take it at once, and on an idle machine a step ran
    1.5x faster on them; but when other jobs hold a core, the BLAS's calls wait for their
    slowest thread and a step ran 1.8x slower there. So each cycle starts with TRIAL steps
    on each (the first of each is not counted: the threads change over) and runs the rest
    on the one whose counted steps took less (median). The trials on the slower threads
    are the tuner's cost: after a clear choice (CLEAR times faster) the next cycle is twice
    as long, up to LONGEST steps; after a close one it is CYCLE steps again."""

    CYCLE, TRIAL, LONGEST, CLEAR = 64, 4, 1024, 1.25
    clock = staticmethod(time.perf_counter)

    def __init__(self):
        self.on_blas = False  # read by NumpyBackend.matmul
        self.step = 0
        self.start, self.cycle = 0, self.CYCLE  # the current cycle's first step and length
        self.times = {False: [], True: []}  # on_blas -> counted step times of this cycle
        self.choice = False  # on_blas after this cycle's trials
        self._serial = None
        self._t0 = 0.0

    def _median(self, on_blas):
        return float(np.median(self.times[on_blas]))

    def _next_cycle(self):
        slower, faster = sorted((self._median(False), self._median(True)), reverse=True)
        clear = faster * self.CLEAR <= slower
        self.start += self.cycle
        self.cycle = min(2 * self.cycle, self.LONGEST) if clear else self.CYCLE
        self.times = {False: [], True: []}

    def __enter__(self):
        if self.step - self.start >= self.cycle:
            self._next_cycle()
        i = self.step - self.start
        if i < 2 * self.TRIAL:
            self.on_blas = i >= self.TRIAL
        else:  # the trials are over: their choice, made once a cycle
            if i == 2 * self.TRIAL:
                self.choice = self._median(True) < self._median(False)
            self.on_blas = self.choice
        if not self.on_blas:  # the kernels' threads: the BLAS on one thread, set once a step
            self._serial = K.BLAS.serial()
            self._serial.__enter__()
        self._t0 = self.clock()
        return self

    def __exit__(self, *exc):
        dt = self.clock() - self._t0
        if self._serial is not None:
            self._serial.__exit__(*exc)
            self._serial = None
        i = self.step - self.start
        if i < 2 * self.TRIAL and i % self.TRIAL != 0:
            self.times[self.on_blas].append(dt)
        self.on_blas = False
        self.step += 1


DECODING = DecodeTuner()
_BACKEND = NumpyBackend()
K.keep_freed_memory()


def get():
    return _BACKEND
