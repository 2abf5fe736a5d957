"""The numpy backend's kernels: gpt2np.layers' math on every core, in cache-sized pieces.

NumPy runs each operation on one core and streams whole arrays through memory once per
operation. The kernels here cut a layer's work into independent pieces (blocks of rows,
groups of attention heads, blocks of an AdamW update, slices of a matrix), each small
enough for the caches, so that a chain of operations reads memory once; and they share the
pieces among threads.
NumPy releases the GIL inside its ufunc loops, reductions and BLAS calls, so the threads
run on different cores. While they run, each BLAS call keeps to one thread (its own
threads would fight ours for the same cores).

The pieces are fixed by sizes, never by the number of threads, so a result does not depend
on how many threads computed it. Each kernel has the signature and contract of its
reference in gpt2np.layers (or gpt2np.optim's update), and gives the same numbers bit for
bit, except attention, whose docstring says what differs. tests/test_speed_paths.py checks
every one against its reference.
"""
from __future__ import annotations

import contextvars
import functools
import itertools
import math
import os
import queue
import threading

import numpy as np

from gpt2np import layers as L

try:  # the standard way to reach the BLAS's thread count at run time (scikit-learn's)
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - then the BLAS is left alone and no threads run
    ThreadpoolController = None


# --------------------------------------------------------------------------------------
# the BLAS's threads


class _BlasThreads:
    """Get and set the BLAS's thread count (every BLAS threadpoolctl finds), directly
    through its controllers: a threadpoolctl limit context looks the libraries up again
    each time, which costs about as much as one of generation's small products."""

    def __init__(self):
        self._controllers = None
        self._lock = threading.Lock()
        self._depth = 0  # nested serial() contexts, over all threads
        self._saved = []

    def controllers(self):
        if self._controllers is None:
            found = [] if ThreadpoolController is None else \
                ThreadpoolController().select(user_api="blas").lib_controllers
            self._controllers = found
        return self._controllers

    def count(self) -> int:
        """The BLAS's thread setting (os.cpu_count() where no BLAS is found, 1 without
        threadpoolctl); inside serial(), the setting serial() found. The threads of the
        kernels below follow it: limit the BLAS (threadpoolctl) and they are limited too."""
        with self._lock:
            if self._depth:
                return max([n for _, n in self._saved], default=1)
        found = self.controllers()
        if not found:
            return 1 if ThreadpoolController is None else (os.cpu_count() or 1)
        return max(c.get_num_threads() for c in found)

    def serial(self):
        """A context with the BLAS on one thread inside; the first of nested contexts (from
        any thread) sets it, the last one out restores it. (This object itself: a plain
        context, cheaper than a generator's, since every small matmul enters it.)"""
        return self

    def __enter__(self):
        with self._lock:
            if self._depth == 0:
                self._saved = [(c, c.get_num_threads()) for c in self.controllers()]
                for c, _ in self._saved:
                    c.set_num_threads(1)
            self._depth += 1

    def __exit__(self, *exc):
        with self._lock:
            self._depth -= 1
            if self._depth == 0:
                for c, n in self._saved:
                    c.set_num_threads(n)


BLAS = _BlasThreads()


# --------------------------------------------------------------------------------------
# the C heap

# glibc's malloc settings (mallopt's parameter numbers) for a step's temporaries:
# arrays up to 32 MiB (its largest mmap threshold) come from the heap, and freed memory
# stays with the process for the next step's arrays instead of going back to the system.
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
MALLOC_SETTINGS = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 1 << 30),
                   (_M_TOP_PAD, 64 << 20))


def keep_freed_memory() -> bool:
    """Set MALLOC_SETTINGS, once per process, where the C library is glibc; True if set.
    By default glibc gives memory back to the system when the top of its heap has a few
    tens of MB free and maps big arrays afresh each time: each array of a step (tens of MB
    of activations and temporaries) then faults in new pages, which the kernel zeroes
    first, at a cost that grows with the model (a tenth of a GPT-2 124M step's time). The
    process's resident memory then stays at its peak, which training reaches every step."""
    global _MALLOC_SET
    if _MALLOC_SET is None:
        _MALLOC_SET = False
        if os.environ.get("GPT2NP_DEFAULT_MALLOC") != "1":
            try:
                import ctypes

                libc = ctypes.CDLL(None)
                _MALLOC_SET = hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version") \
                    and all(libc.mallopt(k, v) == 1 for k, v in MALLOC_SETTINGS)
            except OSError:  # pragma: no cover - no C library to ask
                pass
    return _MALLOC_SET


_MALLOC_SET = None


# --------------------------------------------------------------------------------------
# the threads


class _Threads:
    """Worker threads that run the pieces of a kernel with the calling thread."""

    def __init__(self):
        self._jobs = None  # the helpers' queue of jobs
        self._pid = None
        self._local = threading.local()

    def _submit(self, job):
        # a SimpleQueue and bare daemon threads: a generation step submits ~50 jobs, and an
        # executor's futures and bookkeeping cost more than the wake-up itself
        if self._jobs is None or self._pid != os.getpid():  # a forked child has no threads
            self._jobs, self._pid = queue.SimpleQueue(), os.getpid()
            for i in range(max(1, (os.cpu_count() or 1) - 1)):
                threading.Thread(target=self._serve, args=(self._jobs,), daemon=True,
                                 name=f"gpt2np-{i}").start()
        self._jobs.put(job)

    @staticmethod
    def _serve(jobs):
        while True:
            jobs.get()()

    def run(self, fn, tasks):
        """fn(task) for every task, on as many threads as the BLAS may use (this one among
        them), each taking the next task when it is done: a thread that the operating
        system holds back (other jobs on the cores) does less, and a helper that has not
        started by the time the tasks are done is not waited for. Inside a task, nested
        run()s are serial, and so is every BLAS call (on any number of threads: the same
        results). The first exception of a task is raised here."""
        tasks = list(tasks)
        n = min(len(tasks), BLAS.count())
        if n <= 1 or getattr(self._local, "busy", False):
            with BLAS.serial():  # a task's products on one thread, however many run it
                for task in tasks:
                    fn(task)
            return
        ticket, errors = itertools.count(), []  # next(): atomic under the GIL, no lock
        finished = [0]  # tasks done, summed as each thread leaves
        done = threading.Condition()

        def worker():
            self._local.busy = True
            mine = 0
            try:
                while not errors:
                    i = next(ticket)
                    if i >= len(tasks):
                        break
                    fn(tasks[i])
                    mine += 1
            except BaseException as e:  # noqa: BLE001 - handed to the caller below
                errors.append(e)
            finally:
                self._local.busy = False
                with done:
                    finished[0] += mine
                    done.notify_all()

        with BLAS.serial():
            for _ in range(n - 1):  # each sees the caller's context: the matmul precision
                self._submit(functools.partial(contextvars.copy_context().run, worker))
            worker()
            with done:
                done.wait_for(lambda: finished[0] == len(tasks) or errors)
        if errors:
            raise errors[0]


THREADS = _Threads()


def _row_blocks(n_rows, row_bytes, block_bytes):
    # [r0, r1) blocks of about block_bytes each (at least one row)
    step = max(1, block_bytes // max(1, row_bytes))
    return [slice(r, min(n_rows, r + step)) for r in range(0, n_rows, step)]


# Bytes of one input per piece of a row-wise layer: with the layer's outputs and temporaries
# a piece stays in the caches (L2 and the L3 share of a core), and there are few enough
# pieces that calling numpy for each costs little beside their arithmetic.
ROW_BLOCK_BYTES = 256 << 10


# --------------------------------------------------------------------------------------
# a product of few rows with a big matrix: its columns in slices on the threads

# Bytes of the matrix per slice, about: GPT-2 124M's matrices make 2 slices each (at least
# 2, for two threads to share) and its lm_head 36; every slice is one BLAS call.
STREAM_SLICE_BYTES = 4 << 20


def streamed_matmul(a, b, out=None, precision="fp32"):
    """a (..., m, k) @ b (k, n) for a few rows m (generation's matrix-vector products):
    b's columns in slices of about STREAM_SLICE_BYTES (at least two, each a multiple of 64
    columns), each one single-threaded BLAS call, shared among the threads. Such a product
    reads b once and does little arithmetic per byte: two cores stream it faster than one.
    (OpenBLAS's own threads split it too, but each call waits for all of them: on cores
    that other jobs keep busy, that wait is a scheduler time slice, many times the
    product's own time.)"""
    n = b.shape[-1]
    slices = max(2, b.shape[0] * n * b.itemsize // STREAM_SLICE_BYTES)
    step = -(-n // slices // 64) * 64 or 64  # a multiple of 64 columns
    if out is None:
        out = np.empty(a.shape[:-1] + (n,), dtype=np.result_type(a, b))

    def cols(s):
        L.reference_matmul(a, b[:, s], out=out[..., s], precision=precision)

    THREADS.run(cols, [slice(c, min(n, c + step)) for c in range(0, n, step)])
    return out


# --------------------------------------------------------------------------------------
# a big product: pieces of its output on the threads

# Multiply-adds per piece, about (at least 2 pieces): GPT-2 124M's linears at T = 1024 make
# 2 pieces each, its lm_head 36; each piece is one single-threaded BLAS call, big enough to
# run at the BLAS's full rate.
GEMM_PIECE = 1 << 30


def threaded_matmul(a, b, out=None, precision="fp32"):
    """a (..., m, k) @ b (..., k, n) for a big product: the output's longer side (rows m,
    or columns n) cut into pieces of about GEMM_PIECE multiply-adds (multiples of 64), each
    one single-threaded BLAS call, shared among the threads. Every output element is a dot
    product over all of k, as in one call (equal to float rounding: at a piece's edge the
    BLAS may take another kernel). OpenBLAS's own threads would do the same split; but
    after each call they spin for a while waiting for the next one, on the cores that the
    kernels' threads need for the elementwise layers that follow."""
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    if out is None:
        shape = np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (m, n)
        out = np.empty(shape, dtype=np.result_type(a, b))
    batch = math.prod(out.shape[:-2])
    side = max(m, n)
    pieces = max(2, batch * m * k * n // GEMM_PIECE)
    step = min(side, -(-side // pieces // 64) * 64 or 64)
    cuts = [slice(i, min(side, i + step)) for i in range(0, side, step)]
    if n >= m:
        def piece(s):
            L.reference_matmul(a, b[..., s], out=out[..., s], precision=precision)
    else:
        def piece(s):
            L.reference_matmul(a[..., s, :], b, out=out[..., s, :], precision=precision)
    THREADS.run(piece, cuts)
    return out


# --------------------------------------------------------------------------------------
# GELU: the reference on blocks of rows; LayerNorm's few rows


def gelu_forward(x, bias=None, operand=False):
    # gpt2np.layers.gelu_forward on blocks of rows, each written into the whole arrays
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    blocks = _row_blocks(x2.shape[0], x2[:1].nbytes, ROW_BLOCK_BYTES)
    if len(blocks) == 1:  # a few rows (generation): the reference as it is
        return L.gelu_forward(x, bias, operand)
    out = np.empty(x2.shape, dtype=np.result_type(x2, *(() if bias is None else (bias,))))
    xb = x2 if bias is None else np.empty_like(out)  # x + bias, kept for the backward
    s = np.empty_like(out)

    def rows(r):
        if bias is not None:
            np.add(x2[r], bias, out=xb[r])
        L.gelu_into(xb[r], s[r], out[r])

    THREADS.run(rows, blocks)
    out = out.reshape(shape)
    return (L.matmul_operand(out) if operand else out), (xb.reshape(shape), s.reshape(shape))


def gelu_backward(dout, cache):
    x, s = cache
    shape = x.shape
    x2, s2, d2 = x.reshape(-1, shape[-1]), s.reshape(-1, shape[-1]), dout.reshape(-1, shape[-1])
    dx = np.empty(x2.shape, dtype=np.result_type(x2, d2))

    def rows(r):
        L.gelu_backward(d2[r], (x2[r], s2[r]), out=dx[r])

    THREADS.run(rows, _row_blocks(x2.shape[0], x2[:1].nbytes, ROW_BLOCK_BYTES))
    return dx.reshape(shape)


def layernorm_forward(x, weight, bias, eps=1e-5, operand=False):
    # gpt2np.layers.layernorm_forward; a few rows (generation's) by _layernorm_rows. (Many
    # rows stay with the reference: its arrays fit in cache, and blocks would only add
    # copies and calls.)
    if x.size * x.itemsize > ROW_BLOCK_BYTES:
        return L.layernorm_forward(x, weight, bias, eps, operand)
    out, (norm, rstd) = _layernorm_rows(x, weight, bias, eps)
    return (L.matmul_operand(out) if operand else out), (norm, rstd, weight)


def _layernorm_rows(x, weight, bias, eps):
    # the reference's operations, with the ufunc reductions that x.mean() runs (in float32
    # for float32, then divided by the count as an integer scalar) called directly: np.mean's
    # Python wrapper costs as much as the arithmetic of a row of generation
    n = np.intp(x.shape[-1])
    mean = np.add.reduce(x, axis=-1, keepdims=True)
    np.true_divide(mean, n, out=mean, casting="unsafe")
    norm = x - mean
    var = np.add.reduce(norm * norm, axis=-1, keepdims=True)
    np.true_divide(var, n, out=var, casting="unsafe")
    rstd = 1.0 / np.sqrt(var + eps)
    norm *= rstd
    out = norm * weight
    out += bias
    return out, (norm, rstd)


# --------------------------------------------------------------------------------------
# cross-entropy: the reference's own blocks of rows, shared among the threads

cross_entropy_forward = functools.partial(L.cross_entropy_forward, run=THREADS.run)
cross_entropy_losses = functools.partial(L.cross_entropy_losses, run=THREADS.run)


# --------------------------------------------------------------------------------------
# causal self-attention: a few heads per task

# Queries per block of a head: with hs = 64 a block's GEMMs run as fast as big ones, its
# scores (128 x up to T floats) stay in L2, and at T = 1024 the blocks compute 56% of the
# T x T scores (the reference's 256-row blocks: 62.5%).
ATT_BLOCK = 128
# Scores per task, in bytes: heads are grouped until a block of all of them fills this
# (small tasks: a core that other jobs hold back leaves its share to the other threads).
ATT_TASK_BYTES = 1 << 18


def _head_tasks(B, NH, T, itemsize):
    # (batches, heads) slices: groups of heads whose score blocks fit ATT_TASK_BYTES
    per_head = min(T, ATT_BLOCK) * T * itemsize
    g = max(1, ATT_TASK_BYTES // per_head)
    if g >= NH:  # whole batch rows of heads
        nb = g // NH
        return [(slice(b, min(B, b + nb)), slice(0, NH)) for b in range(0, B, nb)]
    return [(slice(b, b + 1), slice(h, min(NH, h + g))) for b in range(B) for h in range(0, NH, g)]


def _heads(a, bs, hs_):
    # rows (B,T,NH,hs) of a view -> the heads' (b,nh,T,hs) view
    return a[bs, :, hs_].transpose(0, 2, 1, 3)


def attention_forward(qkv, n_head, bias=None):
    """gpt2np.layers.attention_forward's math as tasks of a few heads on the threads, with
    ATT_BLOCK queries per block (the reference's blocks are bigger: the products' sums run
    over other lengths, so the two agree to float rounding, not bit for bit), each head's
    q * scale, k and v copied out of qkv (bias added) into contiguous arrays with one column
    more, which lets the products do the softmax's subtractions and sums (see
    _block_forward)."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    src = qkv.reshape(B, T, 3, n_head, hs)
    b3 = None if bias is None else bias.reshape(3, n_head, hs)
    dtype = qkv.dtype if bias is None else np.result_type(qkv, bias)
    scale = 1.0 / math.sqrt(hs)
    qs, k, v = (np.empty((B, n_head, T, hs + 1), dtype=dtype) for _ in range(3))
    y = np.empty((B, T, n_head, hs), dtype=dtype)  # heads merged by the layout: no copy
    lse = np.empty((B, n_head, T, 1), dtype=dtype)

    def task(bh):
        bs, hs_ = bh
        for slot, dst in enumerate((qs, k, v)):
            part, out = _heads(src[:, :, slot], bs, hs_), dst[bs, hs_][..., :hs]
            if b3 is None:
                out[...] = part
            else:
                np.add(part, b3[slot, hs_, None, :], out=out)
        qs[bs, hs_][..., :hs] *= scale
        k[bs, hs_][..., hs] = 1
        v[bs, hs_][..., hs] = 1
        _attention_heads_forward(qs[bs, hs_], k[bs, hs_], v[bs, hs_], _heads(y, bs, hs_),
                                 lse[bs, hs_])

    THREADS.run(task, _head_tasks(B, n_head, T, np.dtype(dtype).itemsize))
    return y.reshape(B, T, C), (qs, k, v, y, lse, scale)


def _causal_blocks(T):
    return [(r0, min(T, r0 + ATT_BLOCK)) for r0 in range(0, T, ATT_BLOCK)]


@functools.lru_cache(maxsize=16)
def _future_mask(n, dtype):
    # (n,n): -inf where a query of the diagonal block would see a later key; made once
    # (read-only, shared by the threads): making it costs as much as the block's exp
    mask = np.triu(np.full((n, n), -np.inf, dtype=dtype), k=1)
    mask.flags.writeable = False
    return mask


def _fused_products() -> bool:
    # the extra column rides through the products only where they are exact float32 (or
    # float64) products: emulated tf32/bf16 would round the -m and -lse it carries
    return L.get_matmul_precision() == "fp32"


def _attention_heads_forward(qs, k, v, y, lse):
    # qs, k, v (b,nh,T,hs+1), k's and v's last column 1 -> y (b,nh,T,hs), lse (b,nh,T,1),
    # written in place; qs's last column is left holding -lse, for the backward
    hs = y.shape[-1]
    fused = _fused_products()
    if fused:  # the stabiliser m of each query: its score with its own key, always seen
        qs[..., hs] = -np.einsum("bhtd,bhtd->bht", qs[..., :hs], k[..., :hs])
    for r0, r1 in _causal_blocks(qs.shape[2]):
        if not (fused and _block_forward(qs, k, v, y, lse, r0, r1)):
            _block_forward_exact(qs, k, v, y, lse, r0, r1)
    qs[..., hs] = -lse[..., 0]


def _block_forward(qs, k, v, y, lse, r0, r1):
    """Queries r0..r1 with the subtraction and the row sums done by the products: the scores
    come as q.k - m (qs's column -m times k's column 1) and P @ [v, 1] gives the output
    before normalising and the row sums s together; then only exp runs over the (n, r1)
    block. Any m works as long as exp(max - m) is finite: m is the query's own score, so the
    row max is >= m (s >= 1, nothing underflows); False (nothing written) where a score
    exceeds its own by too much (exp overflows), and the block is done the exact way."""
    hs = y.shape[-1]
    att = L.matmul(qs[:, :, r0:r1], k[:, :, :r1].swapaxes(-1, -2))  # (b,nh,n,r1): q.k - m
    att[..., r0:] += _future_mask(r1 - r0, att.dtype)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is caught below
        np.exp(att, out=att)
        ys = L.matmul(att, v[:, :, :r1])  # (b,nh,n,hs+1): sum_j P_j [v_j, 1]
    s = ys[..., hs:]
    if not np.isfinite(s).all():
        return False
    np.multiply(ys[..., :hs], 1.0 / s, out=y[:, :, r0:r1])
    np.subtract(np.log(s), qs[:, :, r0:r1, hs:], out=lse[:, :, r0:r1])  # log s + m
    return True


def _block_forward_exact(qs, k, v, y, lse, r0, r1):
    # the reference's softmax, with the row max as the stabiliser
    hs = y.shape[-1]
    att = L.matmul(qs[:, :, r0:r1, :hs], k[:, :, :r1, :hs].swapaxes(-1, -2))  # (b,nh,n,r1)
    att[..., r0:] += _future_mask(r1 - r0, att.dtype)  # future keys: the diagonal block
    m = att.max(axis=-1, keepdims=True)
    att -= m
    np.exp(att, out=att)
    s = att.sum(axis=-1, keepdims=True)
    att *= 1.0 / s  # P itself is the operand, as in the reference (in bf16: rounded so)
    lse[:, :, r0:r1] = np.log(s) + m
    L.matmul(att, v[:, :, :r1, :hs], out=y[:, :, r0:r1])


def attention_backward(dout, cache):
    """gpt2np.layers.attention_backward as tasks of a few heads on the threads, each
    head's gradients written straight into their slots of dqkv."""
    qs, k, v, y, lse, scale = cache
    B, NH, T, hs1 = qs.shape
    hs = hs1 - 1
    dy = dout.reshape(B, T, NH, hs)
    dqkv = np.empty((B, T, 3, NH, hs), dtype=np.result_type(dout, qs))

    def task(bh):
        bs, hs_ = bh
        dq, dk, dv = (_heads(dqkv[:, :, slot], bs, hs_) for slot in range(3))
        _attention_heads_backward(_heads(dy, bs, hs_), qs[bs, hs_], k[bs, hs_], v[bs, hs_],
                                  _heads(y, bs, hs_), lse[bs, hs_], dq, dk, dv)
        dq *= scale  # scores = (q * scale) @ k^T

    THREADS.run(task, _head_tasks(B, NH, T, qs.itemsize))
    return dqkv.reshape(B, T, 3 * NH * hs)


def _attention_heads_backward(dy, qs, k, v, y, lse, dq, dk, dv):
    # dy (b,nh,T,hs) and the forward's arrays -> dq (unscaled), dk, dv written in place.
    # Fused (see _block_forward): qs's column -lse makes the scores q.k - lse, and dy's
    # column -D with v's column 1 makes dP - D, each in its product
    hs = dq.shape[-1]
    fused = _fused_products()
    dk[...] = 0
    dv[...] = 0
    D = (dy * y).sum(axis=-1, keepdims=True)  # rowsum(P * dP) = dy . y
    if fused:
        dya = np.empty(dy.shape[:-1] + (hs + 1,), dtype=np.result_type(dy, y))
        dya[..., :hs] = dy
        np.negative(D, out=dya[..., hs:])
    for r0, r1 in _causal_blocks(qs.shape[2]):
        dyb = dy[:, :, r0:r1]
        if fused:
            att = L.matmul(qs[:, :, r0:r1], k[:, :, :r1].swapaxes(-1, -2))  # q.k - lse
        else:
            att = L.matmul(qs[:, :, r0:r1, :hs], k[:, :, :r1, :hs].swapaxes(-1, -2))
            att -= lse[:, :, r0:r1]
        att[..., r0:] += _future_mask(r1 - r0, att.dtype)
        np.exp(att, out=att)  # P, 0 for the future keys
        dv[:, :, :r1] += L.matmul(att.swapaxes(-1, -2), dyb)
        if fused:
            datt = L.matmul(dya[:, :, r0:r1], v[:, :, :r1].swapaxes(-1, -2))  # dP - D
        else:
            datt = L.matmul(dyb, v[:, :, :r1, :hs].swapaxes(-1, -2))  # dP
            datt -= D[:, :, r0:r1]
        datt *= att  # dS
        L.matmul(datt, k[:, :, :r1, :hs], out=dq[:, :, r0:r1])
        dk[:, :, :r1] += L.matmul(datt.swapaxes(-1, -2), qs[:, :, r0:r1, :hs])


def masked_attention_forward(qkv, n_head, mask, bias=None):
    """gpt2np.layers.masked_attention_forward on groups of rows of the batch, shared among
    the threads (each group: the reference, bit for bit)."""
    B, T, C3 = qkv.shape
    out = np.empty((B, T, C3 // 3), dtype=qkv.dtype if bias is None else np.result_type(qkv, bias))
    per_row = n_head * T * T * out.itemsize  # one row's scores
    step = max(1, ATT_TASK_BYTES * 4 // per_row)

    def rows(r):
        out[r] = L.masked_attention_forward(qkv[r], n_head, mask[r], bias)

    THREADS.run(rows, [slice(b, min(B, b + step)) for b in range(0, B, step)])
    return out


# --------------------------------------------------------------------------------------
# AdamW: every tensor in blocks, the blocks shared among the threads

# Elements per block: p, g, m, v and a scratch of 256K float32 each (5 MB, two threads'
# blocks in L3) stream through memory once, instead of once for each of the update's 14
# operations; few enough blocks (~500 for GPT-2 small) that handing them out costs little.
ADAM_BLOCK = 1 << 18
_scratch = threading.local()


def adamw_update(params, grads, ms, vs, decays, beta1, beta2, eps, step_size, sqrt_bias2):
    """gpt2np.optim.AdamW._update on every tensor, in place, bit for bit: the same
    operations on blocks of ADAM_BLOCK elements, shared among the threads. The signature
    of gpt2np.backends.cupy_kernels.adamw_update; C-contiguous arrays."""
    if not (len(grads) == len(ms) == len(vs) == len(decays) == len(params)):
        raise ValueError("params, grads, ms, vs and decays must have the same length")
    flat = [tuple(a.reshape(-1) for a in arrays) for arrays in zip(params, grads, ms, vs)]
    tasks = [(i, s) for i, (p, *_) in enumerate(flat) for s in range(0, p.size, ADAM_BLOCK)]

    def block(task):
        i, s = task
        p, g, m, v = (a[s:s + ADAM_BLOCK] for a in flat[i])
        tmp = _scratch_for(p)
        decay = decays[i]
        if decay != 1.0:  # gpt2np.optim.AdamW._update, line for line
            p *= decay
        m *= beta1
        np.multiply(g, 1.0 - beta1, out=tmp)
        m += tmp
        v *= beta2
        np.multiply(g, g, out=tmp)
        tmp *= 1.0 - beta2
        v += tmp
        np.sqrt(v, out=tmp)
        tmp /= sqrt_bias2
        tmp += eps
        np.divide(m, tmp, out=tmp)
        tmp *= step_size
        p -= tmp

    THREADS.run(block, tasks)


def _scratch_for(p):
    # this thread's scratch block, as p's dtype and size
    key = p.dtype.str
    buf = getattr(_scratch, key, None)
    if buf is None or buf.size < p.size:
        buf = np.empty(max(p.size, ADAM_BLOCK), dtype=p.dtype)
        setattr(_scratch, key, buf)
    return buf[:p.size]


CPU_OPS = L.LayerOps(
    layernorm_forward=layernorm_forward,
    attention_forward=attention_forward, attention_backward=attention_backward,
    masked_attention_forward=masked_attention_forward,
    gelu_forward=gelu_forward, gelu_backward=gelu_backward,
    cross_entropy_forward=cross_entropy_forward, cross_entropy_losses=cross_entropy_losses)
