"""GPT-2's layers, one forward/backward pair each, over NumPy or CuPy arrays.

Conventions (as llm.c's train_gpt2.c):
  B batch, T time, C channels (n_embd), NH heads, hs = C // NH, V vocab, OC output channels.
  `*_forward(inputs, params) -> out, cache`; `*_backward(dout, cache) -> dinputs, dparams`.
  Caches hold only what the backward reads. No autograd, no globals. The array module `xp`
  is taken from the inputs, so the same code runs on the CPU (numpy) and the GPU (cupy).
  Nothing here upcasts: Python float scalars keep float32 arrays float32 (NEP 50), while a
  numpy float64 scalar (np.sqrt(2/np.pi)) would silently promote whole tensors.
"""
from __future__ import annotations

import math

import numpy as np

from backends import backend_of


def get_xp(x):
    return backend_of(x).xp


# --------------------------------------------------------------------------------------
# token + position embedding


def embedding_forward(idx, wte, wpe):
    # idx (B,T) int, wte (V,C), wpe (block_size,C) -> x (B,T,C)
    T = idx.shape[1]
    x = wte[idx] + wpe[:T]
    return x, (idx, wte.shape, wpe.shape)


def embedding_backward(dx, cache):
    # dx (B,T,C) -> dwte (V,C), dwpe (block_size,C)
    idx, wte_shape, wpe_shape = cache
    xp = get_xp(dx)
    B, T, C = dx.shape
    dwpe = xp.zeros(wpe_shape, dtype=dx.dtype)
    dwpe[:T] = dx.sum(axis=0)  # every sequence in the batch uses positions 0..T-1
    dwte = xp.zeros(wte_shape, dtype=dx.dtype)
    # a token id may appear many times: its rows must accumulate, not overwrite
    backend_of(dx).scatter_add(dwte, idx.reshape(-1), dx.reshape(B * T, C))
    return dwte, dwpe


# --------------------------------------------------------------------------------------
# LayerNorm over the last axis (eps 1e-5 as GPT-2)


def layernorm_forward(x, weight, bias, eps=1e-5):
    # x (B,T,C), weight (C,), bias (C,) -> out (B,T,C)
    xp = get_xp(x)
    mean = x.mean(axis=-1, keepdims=True)  # (B,T,1)
    xc = x - mean
    var = (xc * xc).mean(axis=-1, keepdims=True)  # biased variance, as torch
    rstd = 1.0 / xp.sqrt(var + eps)  # (B,T,1)
    norm = xc * rstd  # (B,T,C) zero mean, unit variance
    out = norm * weight + bias
    return out, (norm, rstd, weight)


def layernorm_backward(dout, cache):
    # dout (B,T,C) -> dx (B,T,C), dweight (C,), dbias (C,)
    norm, rstd, weight = cache
    lead = tuple(range(dout.ndim - 1))
    dbias = dout.sum(axis=lead)
    dweight = (dout * norm).sum(axis=lead)
    dnorm = dout * weight
    # d/dx of (x - mean) * rstd: the mean and the variance each depend on every x
    dx = dnorm - dnorm.mean(axis=-1, keepdims=True)
    dx -= norm * (dnorm * norm).mean(axis=-1, keepdims=True)
    dx *= rstd
    return dx, dweight, dbias


# --------------------------------------------------------------------------------------
# linear in GPT-2's Conv1D layout: weight is (in, out), so out = x @ weight + bias


def linear_forward(x, weight, bias):
    # x (B,T,C), weight (C,OC), bias (OC,) -> out (B,T,OC)
    out = x @ weight
    out += bias
    return out, (x, weight)


def linear_backward(dout, cache):
    # dout (B,T,OC) -> dx (B,T,C), dweight (C,OC), dbias (OC,)
    x, weight = cache
    C, OC = weight.shape
    dout2 = dout.reshape(-1, OC)  # one (B*T)-row GEMM, not B small ones
    dx = dout @ weight.T
    dweight = x.reshape(-1, C).T @ dout2
    dbias = dout2.sum(axis=0)
    return dx, dweight, dbias


# --------------------------------------------------------------------------------------
# causal self-attention core: from the fused qkv projection to the merged heads


def attention_forward(qkv, n_head):
    # qkv (B,T,3C) -> y (B,T,C)
    xp = get_xp(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    # (B,T,3,NH,hs) -> (3,B,NH,T,hs): q, k, v each (B,NH,T,hs)
    q, k, v = qkv.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)
    scale = 1.0 / math.sqrt(hs)
    att = (q @ k.transpose(0, 1, 3, 2)) * scale  # (B,NH,T,T)
    # causal mask: position t attends to 0..t only
    future = xp.triu(xp.ones((T, T), dtype=bool), k=1)
    att[..., future] = -xp.inf
    att -= att.max(axis=-1, keepdims=True)  # stable softmax; the diagonal is never masked
    xp.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    y = att @ v  # (B,NH,T,hs)
    y = y.transpose(0, 2, 1, 3).reshape(B, T, C)  # merge heads
    return y, (q, k, v, att, scale)


def attention_backward(dy, cache):
    # dy (B,T,C) -> dqkv (B,T,3C)
    q, k, v, att, scale = cache
    xp = get_xp(dy)
    B, NH, T, hs = q.shape
    dy = dy.reshape(B, T, NH, hs).transpose(0, 2, 1, 3)  # split heads (B,NH,T,hs)
    dv = att.transpose(0, 1, 3, 2) @ dy  # (B,NH,T,hs)
    datt = dy @ v.transpose(0, 1, 3, 2)  # (B,NH,T,T)
    # softmax backward without the Jacobian: dpre = att * (datt - sum(att * datt))
    # masked entries have att == 0, so their gradient is 0 as it must be
    datt -= (att * datt).sum(axis=-1, keepdims=True)
    datt *= att
    datt *= scale
    dq = datt @ k
    dk = datt.transpose(0, 1, 3, 2) @ q
    dqkv = xp.stack([dq, dk, dv])  # (3,B,NH,T,hs)
    return dqkv.transpose(1, 3, 0, 2, 4).reshape(B, T, 3 * NH * hs)


# --------------------------------------------------------------------------------------
# GELU, tanh approximation (as GPT-2 and nanoGPT's nn.GELU(approximate="tanh"))

_GELU_K = math.sqrt(2.0 / math.pi)  # a Python float: keeps float32 float32


def gelu_forward(x):
    # x (...) -> out (...)
    xp = get_xp(x)
    t = xp.tanh(_GELU_K * (x + 0.044715 * (x * x * x)))  # x*x*x, not x**3 (far slower)
    out = 0.5 * x * (1.0 + t)
    return out, (x, t)


def gelu_backward(dout, cache):
    x, t = cache
    # d tanh(u)/du = 1 - tanh(u)^2, not 1/cosh(u)^2, which overflows for large |u|
    du = _GELU_K * (1.0 + 3 * 0.044715 * (x * x))
    dx = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
    return dout * dx


# --------------------------------------------------------------------------------------
# MLP: c_fc -> GELU -> c_proj


def mlp_forward(x, p):
    # x (B,T,C), p: c_fc.weight (C,4C) c_fc.bias (4C,) c_proj.weight (4C,C) c_proj.bias (C,)
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
    qkv, qkv_cache = linear_forward(x, p["c_attn.weight"], p["c_attn.bias"])  # (B,T,3C)
    y, att_cache = attention_forward(qkv, n_head)  # (B,T,C)
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


def _sub(p, prefix):
    n = len(prefix)
    return {k[n:]: v for k, v in p.items() if k.startswith(prefix)}


def block_forward(x, p, n_head):
    # x (B,T,C), p: this block's params named as in the checkpoint without "transformer.h.i."
    h, ln1_cache = layernorm_forward(x, p["ln_1.weight"], p["ln_1.bias"])
    h, attn_cache = attn_forward(h, _sub(p, "attn."), n_head)
    x = x + h  # residual
    h, ln2_cache = layernorm_forward(x, p["ln_2.weight"], p["ln_2.bias"])
    h, mlp_cache = mlp_forward(h, _sub(p, "mlp."))
    x = x + h  # residual
    return x, (ln1_cache, attn_cache, ln2_cache, mlp_cache)


def block_backward(dx, cache):
    # dx (B,T,C) -> dx (B,T,C), grads named like block_forward's p
    ln1_cache, attn_cache, ln2_cache, mlp_cache = cache
    g = {}
    # the residual passes dx straight through; each branch adds its own contribution
    dh, mlp_g = mlp_backward(dx, mlp_cache)
    dh, g["ln_2.weight"], g["ln_2.bias"] = layernorm_backward(dh, ln2_cache)
    dx = dx + dh
    dh, attn_g = attn_backward(dx, attn_cache)
    dh, g["ln_1.weight"], g["ln_1.bias"] = layernorm_backward(dh, ln1_cache)
    dx = dx + dh
    g.update({"mlp." + k: v for k, v in mlp_g.items()})
    g.update({"attn." + k: v for k, v in attn_g.items()})
    return dx, g


# --------------------------------------------------------------------------------------
# lm_head, tied to wte: logits = x @ wte.T


def lm_head_forward(x, wte):
    # x (B,T,C), wte (V,C) -> logits (B,T,V)
    return x @ wte.T, (x, wte)


def lm_head_backward(dlogits, cache):
    # dlogits (B,T,V) -> dx (B,T,C), dwte (V,C) (the lm_head share of the tied gradient)
    x, wte = cache
    V, C = wte.shape
    dx = dlogits @ wte
    dwte = dlogits.reshape(-1, V).T @ x.reshape(-1, C)
    return dx, dwte


# --------------------------------------------------------------------------------------
# cross-entropy: mean over the tokens whose target is not ignore_index (-1, as nanoGPT)


def cross_entropy_forward(logits, targets, ignore_index=-1):
    # logits (B,T,V), targets (B,T) int -> loss (scalar array), cache
    xp = get_xp(logits)
    V = logits.shape[-1]
    logits2 = logits.reshape(-1, V)
    t = targets.reshape(-1)
    valid = t != ignore_index
    n_valid = int(valid.sum())
    tsafe = xp.where(valid, t, 0)
    # softmax kept for the backward; log-sum-exp shifted by the row max for stability
    maxes = logits2.max(axis=-1, keepdims=True)
    probs = logits2 - maxes
    xp.exp(probs, out=probs)
    sums = probs.sum(axis=-1, keepdims=True)
    probs /= sums
    rows = xp.arange(t.shape[0])
    # -log p[target] = log(sum) + max - logit[target]
    nll = (xp.log(sums[:, 0]) + maxes[:, 0] - logits2[rows, tsafe]) * valid
    # like torch: the mean over no tokens is nan
    loss = nll.sum() / n_valid if n_valid else nll.sum() * float("nan")
    return loss, (probs, tsafe, valid, n_valid, logits.shape)


def cross_entropy_backward(dloss, cache):
    # dloss scalar -> dlogits (B,T,V) = (softmax - onehot) / N, zero on ignored rows.
    # Reuses the cached softmax buffer in place: a (B,T,V) buffer is the biggest we have.
    probs, tsafe, valid, n_valid, shape = cache
    xp = get_xp(probs)
    rows = xp.arange(tsafe.shape[0])
    dlogits = probs
    dlogits[rows, tsafe] -= 1.0
    scale = (float(dloss) / n_valid) if n_valid else 0.0
    dlogits *= (valid * scale).astype(probs.dtype)[:, None]
    return dlogits.reshape(shape)
