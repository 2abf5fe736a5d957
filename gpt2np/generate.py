"""Sampling from a GPT: temperature, top-k, greedy, with a KV cache; and the generate command.

    gpt2np generate --model out/shakespeare --prompt "ROMEO:"   (or `gpt2np generate`)

Inference runs the model's own layer functions (model.ops: gpt2np.layers' or fused kernels;
their caches for the backward are dropped); only attention is written here, because with a KV cache the new positions attend
to keys and values kept from earlier steps. Each new token then costs one position's work:
the matrix-vector products of that position plus attention over the cached positions,
instead of a forward over the whole context.

Sampling itself runs on the host in float64 from the last position's logits (B*V numbers a
step), with a numpy Generator: the same seed gives the same tokens on every backend. A
vocabulary padded past GPT-2's 50257 tokens (50304, for GPU speed) has rows that are no
token: their logits are dropped before any sampler sees them, so they are never sampled.
"""
from __future__ import annotations

import math

import numpy as np

from gpt2np import layers as L
from gpt2np.config import GPT2_VOCAB_SIZE


def sampled_vocab(config) -> int:
    """How many leading logits are tokens: all of them, unless the vocabulary is padded past
    GPT-2's 50257 BPE tokens (train's --vocab-size 50304), whose extra rows are no tokens."""
    return min(config.vocab_size, GPT2_VOCAB_SIZE)


class KVCache:
    """Keys and values of every layer for the positions seen so far.

    k[i], v[i]: (B, NH, capacity, hs) arrays of the model's backend and dtype; positions
    0..length-1 are filled. Sized to the longest context a generate call needs, not to
    block_size, so short generations stay small.
    """

    def __init__(self, model, batch: int, capacity: int):
        cfg = model.config
        if not 1 <= capacity <= cfg.block_size:
            raise ValueError(f"KV cache capacity {capacity} must be in [1, block_size={cfg.block_size}]")
        xp = model.xp
        shape = (batch, cfg.n_head, capacity, cfg.n_embd // cfg.n_head)
        self.k = [xp.zeros(shape, dtype=model.dtype) for _ in range(cfg.n_layer)]
        self.v = [xp.zeros(shape, dtype=model.dtype) for _ in range(cfg.n_layer)]
        self.batch, self.capacity, self.length = batch, capacity, 0

    def reset(self):
        self.length = 0  # the buffers are overwritten as positions are written again


def _layer_params(model):
    """Per block, its params without the "transformer.h.i." prefix."""
    return [model.block_params(i) for i in range(model.config.n_layer)]


def _cached_attention(qkv, cache: KVCache, layer: int, t0: int, n_head: int):
    # qkv (B,T,3C) for positions t0..t0+T-1 -> y (B,T,C); stores their k, v at t0..t0+T-1
    xp = L.get_xp(qkv)
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    q, k, v = qkv.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)  # each (B,NH,T,hs)
    end = t0 + T
    cache.k[layer][:, :, t0:end] = k
    cache.v[layer][:, :, t0:end] = v
    K = cache.k[layer][:, :, :end]  # (B,NH,end,hs): every position up to the newest
    V = cache.v[layer][:, :, :end]
    att = L.matmul(q, K.transpose(0, 1, 3, 2)) * (1.0 / math.sqrt(hs))  # (B,NH,T,end)
    if T > 1:  # new position t0+i sees keys 0..t0+i; a single new position sees them all
        future = xp.arange(end)[None, :] > (t0 + xp.arange(T))[:, None]  # (T,end)
        att[..., future] = -xp.inf
    att -= att.max(axis=-1, keepdims=True)
    xp.exp(att, out=att)
    att /= att.sum(axis=-1, keepdims=True)
    y = L.matmul(att, V)  # (B,NH,T,hs)
    return y.transpose(0, 2, 1, 3).reshape(B, T, C)


def forward_cached(model, idx, cache: KVCache, *, all_logits: bool = False, _blocks=None):
    """Run new tokens idx (B,T) (backend ints) at positions cache.length.. through the model,
    appending their keys and values to the cache.

    Returns logits (B,T,V) if all_logits else those of the last new position (B,1,V).
    """
    B, T = idx.shape
    if B != cache.batch:
        raise ValueError(f"batch {B} does not match the cache's {cache.batch}")
    if cache.length + T > cache.capacity:
        raise ValueError(f"{cache.length} cached + {T} new positions exceed the cache "
                         f"capacity {cache.capacity}")
    blocks = _blocks if _blocks is not None else _layer_params(model)
    with L.matmul_precision(model.precision, model.backend):  # as the model's forward
        return _forward_cached(model, idx, cache, all_logits, blocks)


def _forward_cached(model, idx, cache, all_logits, blocks):
    cfg, p, ops = model.config, model.params, model.ops
    B, T = idx.shape
    t0 = cache.length
    # positions t0..t0+T-1: hand embedding_forward the position table from row t0 on
    x, _ = ops.embedding_forward(idx, p["transformer.wte.weight"], p["transformer.wpe.weight"][t0:])
    C = cfg.n_embd
    x = x.reshape(B * T, C)  # 2-D rows: one GEMM (or GEMV) per weight, read once per step
    for i, bp in enumerate(blocks):  # as gpt2np.model.block_forward, attention aside
        h, _ = ops.layernorm_forward(x, bp["ln_1.weight"], bp["ln_1.bias"], operand=True)
        qkv, _ = ops.linear_forward(h, bp["attn.c_attn.weight"], bp["attn.c_attn.bias"])
        y = _cached_attention(qkv.reshape(B, T, 3 * C), cache, i, t0, cfg.n_head)
        h, _ = ops.linear_forward(y.reshape(B * T, C), bp["attn.c_proj.weight"], bp["attn.c_proj.bias"])
        x = x + h
        h, _ = ops.layernorm_forward(x, bp["ln_2.weight"], bp["ln_2.bias"], operand=True)
        h, _ = ops.linear_forward(h, bp["mlp.c_fc.weight"], None)
        h, _ = ops.gelu_forward(h, bp["mlp.c_fc.bias"], operand=True)
        h, _ = ops.linear_forward(h, bp["mlp.c_proj.weight"], bp["mlp.c_proj.bias"])
        x = x + h
    cache.length = t0 + T
    if not all_logits:  # the lm_head is the biggest matmul: only where we sample
        x, T = x.reshape(B, T, C)[:, -1], 1
    x, _ = ops.layernorm_forward(x, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"],
                                operand=True)
    logits, _ = ops.lm_head_forward(x, p["transformer.wte.weight"])  # 2-D: (B*T,C) @ (C,V)
    return logits.reshape(B, T, -1)


# ------------------------------------------------------------------------------ sampling


def sample_next(logits, temperature: float, top_k: int | None, rng: np.random.Generator):
    """logits (B,V) host -> next ids (B,) int64. temperature 0 is greedy (argmax).
    Non-finite logits are an error: from a NaN, argmax and the inverse CDF both give id 0."""
    _check_sampling(temperature, top_k)
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[1] == 0:
        raise ValueError(f"logits must be (B, V) with V >= 1, got shape {logits.shape}")
    if not np.isfinite(logits).all():
        rows = np.flatnonzero(~np.isfinite(logits).all(axis=-1))
        raise FloatingPointError(f"the logits of {len(rows)} of {len(logits)} row(s) (the first: "
                                 f"row {rows[0]}) hold NaN or inf: the model's weights or "
                                 f"activations are not finite, there is nothing to sample")
    if temperature == 0:
        return logits.argmax(axis=-1)  # first maximum on ties, as torch.argmax
    # shift by the max before dividing: a tiny temperature then gives 0 and -inf, never inf - inf
    logits = (logits - logits.max(axis=-1, keepdims=True)) / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        # keep the k largest (and any tied with the k-th), as nanoGPT: the rest get -inf
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
    probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
    cdf = np.cumsum(probs, axis=-1)
    u = rng.random(logits.shape[0])[:, None] * cdf[:, -1:]
    # inverse CDF: the first id whose cumulative mass exceeds u (never a zero-mass id)
    return np.minimum((cdf <= u).sum(axis=-1), logits.shape[-1] - 1)


def _check_sampling(temperature, top_k):
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.integer, np.floating)) \
            or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer))
                              or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")


def _check_args(model, idx, max_new_tokens, temperature, top_k, seed):
    ids = np.asarray(model.backend.to_host(idx) if hasattr(idx, "shape") else idx)
    if ids.ndim != 2 or ids.shape[0] == 0 or ids.shape[1] == 0:
        raise ValueError(f"idx must be a non-empty (B, T) array of token ids, got shape {ids.shape}")
    if ids.dtype.kind not in "iu":
        raise TypeError(f"idx must hold integer token ids, got dtype {ids.dtype}")
    V = model.config.vocab_size
    if ids.min() < 0 or ids.max() >= V:
        raise ValueError(f"idx holds token ids from {ids.min()} to {ids.max()}, outside "
                         f"[0, vocab_size={V}) of this model")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
            or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    _check_sampling(temperature, top_k)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer))
                             or seed < 0):
        raise ValueError(f"seed must be None or an int >= 0, got {seed!r}")
    return ids.astype(np.int64)


def generate(model, idx, max_new_tokens: int, *, temperature: float = 1.0, top_k: int | None = None,
             seed: int | None = None, use_cache: bool = True) -> np.ndarray:
    """Continue each row of idx (B,T) by max_new_tokens sampled tokens; return (B, T+new) host ids.

    temperature=0 is greedy. top_k keeps the k most likely tokens (nanoGPT samples with 50).
    seed makes sampling reproducible (None: fresh randomness).
    Past block_size the context is cropped to its last block_size tokens, as nanoGPT does;
    positions then shift, so from there on each token recomputes that window.
    use_cache=False recomputes the full context every token (the reference, and the
    benchmark's baseline); both give the same tokens.
    A vocab_size past GPT-2's 50257 is taken as padding (train's --vocab-size 50304): ids from
    50257 on are never sampled (see sampled_vocab).
    """
    ids = _check_args(model, idx, max_new_tokens, temperature, top_k, seed)
    rng = np.random.default_rng(seed)
    if max_new_tokens == 0:
        return ids
    B, T = ids.shape
    bs = model.config.block_size
    to_dev, to_host = model.backend.asarray, model.backend.to_host

    n_tok = sampled_vocab(model.config)  # (the padded rows never reach a sampler)
    if not use_cache:
        for _ in range(max_new_tokens):
            logits, _ = model.forward(ids[:, -bs:])
            nxt = sample_next(to_host(logits[:, -1, :n_tok]), temperature, top_k, rng)
            ids = np.concatenate([ids, nxt[:, None]], axis=1)
        return ids

    blocks = _layer_params(model)
    # the longest context we will hold: the prompt (cropped) plus all new tokens but the last
    cache = KVCache(model, B, min(bs, T + max_new_tokens - 1))
    logits = forward_cached(model, to_dev(ids[:, -bs:]), cache, _blocks=blocks)
    out = [ids]
    for step in range(max_new_tokens):
        nxt = sample_next(to_host(logits[:, -1, :n_tok]), temperature, top_k, rng)
        out.append(nxt[:, None])
        if step == max_new_tokens - 1:
            break
        if cache.length < cache.capacity:
            # one position: every product is small or a matrix-vector one, whose threads the
            # backend chooses (by timing such steps)
            with model.backend.decoding():
                logits = forward_cached(model, to_dev(nxt[:, None]), cache, _blocks=blocks)
        else:  # the window is full: crop and recompute, since every position moves by one
            ids = np.concatenate(out, axis=1)
            out = [ids]
            cache.reset()
            logits = forward_cached(model, to_dev(ids[:, -bs:]), cache, _blocks=blocks)
    return np.concatenate(out, axis=1)
