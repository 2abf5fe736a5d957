"""Scoring endings that share a prefix, the prefix run once: a multiple-choice eval's items
(one context, several endings), scored as the rows context + ending are.

    sums, counts = continuation_losses(model, prefixes, endings)

Scoring a row per ending runs the context once per ending, and pads every row to the
longest. Here an item is one packed row, its context followed by its endings,

    row:       c0 c1 c2 | a0 a1 | b0 b1 b2 | ...      (ending a = a0 a1 a2, b = b0..b3)
    position:   0  1  2 |  3  4 |  3  4  5 |

where every ending starts at the context's end (its positions continue the context's) and
attends to the context and to its own earlier tokens only, as if it were the context's only
continuation: a mask (not causality alone) says which keys each token sees. An ending's
first token is predicted at the context's last position, the others at the ending's own
positions, so an ending's last token is never an input. For HellaSwag (contexts of ~50
tokens, four endings of ~25) that runs about half of the tokens of the rows; the losses are those
of the rows, to float rounding. Many items run in one forward: their tokens end to end,
and for attention in rows padded on the right.

Every layer is the model's own (gpt2np.model.block_forward with the model's ops), attention
its masked_attention_forward: the mask, not causality alone, says what a token sees.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from gpt2np import layers as L
from gpt2np.model import block_forward


def continuation_losses(model, prefixes, endings):
    """Losses of each ending's tokens given its prefix, by a gpt2np.GPT.

    prefixes: n int sequences (each >= 1 token); endings: n lists of k int sequences
    (each >= 1 token), the same k for every item; every prefix + ending within the
    block size. Returns (sums (n, k) float64, counts (n, k) int64): each ending's summed
    cross-entropy and its number of tokens."""
    prefixes = [np.asarray(p, dtype=np.int64) for p in prefixes]
    endings = [[np.asarray(e, dtype=np.int64) for e in ends] for ends in endings]
    _check(model, prefixes, endings)
    with L.matmul_precision(model.precision, model.backend):
        return _losses(model, prefixes, endings)


def _check(model, prefixes, endings):
    k = len(endings[0]) if endings else 0
    if not prefixes or len(prefixes) != len(endings) or k == 0 or \
            any(len(ends) != k for ends in endings):
        raise ValueError(f"continuation_losses needs n >= 1 prefixes and n lists of the same "
                         f"number (>= 1) of endings, got {len(prefixes)} prefixes and ending "
                         f"counts {sorted({len(e) for e in endings})}")
    bs, V = model.config.block_size, model.config.vocab_size
    for i, (p, ends) in enumerate(zip(prefixes, endings)):
        if len(p) == 0 or any(len(e) == 0 for e in ends):
            raise ValueError(f"item {i}: a prefix or an ending is empty")
        if any(a.min() < 0 or a.max() >= V for a in (p, *ends)):
            raise ValueError(f"item {i}: a token id outside [0, vocab_size={V})")
        if len(p) + max(map(len, ends)) > bs:
            raise ValueError(f"item {i}: prefix + ending is {len(p) + max(map(len, ends))} "
                             f"tokens, longer than the block size {bs}")


def _losses(model, prefixes, endings):
    n, k = len(prefixes), len(endings[0])
    lens = np.array([[len(e) for e in ends] for ends in endings], dtype=np.int64)  # (n,k)
    idx, pos, seg = _pack(prefixes, endings)
    real = np.flatnonzero(seg.reshape(-1) >= 0)  # the tokens in the (n,L) rows, not padding
    h = _blocks(model, idx, pos, _mask(model, seg), real)  # (N,C): one row per token of real
    # the scored positions: an ending's first token at the context's last position, its
    # token t >= 1 at its own token t-1
    rows, cols, targets, owner = [], [], [], []
    for i, (p, ends) in enumerate(zip(prefixes, endings)):
        at = len(p)  # where the item's next ending starts in the row
        for j, e in enumerate(ends):
            rows.append(np.full(len(e), i))
            cols.append(np.concatenate([[len(p) - 1], at + np.arange(len(e) - 1)]))
            targets.append(e)
            owner.append(np.full(len(e), i * k + j))
            at += len(e) - 1
    rows, cols, targets, owner = (np.concatenate(a) for a in (rows, cols, targets, owner))
    token = np.searchsorted(real, rows * idx.shape[1] + cols)  # (row, col) -> its row in h
    asarray = model.backend.asarray
    losses = model.head_losses(h[asarray(token)], asarray(targets))
    sums = np.bincount(owner, weights=losses, minlength=n * k).reshape(n, k)
    return sums, lens


def _pack(prefixes, endings):
    # -> tokens idx, positions pos and segments seg, each (n,L) int64: seg 0 for the
    # context, j + 1 for ending j (its tokens but the last), -1 for padding
    widths = [len(p) + sum(len(e) - 1 for e in ends) for p, ends in zip(prefixes, endings)]
    n, L = len(prefixes), max(widths)
    idx, pos = np.zeros((n, L), dtype=np.int64), np.zeros((n, L), dtype=np.int64)
    seg = np.full((n, L), -1, dtype=np.int64)
    for i, (p, ends) in enumerate(zip(prefixes, endings)):
        idx[i, :len(p)], pos[i, :len(p)], seg[i, :len(p)] = p, np.arange(len(p)), 0
        at = len(p)
        for j, e in enumerate(ends):
            m = len(e) - 1
            idx[i, at:at + m], pos[i, at:at + m] = e[:-1], len(p) + np.arange(m)
            seg[i, at:at + m] = j + 1
            at += m
    return idx, pos, seg


def _mask(model, seg):
    # (n,1,L,L) additive 0 / -inf in the model's dtype: a token sees the earlier tokens of
    # the context and of its own ending; a padded one sees itself (its output is unused)
    L = seg.shape[1]
    sq, sk = seg[:, :, None], seg[:, None, :]
    allow = np.tril(np.ones((L, L), dtype=bool))[None] & (sk >= 0) & ((sk == 0) | (sk == sq))
    allow |= np.eye(L, dtype=bool)[None]
    return model.backend.asarray(np.where(allow[:, None], 0.0, -np.inf).astype(model.dtype))


def _blocks(model, idx, pos, mask, real):
    # tokens idx (n,L) at positions pos (n,L), attention masked by mask (n,1,L,L) -> ln_f's
    # output at the positions real of the flattened (n*L) rows, (N,C). Every layer but
    # attention sees only those N tokens, end to end (padding would be ~12% more rows for
    # a few items of mixed lengths); attention sees them in their (n,L) rows
    be, p, cfg = model.backend, model.params, model.config
    xp, (n, L_), keep = be.xp, idx.shape, be.asarray(real)
    tok, at = (be.asarray(a.reshape(-1)[real]) for a in (idx, pos))  # (N,)
    x = p["transformer.wte.weight"][tok] + p["transformer.wpe.weight"][at]
    rows = None  # (n*L, 3C): qkv in the rows for attention; padding stays 0 in every layer
    masked = model.ops.masked_attention_forward

    def attention_forward(qkv, n_head, bias=None):  # the model's attention, with the mask
        nonlocal rows
        if rows is None:
            rows = xp.zeros((n * L_, qkv.shape[-1]), dtype=qkv.dtype)
        rows[keep] = qkv[0]
        y = masked(rows.reshape(n, L_, -1), n_head, mask, bias)  # (n,L,C)
        return y.reshape(n * L_, -1)[keep][None], None

    ops = dataclasses.replace(model.ops, attention_forward=attention_forward)
    x = x[None]  # (1,N,C)
    for i in range(cfg.n_layer):
        x, _ = block_forward(ops, x, model.block_params(i), cfg.n_head)
    h, _ = model.ops.layernorm_forward(x, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"])
    return h[0]
