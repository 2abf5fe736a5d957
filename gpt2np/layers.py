"""GPT-2's layers, one forward/backward pair each, over NumPy or CuPy arrays.

Conventions (as llm.c's train_gpt2.c):
  B batch, T time, C channels (n_embd), NH heads, hs = C // NH, V vocab, OC output channels.
  `*_forward(inputs, params) -> out, cache`; `*_backward(dout, cache) -> dinputs, dparams`.
  Caches hold only what the backward reads. No autograd, no globals. The array module `xp`
  is taken from the inputs, so the same code runs on the CPU (numpy) and the GPU (cupy).
  Nothing here upcasts: Python float scalars keep float32 arrays float32 (NEP 50), while a
  numpy float64 scalar (np.sqrt(2/np.pi)) would silently promote whole tensors.

Speed. On a CPU NumPy runs elementwise work on one core, so after the GEMMs it is the number
of passes over memory that costs. Hence:
  - every contraction is one BLAS call on a 2-D (B*T, C) reshape, or a stack of per-head
    matrices for attention; never numpy's slow loop for 3-D @ 2-D broadcasting;
  - elementwise work runs in place (`*=`, `out=`) on arrays this code made, never on the
    caller's inputs (callers, the tests among them, may reuse those);
  - the big (B*T, V) and (V, C) arrays can be handed in with `out=` / `dwte=`, so that a
    training loop reuses them from step to step instead of page-faulting 200 MB each time;
  - nothing is recomputed or materialised that a cheaper identity gives (see attention's
    backward and the cross-entropy).

Precision. Every matrix product goes through `matmul`, which runs in the precision set by
`matmul_precision("fp32" | "tf32" | "bf16")` (a context, like torch.autocast): the operands
are rounded to TF32 or bfloat16, the products accumulate in float32 and the result is
float32. Everything else (LayerNorm, softmax and loss statistics, GELU, the residual stream,
the weights) stays float32. On the GPU that is cuBLAS on the tensor cores; on the CPU the
same rounding is emulated (round the operands, then a float32 GEMM), so the effect of bf16
on every gradient can be studied and tested without a GPU. `matmul_operand(x)` prepares an
operand that several products read (on the GPU in bf16: its bf16 copy, cast once).

Fused kernels. A backend may offer fused kernels for some layers (CuPy: gpt2np/backends/cuda/*.cu).
A layer's forward hands float32 work to them where they exist and returns their cache, a
`backends.KernelCache`; the layer's backward recognises it and hands the backward over too.
The code below is the reference they are tested against.
"""
from __future__ import annotations

import contextlib
import contextvars
import math

import numpy as np

from gpt2np.backends import KernelCache, backend_of


def get_xp(x):
    return backend_of(x).xp


def _kernels(x):
    """The fused kernels of x's backend for x's dtype, or None (use the code here)."""
    be = backend_of(x)
    return be.kernels() if hasattr(be, "kernels") and x.dtype == np.float32 else None


# --------------------------------------------------------------------------------------
# matmul in the current precision

PRECISIONS = ("fp32", "tf32", "bf16")
_PRECISION = contextvars.ContextVar("gpt2np_matmul_precision", default="fp32")


@contextlib.contextmanager
def matmul_precision(precision: str):
    """Run the matmuls inside in `precision`: "fp32" (exact float32), "tf32" (operands
    rounded to 10 mantissa bits) or "bf16" (7 mantissa bits); float32 accumulation and
    results in every case. A forward and its backward must run under the same setting."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    token = _PRECISION.set(precision)
    try:
        yield
    finally:
        _PRECISION.reset(token)


def get_matmul_precision() -> str:
    return _PRECISION.get()


def matmul(a, b, out=None):
    # a (...,M,K) @ b (...,K,N) -> (...,M,N), by the backend in the current precision
    return backend_of(a).matmul(a, b, out=out, precision=_PRECISION.get())


def matmul_operand(x):
    """x ready to be a matmul operand more than once: on the GPU in bf16, its bfloat16 bits
    (cast once instead of once per product); otherwise x itself."""
    be = backend_of(x)
    return be.matmul_operand(x, _PRECISION.get()) if hasattr(be, "matmul_operand") else x


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
    k = _kernels(dx)
    if k is not None:  # deterministic, where a scatter-add with atomics is not
        return k.embedding_backward(dx, cache, dwte=dwte)
    idx, wte_shape, wpe_shape = cache
    xp = get_xp(dx)
    B, T, C = dx.shape
    dwpe = xp.zeros(wpe_shape, dtype=dx.dtype)
    dx.sum(axis=0, out=dwpe[:T])  # every sequence in the batch uses positions 0..T-1
    if dwte is None:
        dwte = xp.zeros(wte_shape, dtype=dx.dtype)
    # a token id may appear many times: its rows must accumulate, not overwrite
    backend_of(dx).scatter_add(dwte, idx.reshape(-1), dx.reshape(B * T, C))
    return dwte, dwpe


# --------------------------------------------------------------------------------------
# LayerNorm over the last axis (eps 1e-5 as GPT-2)


def layernorm_forward(x, weight, bias, eps=1e-5, operand=False):
    # x (B,T,C), weight (C,), bias (C,) -> out (B,T,C).
    # operand=True: out only feeds matmuls, so it comes back as matmul_operand(out) (on the
    # GPU in bf16, bf16 bits that the kernel writes directly: no float32 copy and cast)
    k = _kernels(x)
    if k is not None:
        return k.layernorm_forward(x, weight, bias, eps,
                                   bf16=operand and _PRECISION.get() == "bf16")
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
    if isinstance(cache, KernelCache):
        return cache.backward(dout, cache)
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
# small GEMMs on one BLAS thread

# A BLAS call of up to this many multiply-adds (a few ms on one core) runs on one thread
# where the backend offers it (numpy: threadpoolctl). Waking and joining OpenBLAS's threads
# costs more than such a GEMM saves, and on busy cores far more: measured on the shared
# 2-core box, (128,1024) @ (1024,512) took 64 ms on two threads and 10 ms on one, and a
# stack of 32 per-head (128,32) @ (32,128) GEMMs 30-1000 ms against 0.8 ms. Bigger GEMMs
# (GPT-2's c_fc, every lm_head) keep all threads.
_SERIAL_GEMM = 1 << 26


def _small_gemms(x, m, n, k):
    # the context for BLAS calls of (m,k) @ (k,n); a no-op for big ones or on the GPU
    be = backend_of(x)
    if m * n * k <= _SERIAL_GEMM and hasattr(be, "serial_blas"):
        return be.serial_blas()
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------
# linear in GPT-2's Conv1D layout: weight is (in, out), so out = x @ weight + bias


def linear_forward(x, weight, bias):
    # x (B,T,C), weight (C,OC), bias (OC,) or None (added by the caller) -> out (B,T,OC)
    C, OC = weight.shape
    # both operands are used again by the backward: on the GPU in bf16, cast once each
    x2 = matmul_operand(x.reshape(-1, C))  # for dweight
    w = matmul_operand(weight)  # for dx
    with _small_gemms(x, x2.shape[0], OC, C):
        out = matmul(x2, w)  # one (B*T,C) @ (C,OC) GEMM
    if bias is not None:
        out += bias
    return out.reshape(*x.shape[:-1], OC), (x2, x.shape, w)


def linear_backward(dout, cache):
    # dout (B,T,OC) -> dx (B,T,C), dweight (C,OC), dbias (OC,)
    x2, x_shape, weight = cache  # the forward's operands: x2 (B*T,C), weight (C,OC)
    C, OC = weight.shape
    dout2 = dout.reshape(-1, OC)  # (B*T,OC): every contraction is one 2-D GEMM
    d = matmul_operand(dout2)  # used by both products
    with _small_gemms(dout, dout2.shape[0], OC, C):
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
    # qkv (B,T,3C) -> y (B,T,C). bias: c_attn's (3C,) bias when qkv comes without it (the
    # fused GPU attention adds it on its way: no pass over (B,T,3C) of its own)
    k = _kernels(qkv)
    if k is not None and hasattr(k, "attention_forward"):
        return k.attention_forward(qkv, n_head, bias=bias)
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
    with _small_gemms(qkv, min(T, _ATT_BLOCK), T, hs):  # per head: (n,hs) @ (hs,r1)
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
    if isinstance(cache, KernelCache):
        return cache.backward(dy, cache)
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
    with _small_gemms(dqkv, min(T, _ATT_BLOCK), T, hs):
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


# --------------------------------------------------------------------------------------
# GELU, tanh approximation (as GPT-2 and nanoGPT's nn.GELU(approximate="tanh"))

_GELU_K = math.sqrt(2.0 / math.pi)  # a Python float: keeps float32 float32


def gelu_forward(x):
    # x (...) -> out (...);  out = 0.5 * x * (1 + tanh(K * (x + 0.044715 * x^3)))
    k = _kernels(x)
    if k is not None:
        return k.gelu_forward(x)
    xp = get_xp(x)
    t = x * x  # x*x*x, not x**3 (far slower); then the chain in place
    t *= x
    t *= 0.044715
    t += x
    t *= _GELU_K
    xp.tanh(t, out=t)
    out = t + 1.0
    out *= x
    out *= 0.5
    return out, (x, t)


def gelu_backward(dout, cache):
    # dout (...) -> dx (...)
    if isinstance(cache, KernelCache):
        return cache.backward(dout, cache)
    x, t = cache
    xp = get_xp(x)
    # d tanh(u)/du = 1 - tanh(u)^2, not 1/cosh(u)^2, which overflows for large |u|
    #   dx = 0.5 * (1 + t) + x * (1 - t^2) * 0.5 * K * (1 + 3 * 0.044715 * x^2)
    du = x * x
    du *= 3 * 0.044715
    du += 1.0
    du *= 0.5 * _GELU_K
    dx = t * t
    xp.subtract(1.0, dx, out=dx)  # 1 - t^2
    dx *= x
    dx *= du
    xp.add(t, 1.0, out=du)  # du's buffer is free again: 0.5 * (1 + t) goes there
    du *= 0.5
    dx += du
    dx *= dout
    return dx


# --------------------------------------------------------------------------------------
# MLP: c_fc -> GELU -> c_proj


def mlp_forward(x, p):
    # x (B,T,C), p: c_fc.weight (C,4C) c_fc.bias (4C,) c_proj.weight (4C,C) c_proj.bias (C,)
    k = _kernels(x)
    if k is not None and hasattr(k, "bias_gelu_forward"):
        # fused kernels: c_fc's bias is added inside the GELU kernel, one pass fewer over
        # (B,T,4C); the backward is the same (linear_backward sums the bias gradient)
        # in bf16 it writes c_proj's bf16 operand directly: no float32 (B,T,4C) to cast
        h, fc_cache = linear_forward(x, p["c_fc.weight"], None)
        h, gelu_cache = k.bias_gelu_forward(h, p["c_fc.bias"], bf16=_PRECISION.get() == "bf16")
    else:
        h, fc_cache = linear_forward(x, p["c_fc.weight"], p["c_fc.bias"])  # (B,T,4C)
        h, gelu_cache = gelu_forward(h)
    out, proj_cache = linear_forward(h, p["c_proj.weight"], p["c_proj.bias"])  # (B,T,C)
    return out, (fc_cache, gelu_cache, proj_cache)


def mlp_backward(dout, cache):
    fc_cache, gelu_cache, proj_cache = cache
    g = {}
    dh, g["c_proj.weight"], g["c_proj.bias"] = linear_backward(dout, proj_cache)
    dh = gelu_backward(dh, gelu_cache)
    dx, g["c_fc.weight"], g["c_fc.bias"] = linear_backward(dh, fc_cache)
    return dx, g


# --------------------------------------------------------------------------------------
# causal self-attention with its projections: c_attn -> attention -> c_proj


def attn_forward(x, p, n_head):
    # x (B,T,C), p: c_attn.weight (C,3C) c_attn.bias (3C,) c_proj.weight (C,C) c_proj.bias (C,)
    w, b = p["c_attn.weight"], p["c_attn.bias"]
    if _kernels(w) is not None:  # fused: the attention adds c_attn's bias as it reads qkv
        qkv, qkv_cache = linear_forward(x, w, None)  # (B,T,3C); its backward sums dbias
        y, att_cache = attention_forward(qkv, n_head, bias=b)  # (B,T,C)
    else:
        qkv, qkv_cache = linear_forward(x, w, b)
        y, att_cache = attention_forward(qkv, n_head)
    out, proj_cache = linear_forward(y, p["c_proj.weight"], p["c_proj.bias"])
    return out, (qkv_cache, att_cache, proj_cache)


def attn_backward(dout, cache):
    qkv_cache, att_cache, proj_cache = cache
    g = {}
    dy, g["c_proj.weight"], g["c_proj.bias"] = linear_backward(dout, proj_cache)
    dqkv = attention_backward(dy, att_cache)
    dx, g["c_attn.weight"], g["c_attn.bias"] = linear_backward(dqkv, qkv_cache)
    return dx, g


# --------------------------------------------------------------------------------------
# transformer block, pre-norm with residuals:
#   x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))


def sub_params(p, prefix):
    """The entries of `p` under `prefix`, with the prefix stripped ("attn.c_attn.weight" ->
    "c_attn.weight" for prefix "attn.")."""
    n = len(prefix)
    return {k[n:]: v for k, v in p.items() if k.startswith(prefix)}


def block_forward(x, p, n_head):
    # x (B,T,C), p: this block's params named as in the checkpoint without "transformer.h.i."
    # each LayerNorm's output only feeds a linear: it may come as its GEMM operand
    h, ln1_cache = layernorm_forward(x, p["ln_1.weight"], p["ln_1.bias"], operand=True)
    h, attn_cache = attn_forward(h, sub_params(p, "attn."), n_head)
    h += x  # residual, into the branch's fresh output (the caller's x stays untouched)
    x = h
    h, ln2_cache = layernorm_forward(x, p["ln_2.weight"], p["ln_2.bias"], operand=True)
    h, mlp_cache = mlp_forward(h, sub_params(p, "mlp."))
    h += x  # residual
    return h, (ln1_cache, attn_cache, ln2_cache, mlp_cache)


def block_backward(dx, cache):
    # dx (B,T,C) -> dx (B,T,C), grads named like block_forward's p
    ln1_cache, attn_cache, ln2_cache, mlp_cache = cache
    g = {}
    # the residual passes dx straight through; each branch adds its own contribution
    dh, mlp_g = mlp_backward(dx, mlp_cache)
    dh, g["ln_2.weight"], g["ln_2.bias"] = layernorm_backward(dh, ln2_cache)
    dh += dx
    dx = dh
    dh, attn_g = attn_backward(dx, attn_cache)
    dh, g["ln_1.weight"], g["ln_1.bias"] = layernorm_backward(dh, ln1_cache)
    dh += dx
    dx = dh
    g.update({"mlp." + k: v for k, v in mlp_g.items()})
    g.update({"attn." + k: v for k, v in attn_g.items()})
    return dx, g


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


def cross_entropy_forward(logits, targets, ignore_index=-1, out=None):
    # logits (B,T,V), targets (B,T) int -> loss (scalar array), cache.
    # out: optional (B,T,V) buffer for the softmax that the backward turns into dlogits.
    k = _kernels(logits)
    if k is not None:
        return k.cross_entropy_forward(logits, targets, ignore_index, out=out)
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
    step = N if xp is not np else max(1, _CE_BLOCK_BYTES // (V * logits.itemsize))
    for r in range(0, N, step):
        rows, p = logits2[r:r + step], probs[r:r + step]
        m = rows.max(axis=-1, keepdims=True)  # shift by the row max: exp cannot overflow
        xp.subtract(rows, m, out=p)
        xp.exp(p, out=p)
        s = p.sum(axis=-1, keepdims=True)
        p *= weight[r:r + step, None] / s
        lse[r:r + step] = xp.log(s) + m
    # -log p[target] = logsumexp - logit[target]: a gather of N entries, not of (N,V)
    nll = (lse[:, 0] - logits2[xp.arange(N), tsafe]) * valid
    # like torch: the mean over no tokens is nan
    loss = nll.sum() / n_valid if n_valid else nll.sum() * float("nan")
    return loss, (probs, tsafe, weight, logits.shape)


def cross_entropy_backward(dloss, cache, operand=False):
    # dloss scalar -> dlogits (B,T,V) = dloss * (softmax - onehot) / n_valid, zero on ignored
    # rows. Works in place on the cached (already weighted) softmax, the biggest buffer we
    # have: call it once per forward. operand=True: dlogits only feeds matmuls (the
    # lm_head's backward), so it comes back as matmul_operand(dlogits) (on the GPU in bf16,
    # bf16 bits that the kernel writes directly)
    if isinstance(cache, KernelCache):
        return cache.backward(dloss, cache, bf16=operand and _PRECISION.get() == "bf16")
    probs, tsafe, weight, shape = cache
    xp = get_xp(probs)
    dlogits = probs
    dlogits[xp.arange(tsafe.shape[0]), tsafe] -= weight  # the onehot, weighted as the rows
    dloss = float(dloss)
    if dloss != 1.0:  # the model's backward passes 1.0: no pass over (B*T,V) then
        dlogits *= dloss
    dlogits = dlogits.reshape(shape)
    return matmul_operand(dlogits) if operand else dlogits
