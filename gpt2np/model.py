"""GPT: the params dict, a forward that keeps what the backward needs, and that backward.

`model.params` is named and shaped exactly like Hugging Face `GPT2LMHeadModel.state_dict()`
without the tied `lm_head.weight`, so loading a checkpoint is a copy and exporting is a copy.

The math of each layer is gpt2np.layers, one forward/backward pair per layer. Here they are
composed into GPT-2, as picoGPT's gpt2.py does: the attention and MLP branches, the pre-norm
block, the whole model, every backward reversing its forward line by line. The layer
functions come as a LayerOps `ops`, which a model takes from its backend once, for its dtype:
the reference functions of gpt2np.layers, or fused GPU kernels with the same signatures.
"""
from __future__ import annotations

import numpy as np

from gpt2np import generate as sampling
from gpt2np import layers as L
from gpt2np.backends import get_backend
from gpt2np.config import GPTConfig

_DTYPES = ("float32", "float64")
# token_losses: bytes of logits per block of rows: ~300 rows of GPT-2's vocabulary, enough
# for the lm_head's GEMM to run at full speed (fewer rows make it slower)
LOSS_LOGITS_BYTES = 64 << 20


def param_shapes(config: GPTConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter's name and shape, in the checkpoint's order."""
    C, V = config.n_embd, config.vocab_size
    shapes = {
        "transformer.wte.weight": (V, C),
        "transformer.wpe.weight": (config.block_size, C),
    }
    for i in range(config.n_layer):
        h = f"transformer.h.{i}."
        shapes.update({
            h + "ln_1.weight": (C,), h + "ln_1.bias": (C,),
            h + "attn.c_attn.weight": (C, 3 * C), h + "attn.c_attn.bias": (3 * C,),
            h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
            h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
            h + "mlp.c_fc.weight": (C, 4 * C), h + "mlp.c_fc.bias": (4 * C,),
            h + "mlp.c_proj.weight": (4 * C, C), h + "mlp.c_proj.bias": (C,),
        })
    shapes["transformer.ln_f.weight"] = (C,)
    shapes["transformer.ln_f.bias"] = (C,)
    return shapes


def init_params(config: GPTConfig, seed: int = 0, dtype="float32") -> dict[str, np.ndarray]:
    """GPT-2's init on the host, reproducible from `seed` whatever the backend.

    N(0, 0.02) for weights and embeddings; the c_proj weights that write into the residual
    stream scaled by (2 * n_layer) ** -0.5 (two per block) so its variance does not grow with
    depth; biases 0; LayerNorm weight 1, bias 0.
    """
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in param_shapes(config).items():
        if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or name.endswith("ln_f.weight"):
            p = np.ones(shape)
        elif name.endswith(".bias"):
            p = np.zeros(shape)
        else:
            std = 0.02
            if name.endswith("c_proj.weight"):
                std *= (2 * config.n_layer) ** -0.5
            p = rng.normal(0.0, std, size=shape)
        params[name] = p.astype(dtype)
    return params


def sub_params(p, prefix):
    """The entries of `p` under `prefix`, with the prefix stripped ("attn.c_attn.weight" ->
    "c_attn.weight" for prefix "attn.")."""
    n = len(prefix)
    return {k[n:]: v for k, v in p.items() if k.startswith(prefix)}


# --------------------------------------------------------------------------------------
# causal self-attention with its projections: c_attn -> attention -> c_proj
# `show` (here and below): None, or the model's observer for this block (see GPT)


def attn_forward(ops, x, p, n_head, show=None):
    # x (B,T,C) -> (B,T,C); p: c_attn.weight (C,3C) c_attn.bias (3C,) c_proj.weight (C,C)
    # c_proj.bias (C,). c_attn's bias goes in with the attention (a fused kernel adds it as
    # it reads qkv); c_attn's backward sums its gradient all the same
    qkv, qkv_cache = ops.linear_forward(x, p["c_attn.weight"], None)  # (B,T,3C)
    if show:
        show("attn.c_attn", x, qkv + p["c_attn.bias"])
    y, att_cache = ops.attention_forward(qkv, n_head, bias=p["c_attn.bias"])  # (B,T,C)
    out, proj_cache = ops.linear_forward(y, p["c_proj.weight"], p["c_proj.bias"])
    return out, (qkv_cache, att_cache, proj_cache)


def attn_backward(ops, dout, cache):
    # dout (B,T,C) -> dx (B,T,C), grads named like attn_forward's p
    qkv_cache, att_cache, proj_cache = cache
    g = {}
    dy, g["c_proj.weight"], g["c_proj.bias"] = ops.linear_backward(dout, proj_cache)
    dqkv = ops.attention_backward(dy, att_cache)
    dx, g["c_attn.weight"], g["c_attn.bias"] = ops.linear_backward(dqkv, qkv_cache)
    return dx, g


# --------------------------------------------------------------------------------------
# MLP: c_fc -> GELU -> c_proj


def mlp_forward(ops, x, p, show=None):
    # x (B,T,C) -> (B,T,C); p: c_fc.weight (C,4C) c_fc.bias (4C,) c_proj.weight (4C,C)
    # c_proj.bias (C,). c_fc's bias goes in with the GELU (one pass fewer over (B,T,4C)
    # where a kernel fuses them); c_fc's backward sums its gradient all the same
    h, fc_cache = ops.linear_forward(x, p["c_fc.weight"], None)  # (B,T,4C)
    if show:
        show("mlp.c_fc", x, h + p["c_fc.bias"])
    # only c_proj's matmul reads the GELU's output: it may come as its GEMM operand
    h, gelu_cache = ops.gelu_forward(h, p["c_fc.bias"], operand=True)
    out, proj_cache = ops.linear_forward(h, p["c_proj.weight"], p["c_proj.bias"])  # (B,T,C)
    return out, (fc_cache, gelu_cache, proj_cache)


def mlp_backward(ops, dout, cache):
    # dout (B,T,C) -> dx (B,T,C), grads named like mlp_forward's p
    fc_cache, gelu_cache, proj_cache = cache
    g = {}
    dh, g["c_proj.weight"], g["c_proj.bias"] = ops.linear_backward(dout, proj_cache)
    dh = ops.gelu_backward(dh, gelu_cache)
    dx, g["c_fc.weight"], g["c_fc.bias"] = ops.linear_backward(dh, fc_cache)
    return dx, g


# --------------------------------------------------------------------------------------
# transformer block, pre-norm with residuals:
#   x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))


def block_forward(ops, x, p, n_head, show=None):
    # x (B,T,C) -> (B,T,C); p: this block's params named as in the checkpoint without
    # "transformer.h.i.". Each LayerNorm's output only feeds a linear: it may come as its
    # GEMM operand, unless an observer is to see its values
    operand = show is None
    h, ln1_cache = ops.layernorm_forward(x, p["ln_1.weight"], p["ln_1.bias"], operand=operand)
    if show:
        show("ln_1", x, h)
    h, attn_cache = attn_forward(ops, h, sub_params(p, "attn."), n_head, show)
    h += x  # residual, into the branch's fresh output (the caller's x stays untouched)
    x = h
    h, ln2_cache = ops.layernorm_forward(x, p["ln_2.weight"], p["ln_2.bias"], operand=operand)
    if show:
        show("ln_2", x, h)
    h, mlp_cache = mlp_forward(ops, h, sub_params(p, "mlp."), show)
    h += x  # residual
    return h, (ln1_cache, attn_cache, ln2_cache, mlp_cache)


def block_backward(ops, dx, cache):
    # dx (B,T,C) -> dx (B,T,C), grads named like block_forward's p
    ln1_cache, attn_cache, ln2_cache, mlp_cache = cache
    g = {}
    # the residual passes dx straight through; each branch adds its own contribution
    dh, mlp_g = mlp_backward(ops, dx, mlp_cache)
    dh, g["ln_2.weight"], g["ln_2.bias"] = ops.layernorm_backward(dh, ln2_cache)
    dh += dx
    dx = dh
    dh, attn_g = attn_backward(ops, dx, attn_cache)
    dh, g["ln_1.weight"], g["ln_1.bias"] = ops.layernorm_backward(dh, ln1_cache)
    dh += dx
    dx = dh
    g.update({"mlp." + k: v for k, v in mlp_g.items()})
    g.update({"attn." + k: v for k, v in attn_g.items()})
    return dx, g


# --------------------------------------------------------------------------------------
# the whole model


class GPT:
    """GPT-2 with a hand-written backward.

    model = GPT(GPTConfig(...), backend="numpy", dtype="float32", seed=0)
    logits, loss = model.forward(idx, targets)     # idx, targets (B, T) ints
    grads = model.backward()                       # same keys and shapes as model.params

    precision ("fp32" | "tf32" | "bf16") is that of the matmuls (see gpt2np.layers): the
    weights, gradients and everything between the matmuls stay in `dtype`, which must be
    float32 for tf32/bf16 (float32 master weights, as mixed-precision training keeps them).

    model.observer = f   shows the activations of every forward to f(name, input, output),
    called as a torch forward hook on the GPT2LMHeadModel module of that name would be:
      transformer.h.{i}.ln_1, transformer.h.{i}.ln_2, transformer.ln_f   the LayerNorms;
      transformer.h.{i}.attn.c_attn   output: q, k, v with c_attn's bias (B,T,3C);
      transformer.h.{i}.mlp.c_fc      output: c_fc's with its bias, the GELU's input (B,T,4C).
    Arrays of the model's backend and dtype, which f must not modify. None (the default)
    costs nothing.
    """

    def __init__(self, config: GPTConfig | None = None, *, backend: str = "numpy",
                 dtype: str = "float32", precision: str = "fp32", seed: int = 0,
                 params: dict | None = None):
        if config is None:
            config = GPTConfig()
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        dtype = np.dtype(dtype).name
        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {_DTYPES}, got {dtype!r}")
        if precision not in L.PRECISIONS:
            raise ValueError(f"precision must be one of {L.PRECISIONS}, got {precision!r}")
        if precision != "fp32" and dtype != "float32":
            raise ValueError(f"precision {precision!r} rounds float32 matmul operands; "
                             f"it needs dtype='float32', got {dtype!r}")
        self.config = config
        self.dtype = dtype
        self.precision = precision
        self.backend = get_backend(backend)
        self.xp = self.backend.xp
        self.ops = self.backend.layer_ops(dtype)  # the layer functions: chosen here, once
        self.observer = None
        host = init_params(config, seed, dtype) if params is None else params
        self.params = {}
        self.load_params(host)
        self._cache = None
        # The biggest arrays of a training step, (B,T,V) logits and softmax and the (V,C) wte
        # gradient, kept and reused from step to step: a fresh 200 MB array costs page
        # faults on every touch, a reused one does not. Only training (targets given) uses them.
        self._buffers = {}

    # ---------------------------------------------------------------- params in and out

    def load_params(self, params: dict):
        """Copy a name -> array dict (host or device) into the model, checking names and shapes."""
        shapes = param_shapes(self.config)
        missing = [k for k in shapes if k not in params]
        unexpected = [k for k in params if k not in shapes]
        if missing or unexpected:
            raise ValueError(f"params do not match the model: missing {missing[:5]}"
                             f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                             f"{'...' if len(unexpected) > 5 else ''}")
        for name, shape in shapes.items():
            value = params[name]
            if tuple(value.shape) != shape:
                raise ValueError(f"param {name!r} has shape {tuple(value.shape)}, "
                                 f"the model expects {shape}")
            self.params[name] = self.backend.asarray(value, dtype=self.dtype).copy()

    def state_dict(self) -> dict[str, np.ndarray]:
        """The params as host numpy arrays (a copy)."""
        return {k: np.array(self.backend.to_host(v)) for k, v in self.params.items()}

    def num_params(self, non_embedding: bool = False) -> int:
        n = sum(int(np.prod(p.shape)) for p in self.params.values())
        if non_embedding:
            n -= int(np.prod(self.params["transformer.wpe.weight"].shape))
        return n

    def block_params(self, i):
        """Block i's params named as block_forward takes them (no "transformer.h.i.")."""
        return sub_params(self.params, f"transformer.h.{i}.")

    # ---------------------------------------------------------------- input checks

    def _check_ids(self, a, what, allow_ignore=False):
        xp = self.xp
        if isinstance(a, (list, tuple)):
            a = np.asarray(a)
        if not hasattr(a, "dtype") or not hasattr(a, "shape"):
            raise TypeError(f"{what} must be an integer array of shape (B, T), got {type(a).__name__}")
        if a.dtype.kind not in "iu":
            raise TypeError(f"{what} must hold integer token ids, got dtype {a.dtype}")
        if a.ndim != 2:
            raise ValueError(f"{what} must have shape (B, T), got {a.ndim} dims {tuple(a.shape)}")
        if a.shape[0] == 0 or a.shape[1] == 0:
            raise ValueError(f"{what} is empty: shape {tuple(a.shape)}")
        a = self.backend.asarray(a).astype(xp.int64, copy=False)
        lo, hi = int(a.min()), int(a.max())
        V = self.config.vocab_size
        if hi >= V or lo < (-1 if allow_ignore else 0):
            bad = hi if hi >= V else lo
            allowed = f"[0, vocab_size={V})" + (" or -1 (ignored)" if allow_ignore else "")
            raise ValueError(f"{what} holds token id {bad} outside {allowed}: the model's "
                             f"vocab_size is {V}")
        return a

    # ---------------------------------------------------------------- forward / backward

    def forward(self, idx, targets=None):
        """idx (B,T) int -> logits (B,T,V), loss (scalar array, or None without targets).

        With targets the activations the backward needs are kept until backward() runs, and
        the logits live in a buffer that the next forward with targets overwrites (copy them
        to keep them longer). Without targets (inference) nothing is kept and the logits are
        a new array.
        """
        idx, targets = self._check_batch(idx, targets)
        with L.matmul_precision(self.precision, self.backend):
            return self._forward(idx, targets)

    __call__ = forward

    def _check_batch(self, idx, targets):
        idx = self._check_ids(idx, "idx")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} is longer than the block size "
                             f"{self.config.block_size}")
        if targets is not None:  # array-likes (lists) welcome, as for idx
            targets = self._check_ids(targets, "targets", allow_ignore=True)
            if tuple(targets.shape) != (B, T):
                raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {(B, T)}")
        return idx, targets

    def _forward(self, idx, targets):
        ops, p, cfg = self.ops, self.params, self.config
        B, T = idx.shape
        wte = p["transformer.wte.weight"]
        h, emb_cache, block_caches, lnf_cache = self._trunk(idx, keep=targets is not None)
        if targets is None:
            logits, _ = ops.lm_head_forward(h, wte)  # (B,T,V), a new array
            self._cache = None
            return logits, None
        V = cfg.vocab_size
        logits, head_cache = ops.lm_head_forward(h, wte, out=self._buffer("logits", (B, T, V)))
        loss, ce_cache = ops.cross_entropy_forward(logits, targets,
                                                   out=self._buffer("probs", (B, T, V)))
        self._cache = (emb_cache, block_caches, lnf_cache, head_cache, ce_cache)
        return logits, loss

    def _trunk(self, idx, keep):
        # idx (B,T) -> ln_f's output h (B,T,C) and the caches of the embedding, the blocks and
        # ln_f; keep=False (inference): the blocks' caches are dropped as soon as made
        ops, p, cfg = self.ops, self.params, self.config
        x, emb_cache = ops.embedding_forward(idx, p["transformer.wte.weight"],
                                             p["transformer.wpe.weight"])  # (B,T,C)
        block_caches = []
        for i in range(cfg.n_layer):
            show = self._show_for(f"transformer.h.{i}.")
            x, c = block_forward(ops, x, self.block_params(i), cfg.n_head, show)
            if keep:
                block_caches.append(c)
        # only the lm_head's matmul reads ln_f's output: it may come as its GEMM operand
        h, lnf_cache = ops.layernorm_forward(x, p["transformer.ln_f.weight"],
                                             p["transformer.ln_f.bias"],
                                             operand=self.observer is None)
        if self.observer is not None:
            self.observer("transformer.ln_f", x, h)
        return h, emb_cache, block_caches, lnf_cache

    def token_losses(self, idx, targets):
        """idx, targets (B,T) int -> the cross-entropy of every target token, (B,T) float64
        on the host, 0 where the target is -1 (not scored). For evaluation: nothing is kept,
        and the lm_head runs only at the positions with a target, a block of rows at a time,
        so the (B,T,V) logits never exist (HellaSwag scores a quarter of its positions; a
        loss over many windows would need gigabytes of them). The losses come from the
        layer ops' cross_entropy_losses: exp and sum in the model's dtype, log-sum-exp and
        losses in float64."""
        idx, targets = self._check_batch(idx, targets)
        if targets is None:
            raise ValueError("token_losses needs targets (B, T), -1 where not scored")
        with L.matmul_precision(self.precision, self.backend):
            return self._token_losses(idx, targets)

    def _token_losses(self, idx, targets):
        h, _, _, _ = self._trunk(idx, keep=False)
        C = self.config.n_embd
        return self.head_losses(h.reshape(-1, C), targets.reshape(-1)).reshape(targets.shape)

    def head_losses(self, h, targets):
        """h (N,C): ln_f's outputs, targets (N,) int (backend array), -1 where not scored ->
        the cross-entropy at each row, (N,) float64 on the host, 0 where not scored: the
        lm_head only at the scored rows, a block of rows at a time. Call it inside the
        model's matmul precision (as token_losses does)."""
        xp, to_host = self.xp, self.backend.to_host
        wte = self.params["transformer.wte.weight"]
        V = wte.shape[0]
        rows = xp.flatnonzero(targets != -1)
        losses = np.zeros(targets.shape[0], dtype=np.float64)
        n = int(rows.shape[0])
        step = max(1, LOSS_LOGITS_BYTES // (V * wte.itemsize))
        step = -(-n // -(-n // step)) if n else 1  # blocks of equal size: no small last one
        buf = xp.empty((min(step, n), V), dtype=self.dtype)  # reused
        for r in range(0, n, step):
            sel = rows[r:r + step]
            logits, _ = self.ops.lm_head_forward(h[sel], wte, out=buf[:int(sel.shape[0])])
            losses[to_host(sel)] = to_host(self.ops.cross_entropy_losses(logits, targets[sel]))
        return losses

    def backward(self):
        """Gradients of the last forward's loss: a dict with the same keys as params.

        The returned arrays are valid until the next forward/backward: some of them (the
        (V,C) wte gradient) are buffers that the next step reuses. Copy what you keep.
        """
        if self._cache is None:
            raise RuntimeError("backward() needs a forward(idx, targets) with targets first "
                               "(and runs once per forward)")
        with L.matmul_precision(self.precision, self.backend):
            return self._backward()

    def _backward(self):
        emb_cache, block_caches, lnf_cache, head_cache, ce_cache = self._cache
        self._cache = None  # free the activations as we go and forbid a second backward
        ops, cfg = self.ops, self.config
        grads = {}
        dlogits = ops.cross_entropy_backward(1.0, ce_cache, operand=True)  # only matmuls read it
        dwte = self._buffer("dwte", self.params["transformer.wte.weight"].shape)
        dx, dwte = ops.lm_head_backward(dlogits, head_cache, dwte=dwte)
        del dlogits, ce_cache, head_cache
        dx, grads["transformer.ln_f.weight"], grads["transformer.ln_f.bias"] = \
            ops.layernorm_backward(dx, lnf_cache)
        for i in reversed(range(cfg.n_layer)):
            dx, g = block_backward(ops, dx, block_caches.pop())
            prefix = f"transformer.h.{i}."
            grads.update({prefix + k: v for k, v in g.items()})
        # wte is used twice (embedding and lm_head): its gradient is the sum of both uses,
        # so the embedding's rows are scattered straight into the lm_head's share
        grads["transformer.wte.weight"], grads["transformer.wpe.weight"] = \
            ops.embedding_backward(dx, emb_cache, dwte=dwte)
        return {k: grads[k] for k in self.params}  # the params' order

    def _show_for(self, prefix):
        """The observer for names under `prefix`, or None when no one observes."""
        if self.observer is None:
            return None
        return lambda name, x, y: self.observer(prefix + name, x, y)

    def _buffer(self, name, shape):
        """A reusable array of this shape (made on first use or when the shape changes)."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != tuple(shape):
            self._buffers.pop(name, None)  # free the old one before making the new
            buf = self.xp.empty(shape, dtype=self.dtype)
            self._buffers[name] = buf
        return buf

    # ---------------------------------------------------------------- conveniences

    def generate(self, idx, max_new_tokens, **kwargs):
        """Sample `max_new_tokens` after idx (B,T); see gpt2np.generate.generate."""
        return sampling.generate(self, idx, max_new_tokens, **kwargs)
