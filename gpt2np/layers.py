"""GPT-2's layers, one forward/backward pair each, over NumPy or CuPy arrays.

Conventions (as llm.c's train_gpt2.c):
  B batch, T time, C channels (n_embd), NH heads, hs = C // NH, V vocab, OC output channels.
  `*_forward(inputs, params) -> out, cache`; `*_backward(dout, cache) -> dinputs, dparams`.
  Caches hold only what the backward reads. No autograd. The array module `xp` is taken
  from the inputs, so the same code runs on the CPU (numpy) and the GPU (cupy).
  Nothing here upcasts: Python float scalars keep float32 arrays float32 (NEP 50), while a
  numpy float64 scalar (np.sqrt(2/np.pi)) would silently promote whole tensors.

Speed that lives in the math. On a CPU NumPy runs elementwise work on one core, so after
the GEMMs it is the number of passes over memory that costs. Hence:
  - every contraction is one matmul on a 2-D (B*T, C) reshape, or a stack of per-head
    matrices for attention; never numpy's slow loop for 3-D @ 2-D broadcasting;
  - elementwise work runs in place (`*=`, `out=`) on arrays this code made, never on the
    caller's inputs (callers, the tests among them, may reuse those);
  - the big (B*T, V) and (V, C) arrays can be handed in with `out=` / `dwte=`, so that a
    training loop reuses them from step to step instead of allocating them anew;
  - nothing is recomputed or materialised that a cheaper identity gives (see attention's
    backward and the cross-entropy).

Precision. Every matrix product goes through `matmul`, which runs in the precision set by
`matmul_precision("fp32" | "tf32" | "bf16")` (a context, like torch.autocast): the operands
are rounded to TF32 or bfloat16, the products accumulate in float32 and the result is
float32. Everything else (LayerNorm, softmax and loss statistics, GELU, the residual stream,
the weights) stays float32. The same context names the GEMM that runs the products: a
backend's (cuBLAS on the tensor cores, OpenBLAS), or by default `reference_matmul` here,
which emulates the rounding (round the operands, then a float32 product), so the effect of
bf16 on every gradient can be studied and tested without a GPU. `matmul_operand(x)`
prepares an operand that several products read (on the GPU in bf16: its bf16 copy, cast
once).

Who runs these. gpt2np.model composes them into GPT-2 through a `LayerOps` (bottom of this
file): `REFERENCE_OPS` are the functions here; a backend may offer fused kernels with the
same signatures for some of them (CuPy: gpt2np/backends/cuda/*.cu), chosen once per model.
The functions here are the reference those kernels are tested against.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
import sys
from dataclasses import dataclass
from typing import Callable

import numpy as np


def get_xp(x):
    """The array module of x: numpy for a numpy array, else the module its type comes from
    (cupy for a cupy array)."""
    module = type(x).__module__.partition(".")[0]
    return np if module == "numpy" else sys.modules[module]


# --------------------------------------------------------------------------------------
# matmul in the current precision, on the current GEMM

PRECISIONS = ("fp32", "tf32", "bf16")
MANTISSA_BITS = {"tf32": 10, "bf16": 7}  # mantissa bits an operand keeps (float32 has 23)
_PRECISION = contextvars.ContextVar("gpt2np_matmul_precision", default="fp32")
_GEMM = contextvars.ContextVar("gpt2np_matmul_gemm", default=None)  # None: reference_matmul


@contextlib.contextmanager
def matmul_precision(precision: str, gemm=None):
    """Run the matmuls inside in `precision`: "fp32" (exact float32), "tf32" (operands
    rounded to 10 mantissa bits) or "bf16" (7 mantissa bits); float32 accumulation and
    results in every case. A forward and its backward must run under the same setting.

    gemm: whose GEMMs run them, an object with `matmul(a, b, out=, precision=)` and
    `matmul_operand(x, precision)` (a backend: gpt2np.backends.Backend); None keeps the
    current one (outside any such context: `reference_matmul`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    tokens = [_PRECISION.set(precision)] + ([] if gemm is None else [_GEMM.set(gemm)])
    try:
        yield
    finally:
        for token in reversed(tokens):
            token.var.reset(token)


def get_matmul_precision() -> str:
    return _PRECISION.get()


def round_mantissa(a, bits: int):
    """float32 `a` rounded to `bits` mantissa bits, to nearest with ties to even, as a new
    float32 array: the value a TF32 (bits=10) or bfloat16 (bits=7) operand holds.

    Works on the bit pattern: add half an ulp of the shorter format (minus one, plus the
    kept lowest bit, which makes ties go to even), then clear the dropped bits. A carry out
    of the mantissa bumps the exponent, which is exactly right, up to inf for the largest
    values. NaNs stay NaNs.
    """
    xp = get_xp(a)
    drop = 23 - bits
    a = xp.asarray(a, dtype=xp.float32)
    u = xp.array(a, dtype=xp.float32, order="C").view(xp.uint32)  # a copy: ours to change
    nan = xp.isnan(a)
    half = np.uint32((1 << (drop - 1)) - 1)
    u += half + ((u >> np.uint32(drop)) & np.uint32(1))
    u &= np.uint32(~((1 << drop) - 1) & 0xFFFFFFFF)
    r = u.view(xp.float32)
    if nan.any():
        r[nan] = np.nan
    return r


def reference_matmul(a, b, out=None, precision="fp32"):
    """a @ b in `precision` with the array module's own matmul. tf32 and bf16 are emulated:
    the operands rounded as the tensor cores see them, then multiplied in float32. A product
    of two such numbers is exact in float32, so this is the GPU's arithmetic up to the order
    of the float32 additions."""
    xp = get_xp(a)
    if precision == "fp32":
        return xp.matmul(a, b, out=out)
    if a.dtype != np.float32 or b.dtype != np.float32:
        raise TypeError(f"precision {precision!r} needs float32 operands, got "
                        f"{a.dtype} and {b.dtype}")
    bits = MANTISSA_BITS[precision]
    return xp.matmul(round_mantissa(a, bits), round_mantissa(b, bits), out=out)


def matmul(a, b, out=None):
    # a (...,M,K) @ b (...,K,N) -> (...,M,N), by the current GEMM in the current precision
    gemm, precision = _GEMM.get(), _PRECISION.get()
    if gemm is None:
        return reference_matmul(a, b, out=out, precision=precision)
    return gemm.matmul(a, b, out=out, precision=precision)


def matmul_operand(x):
    """x ready to be a matmul operand more than once: on the GPU in bf16, its bfloat16 bits
    (cast once instead of once per product); otherwise x itself."""
    gemm = _GEMM.get()
    return x if gemm is None else gemm.matmul_operand(x, _PRECISION.get())


# --------------------------------------------------------------------------------------
# token + position embedding


def embedding_forward(idx, wte, wpe):
    # idx (B,T) int, wte (V,C), wpe (block_size,C) -> x (B,T,C)
    T = idx.shape[1]
    x = wte[idx]  # the gather makes a new array: ours to add into
    x += wpe[:T]
    return x, (idx, wte.shape, wpe.shape)


def embedding_backward(dx, cache, dwte=None):
    # dx (B,T,C) -> dwte (V,C), dwpe (block_size,C)
    # dwte: optionally a (V,C) array to accumulate into, e.g. already holding the tied
    # lm_head's share: that saves a (V,C) zeros and a (V,C) add.
    idx, wte_shape, wpe_shape = cache
    xp = get_xp(dx)
    B, T, C = dx.shape
    dwpe = xp.zeros(wpe_shape, dtype=dx.dtype)
    dx.sum(axis=0, out=dwpe[:T])  # every sequence in the batch uses positions 0..T-1
    if dwte is None:
        dwte = xp.zeros(wte_shape, dtype=dx.dtype)
    # a token id may appear many times: its rows must accumulate, not overwrite
    xp.add.at(dwte, idx.reshape(-1), dx.reshape(B * T, C))
    return dwte, dwpe


# --------------------------------------------------------------------------------------
# LayerNorm over the last axis (eps 1e-5 as GPT-2)


def layernorm_forward(x, weight, bias, eps=1e-5, operand=False):
    # x (B,T,C), weight (C,), bias (C,) -> out (B,T,C).
    # operand=True: out only feeds matmuls, so it comes back as matmul_operand(out) (on the
    # GPU in bf16 a fused kernel writes those bf16 bits directly: no float32 copy to cast)
    xp = get_xp(x)
    mean = x.mean(axis=-1, keepdims=True)  # (B,T,1)
    norm = x - mean  # (B,T,C) centred; normalised in place below
    var = (norm * norm).mean(axis=-1, keepdims=True)  # biased variance, as torch
    rstd = 1.0 / xp.sqrt(var + eps)  # (B,T,1)
    norm *= rstd  # zero mean, unit variance
    out = norm * weight
    out += bias
    return (matmul_operand(out) if operand else out), (norm, rstd, weight)


def layernorm_backward(dout, cache):
    # dout (B,T,C) -> dx (B,T,C), dweight (C,), dbias (C,)
    norm, rstd, weight = cache
    C = norm.shape[-1]
    dout2 = dout.reshape(-1, C)
    dbias = dout2.sum(axis=0)
    dweight = (dout2 * norm.reshape(-1, C)).sum(axis=0)
    dnorm = dout * weight
    # d/dx of (x - mean) * rstd: the mean and the variance each depend on every x
    #   dx = rstd * (dnorm - mean(dnorm) - norm * mean(dnorm * norm))
    proj = (dnorm * norm).mean(axis=-1, keepdims=True)  # (B,T,1)
    dx = dnorm
    dx -= dnorm.mean(axis=-1, keepdims=True)
    dx -= norm * proj
    dx *= rstd
    return dx, dweight, dbias


# --------------------------------------------------------------------------------------
# linear in GPT-2's Conv1D layout: weight is (in, out), so out = x @ weight + bias


def linear_forward(x, weight, bias):
    # x (B,T,C), weight (C,OC), bias (OC,) or None (added by the caller) -> out (B,T,OC)
    C, OC = weight.shape
    # both operands are used again by the backward: on the GPU in bf16, cast once each
    x2 = matmul_operand(x.reshape(-1, C))  # for dweight
    w = matmul_operand(weight)  # for dx
    out = matmul(x2, w)  # one (B*T,C) @ (C,OC) GEMM
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], OC), (x2, x.shape, w)


def linear_backward(dout, cache):
    # dout (B,T,OC) -> dx (B,T,C), dweight (C,OC), dbias (OC,) (the row sum, wherever the
    # forward's bias was added)
    x2, x_shape, weight = cache  # the forward's operands: x2 (B*T,C), weight (C,OC)
    C, OC = weight.shape
    dout2 = dout.reshape(-1, OC)  # (B*T,OC): every contraction is one 2-D GEMM
    d = matmul_operand(dout2)  # used by both products
    dx = matmul(d, weight.T).reshape(x_shape)
    dweight = matmul(x2.T, d)  # BLAS reads the transposed view, no copy
    dbias = dout2.sum(axis=0)
    return dx, dweight, dbias


# --------------------------------------------------------------------------------------
# causal self-attention core: from the fused qkv projection to the merged heads

# Queries per block. A block of queries needs only the keys up to its last position, so
# blocks skip the masked upper triangle (at T=1024 they compute 62% of the full T x T), and
# their (B,NH,256,<=T) scores are small temporaries instead of a (B,NH,T,T) cache.
_ATT_BLOCK = 256


def _causal_scores(qs, k, r0, r1):
    # scores of queries r0..r1-1 against keys 0..r1-1: (B,NH,r1-r0,r1), the future masked.
    # Only the last (r1-r0) columns, the diagonal block, hold future keys: adding -inf there
    # is one small pass, no fancy index.
    xp = get_xp(qs)
    att = matmul(qs[:, :, r0:r1], k[:, :, :r1].transpose(0, 1, 3, 2))
    n = r1 - r0
    att[..., r0:] += xp.triu(xp.full((n, n), -xp.inf, dtype=att.dtype), k=1)
    return att


def attention_forward(qkv, n_head, bias=None):
    # qkv (B,T,3C) -> y (B,T,C). bias: c_attn's (3C,) bias when qkv comes without it (a
    # fused GPU attention adds it as it reads qkv: no pass over (B,T,3C) of its own)
    if bias is not None:
        qkv = qkv + bias
    xp = get_xp(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    # (B,T,3,NH,hs) -> (3,B,NH,T,hs): q, k, v each (B,NH,T,hs), views with row stride 3C,
    # which BLAS takes as they are (a leading dimension), so the heads are never copied out
    q, k, v = qkv.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)
    scale = 1.0 / math.sqrt(hs)
    qs = q * scale  # scale the (T,hs) queries rather than the (T,T) scores: T/hs times less work
    y = xp.empty((B, n_head, T, hs), dtype=qkv.dtype)
    lse = xp.empty((B, n_head, T, 1), dtype=qkv.dtype)  # log-sum-exp of each score row
    for r0 in range(0, T, _ATT_BLOCK):  # blocks of queries (not heads: those are batched)
        r1 = min(T, r0 + _ATT_BLOCK)
        att = _causal_scores(qs, k, r0, r1)  # (B,NH,n,r1)
        # softmax in place; stable: the row max is subtracted (the diagonal is never masked)
        m = att.max(axis=-1, keepdims=True)
        att -= m
        xp.exp(att, out=att)
        s = att.sum(axis=-1, keepdims=True)
        att *= 1.0 / s  # (B,NH,n,1) reciprocals, then one multiply
        lse[:, :, r0:r1] = xp.log(s) + m
        matmul(att, v[:, :, :r1], out=y[:, :, r0:r1])  # (B,NH,n,hs)
    # The softmax is not kept: the backward recomputes it from qs, k and lse (one more GEMM
    # per block) instead of holding B*NH*T*T floats per layer (600 MB for GPT-2 at T=1024).
    out = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # merge heads (a (B,T,C) copy)
    return out, (qs, k, v, y, lse, scale)


def attention_backward(dy, cache):
    # dy (B,T,C) -> dqkv (B,T,3C)
    qs, k, v, y, lse, scale = cache
    xp = get_xp(dy)
    B, NH, T, hs = qs.shape
    C = NH * hs
    dy = dy.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)  # split heads (B,NH,T,hs), a view
    # dq, dk, dv are written straight into their slots of dqkv (strided views, as in forward)
    dqkv = xp.empty((B, T, 3 * C), dtype=dy.dtype)
    dq, dk, dv = dqkv.reshape(B, T, 3, NH, hs).transpose(2, 0, 3, 1, 4)
    dk[...] = 0  # keys and values gather contributions from every later query block
    dv[...] = 0
    # softmax backward without the Jacobian: dS = P * (dP - sum_j P * dP). The row sums
    # sum_j P[i,j] dP[i,j] = sum_j P[i,j] (dy[i] . v[j]) = dy[i] . y[i]: a (T,hs) product
    # instead of a (T,T) one (FlashAttention's D = rowsum(dO * O)).
    D = (dy * y).sum(axis=-1, keepdims=True)  # (B,NH,T,1)
    for r0 in range(0, T, _ATT_BLOCK):
        r1 = min(T, r0 + _ATT_BLOCK)
        dyb = dy[:, :, r0:r1]  # (B,NH,n,hs)
        att = _causal_scores(qs, k, r0, r1)  # recompute the softmax: P = exp(S - lse)
        att -= lse[:, :, r0:r1]
        xp.exp(att, out=att)  # masked entries: exp(-inf) = 0, so their gradient is 0
        dv[:, :, :r1] += matmul(att.transpose(0, 1, 3, 2), dyb)
        datt = matmul(dyb, v[:, :, :r1].transpose(0, 1, 3, 2))  # dP (B,NH,n,r1)
        datt -= D[:, :, r0:r1]
        datt *= att  # dS
        # scores = qs @ k^T with qs = q * scale: the scale lands on dq, a (T,hs) array
        matmul(datt, k[:, :, :r1], out=dq[:, :, r0:r1])
        dk[:, :, :r1] += matmul(datt.transpose(0, 1, 3, 2), qs[:, :, r0:r1])
    dq *= scale
    return dqkv


def masked_attention_forward(qkv, n_head, mask, bias=None):
    # qkv (B,T,3C), mask (B,1,T,T) additive (0 where a query may see a key, -inf where
    # not; every query sees at least one key) -> y (B,T,C). Inference only (no cache): the
    # packed rows of gpt2np.evals.shared_prefix, where causality alone is not the rule
    if bias is not None:
        qkv = qkv + bias
    xp = get_xp(qkv)
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    q, k, v = qkv.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)  # (B,NH,T,hs)
    att = matmul(q * (1.0 / math.sqrt(hs)), k.transpose(0, 1, 3, 2))  # (B,NH,T,T)
    att += mask
    att -= att.max(axis=-1, keepdims=True)  # finite: each row sees a key
    xp.exp(att, out=att)
    att *= 1.0 / att.sum(axis=-1, keepdims=True)
    y = matmul(att, v)  # (B,NH,T,hs)
    return y.transpose(0, 2, 1, 3).reshape(B, T, C3 // 3)


# --------------------------------------------------------------------------------------
# GELU, tanh approximation (as GPT-2 and nanoGPT's nn.GELU(approximate="tanh"))

_GELU_K = math.sqrt(2.0 / math.pi)  # a Python float: keeps float32 float32


def gelu_forward(x, bias=None, operand=False):
    # x (...,OC) -> out (...,OC);  out = 0.5 * x * (1 + tanh(u)),  u = K * (x + 0.044715 * x^3)
    # computed as x * s with s = 0.5 * (1 + tanh u) = 1 / (1 + exp(-2u)), the same function:
    # an exp is cheaper than a tanh, and x * s keeps its relative precision where tanh u ~ -1.
    # bias: (OC,) added to x first (c_fc's, which a fused kernel adds on its way: no pass
    # over (B,T,4C) of its own); operand=True: out only feeds matmuls, so it comes back as
    # matmul_operand(out)
    xp = get_xp(x)
    if bias is not None:
        x = x + bias
    s, out = xp.empty_like(x), xp.empty_like(x)
    gelu_into(x, s, out)
    return (matmul_operand(out) if operand else out), (x, s)


def gelu_into(x, s, out):
    # gelu_forward's arithmetic into arrays of x's shape (a CPU kernel's blocks of rows):
    # s = sigmoid(2u) (the backward's cache), out = x * s
    xp = get_xp(x)
    xp.multiply(x, x, out=s)  # x * (1 + 0.044715 * x^2), not x**3 (far slower), in place
    s *= 0.044715
    s += 1.0
    s *= x
    s *= -2.0 * _GELU_K  # -2u
    with np.errstate(over="ignore"):  # exp(-2u) = inf for x < -10 (float32): then s = 0
        xp.exp(s, out=s)
    s += 1.0
    xp.reciprocal(s, out=s)
    xp.multiply(x, s, out=out)


def gelu_backward(dout, cache, out=None):
    # dout (...) -> dx (...); out: optional array to write dx into
    x, s = cache
    xp = get_xp(x)
    # d/dx [x * s] with s = sigmoid(2u): ds/du = 2 * s * (1 - s), which cannot overflow
    #   dx = s + 2 * x * s * (1 - s) * K * (1 + 3 * 0.044715 * x^2)
    du = x * x
    du *= 3 * 0.044715
    du += 1.0
    du *= 2.0 * _GELU_K
    dx = xp.subtract(1.0, s, out=out)  # 1 - s
    dx *= s
    dx *= x
    dx *= du
    dx += s
    dx *= dout
    return dx


# --------------------------------------------------------------------------------------
# lm_head, tied to wte: logits = x @ wte.T


def lm_head_forward(x, wte, out=None):
    # x (B,T,C), wte (V,C) -> logits (B,T,V); out: optional (B,T,V) buffer to write into
    V, C = wte.shape
    out2 = None if out is None else out.reshape(-1, V)
    x2, w = matmul_operand(x.reshape(-1, C)), matmul_operand(wte)  # both used again
    logits = matmul(x2, w.T, out=out2)  # one (B*T,C) @ (C,V) GEMM
    return logits.reshape(*x.shape[:-1], V), (x2, x.shape, w)


def lm_head_backward(dlogits, cache, dwte=None):
    # dlogits (B,T,V) -> dx (B,T,C), dwte (V,C) (the lm_head share of the tied gradient);
    # dwte: optional (V,C) buffer to write into
    x2, x_shape, wte = cache  # the forward's operands: x2 (B*T,C), wte (V,C)
    V, C = wte.shape
    d = matmul_operand(dlogits.reshape(-1, V))  # (B*T,V), the biggest operand: cast once
    dx = matmul(d, wte).reshape(x_shape)
    dwte = matmul(d.T, x2, out=dwte)
    return dx, dwte


# --------------------------------------------------------------------------------------
# cross-entropy: mean over the tokens whose target is not ignore_index (-1, as nanoGPT)

# Rows of logits per pass on the CPU: ~1 MB, so that the max, exp, sum and scale of a block
# of rows run in cache instead of streaming (B*T,V) through memory four times.
_CE_BLOCK_BYTES = 1 << 20


def run_blocks(fn, blocks):
    # fn(block) for each block of rows, one after another (a backend may share them among
    # threads instead: the blocks are independent)
    for block in blocks:
        fn(block)


def _row_blocks(N, V, itemsize, xp):
    # CPU caches hold a block of rows; a GPU streams them all at once
    step = N if xp is not np else max(1, _CE_BLOCK_BYTES // (V * itemsize))
    return [slice(r, r + step) for r in range(0, N, step)]


def cross_entropy_forward(logits, targets, ignore_index=-1, out=None, run=run_blocks):
    # logits (B,T,V), targets (B,T) int -> loss (scalar array), cache.
    # out: optional (B,T,V) buffer for the softmax that the backward turns into dlogits.
    xp = get_xp(logits)
    V = logits.shape[-1]
    logits2 = logits.reshape(-1, V)
    N = logits2.shape[0]
    t = targets.reshape(-1)
    valid = t != ignore_index
    n_valid = int(valid.sum())
    tsafe = xp.where(valid, t, 0)
    # each row's weight in the mean: 1/n_valid, or 0 for an ignored row
    weight = valid.astype(logits.dtype) * (1.0 / n_valid if n_valid else 0.0)
    probs = xp.empty((N, V), dtype=logits.dtype) if out is None else out.reshape(N, V)
    lse = xp.empty((N, 1), dtype=logits.dtype)  # log-sum-exp of each row

    # The cached softmax is pre-multiplied by the row's weight: the backward's
    # (softmax - onehot) / n_valid then costs no extra pass over (B*T,V).
    def block(r):
        rows, p = logits2[r], probs[r]
        m = rows.max(axis=-1, keepdims=True)  # shift by the row max: exp cannot overflow
        xp.subtract(rows, m, out=p)
        xp.exp(p, out=p)
        s = p.sum(axis=-1, keepdims=True)
        p *= weight[r, None] / s
        lse[r] = xp.log(s) + m

    run(block, _row_blocks(N, V, logits.itemsize, xp))
    # -log p[target] = logsumexp - logit[target]: a gather of N entries, not of (N,V)
    nll = (lse[:, 0] - logits2[xp.arange(N), tsafe]) * valid
    # like torch: the mean over no tokens is nan
    loss = nll.sum() / n_valid if n_valid else nll.sum() * float("nan")
    return loss, (probs, tsafe, weight, logits.shape)


def cross_entropy_losses(logits, targets, run=run_blocks):
    # logits (N,V), targets (N,) int -> the loss of each row (N,) float64. For evaluation:
    # no backward, so nothing is kept and no (N,V) softmax is written, only a block's
    xp = get_xp(logits)
    N, V = logits.shape
    lse = xp.empty(N, dtype=xp.float64)  # the losses are added up over many rows

    def block(r):  # blocks of rows in cache, as cross_entropy_forward's
        rows = logits[r]
        m = rows.max(axis=-1, keepdims=True)
        e = rows - m  # a block's scratch, exponentiated in place
        s = xp.exp(e, out=e).sum(axis=-1)
        lse[r] = xp.log(s.astype(xp.float64)) + m[:, 0]

    run(block, _row_blocks(N, V, logits.itemsize, xp))
    return lse - logits[xp.arange(N), targets]


def cross_entropy_backward(dloss, cache, operand=False):
    # dloss scalar -> dlogits (B,T,V) = dloss * (softmax - onehot) / n_valid, zero on ignored
    # rows. Works in place on the cached (already weighted) softmax, the biggest buffer we
    # have: call it once per forward. operand=True: dlogits only feeds matmuls (the
    # lm_head's backward), so it comes back as matmul_operand(dlogits) (on the GPU in bf16,
    # bf16 bits that a fused kernel writes directly)
    probs, tsafe, weight, shape = cache
    xp = get_xp(probs)
    dlogits = probs
    dlogits[xp.arange(tsafe.shape[0]), tsafe] -= weight  # the onehot, weighted as the rows
    dloss = float(dloss)
    if dloss != 1.0:  # the model's backward passes 1.0: no pass over (B*T,V) then
        dlogits *= dloss
    dlogits = dlogits.reshape(shape)
    return matmul_operand(dlogits) if operand else dlogits


# --------------------------------------------------------------------------------------
# the layer functions a model runs


@dataclass
class LayerOps:
    """One field per layer function above, with its signature and contract. REFERENCE_OPS
    holds the functions of this module; a backend's `layer_ops(dtype)` may swap in fused
    kernels for some (gpt2np.backends.cupy_backend), each checked against the reference.
    A model keeps the LayerOps it was given: to try another function in every model that
    runs the reference (as tests do), set it on REFERENCE_OPS."""
    embedding_forward: Callable = embedding_forward
    embedding_backward: Callable = embedding_backward
    layernorm_forward: Callable = layernorm_forward
    layernorm_backward: Callable = layernorm_backward
    linear_forward: Callable = linear_forward
    linear_backward: Callable = linear_backward
    attention_forward: Callable = attention_forward
    attention_backward: Callable = attention_backward
    masked_attention_forward: Callable = masked_attention_forward  # evaluation's: no backward
    gelu_forward: Callable = gelu_forward
    gelu_backward: Callable = gelu_backward
    lm_head_forward: Callable = lm_head_forward
    lm_head_backward: Callable = lm_head_backward
    cross_entropy_forward: Callable = cross_entropy_forward
    cross_entropy_backward: Callable = cross_entropy_backward
    cross_entropy_losses: Callable = cross_entropy_losses  # evaluation's: no backward


REFERENCE_OPS = LayerOps()
