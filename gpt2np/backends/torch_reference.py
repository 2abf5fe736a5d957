"""The PyTorch reference: the gradient oracle.

`TorchGPT` is GPT-2 as build-nanogpt writes it (pre-norm Block, tanh GELU, lm_head tied to
wte, NANOGPT_SCALE_INIT on the c_proj weights), with parameters named like the Hugging Face
checkpoint and linears in its Conv1D (in, out) layout, so it loads and exports exactly the
params dict of `gpt2np.GPT`. Autograd computes its gradients; nothing here is hand-derived.

The `ref_*` functions are the per-layer references the tests compare the hand-written
layers against. Only the tests, the training script's `--backend torch` and the benchmarks
import this module: gpt2np itself never needs torch.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from gpt2np.config import GPTConfig

# ---------------------------------------------------------------------------- per-layer refs


def ref_embedding(idx, wte, wpe):
    return F.embedding(idx, wte) + wpe[: idx.shape[1]]


def ref_layernorm(x, weight, bias, eps=1e-5):
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def ref_linear(x, weight, bias):  # weight (in, out): Conv1D layout
    return x @ weight + bias


def ref_attention(qkv, n_head):
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = qkv.split(C, dim=2)
    q, k, v = (t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))
    # the explicit masked softmax rather than SDPA, so every backend of torch agrees in float64
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))
    mask = torch.ones(T, T, dtype=torch.bool, device=qkv.device).tril()
    att = att.masked_fill(~mask, float("-inf"))
    att = F.softmax(att, dim=-1)
    y = att @ v
    return y.transpose(1, 2).contiguous().view(B, T, C)


def ref_gelu(x):
    return F.gelu(x, approximate="tanh")


def ref_cross_entropy(logits, targets, ignore_index=-1):
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1),
                           ignore_index=ignore_index)


# ---------------------------------------------------------------------------- the module


class Conv1D(nn.Module):
    """Linear with weight (in, out), as GPT-2's checkpoint stores it."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_in, n_out))
        self.bias = nn.Parameter(torch.zeros(n_out))

    def forward(self, x):
        return ref_linear(x, self.weight, self.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, flash: bool = False):
        super().__init__()
        self.n_head = config.n_head
        self.flash = flash
        self.c_attn = Conv1D(config.n_embd, 3 * config.n_embd)
        self.c_proj = Conv1D(config.n_embd, config.n_embd)
        self.c_proj.NANOGPT_SCALE_INIT = 1

    def forward(self, x):
        qkv = self.c_attn(x)
        if self.flash:  # fast path for benchmarks and training: SDPA (flash on GPUs)
            B, T, C3 = qkv.shape
            q, k, v = qkv.split(C3 // 3, dim=2)
            q, k, v = (t.view(B, T, self.n_head, -1).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            y = y.transpose(1, 2).contiguous().view(B, T, C3 // 3)
        else:
            y = ref_attention(qkv, self.n_head)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Conv1D(config.n_embd, 4 * config.n_embd)
        self.c_proj = Conv1D(4 * config.n_embd, config.n_embd)
        self.c_proj.NANOGPT_SCALE_INIT = 1

    def forward(self, x):
        return self.c_proj(ref_gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, flash: bool = False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config, flash)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        x = x + self.mlp(self.ln_2(x))
        return x


class TorchGPT(nn.Module):
    def __init__(self, config: GPTConfig, flash: bool = False):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config, flash) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd),
        ))
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, (Conv1D, nn.Embedding)):
            std = 0.02
            if hasattr(module, "NANOGPT_SCALE_INIT"):
                std *= (2 * self.config.n_layer) ** -0.5
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} is longer than the block size {self.config.block_size}")
        x = ref_embedding(idx, self.transformer.wte.weight, self.transformer.wpe.weight)
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        logits = x @ self.transformer.wte.weight.T  # lm_head tied to wte
        loss = None if targets is None else ref_cross_entropy(logits, targets)
        return logits, loss

    # the params dict, shared with gpt2np.GPT ---------------------------------------------

    def load_params(self, params: dict):
        """Copy a gpt2np params dict (numpy arrays) into this module's parameters."""
        own = dict(self.named_parameters())
        if set(own) != set(params):
            raise ValueError(f"params do not match: missing {sorted(set(own) - set(params))[:5]}, "
                             f"unexpected {sorted(set(params) - set(own))[:5]}")
        with torch.no_grad():
            for name, p in own.items():
                value = torch.as_tensor(np.asarray(params[name]))
                if tuple(value.shape) != tuple(p.shape):
                    raise ValueError(f"param {name!r} has shape {tuple(value.shape)}, expected {tuple(p.shape)}")
                p.copy_(value)
        return self

    def export_params(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().copy() for k, v in self.named_parameters()}

    def grads(self) -> dict[str, np.ndarray]:
        return {k: v.grad.detach().cpu().numpy().copy() for k, v in self.named_parameters()}

    @classmethod
    def from_params(cls, config: GPTConfig, params: dict, dtype=torch.float32, device="cpu",
                    flash: bool = False):
        model = cls(config, flash=flash).to(device=device, dtype=dtype)
        return model.load_params(params)
