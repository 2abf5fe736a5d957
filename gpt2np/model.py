"""GPT: the params dict, a forward that keeps what the backward needs, and that backward.

`model.params` is named and shaped exactly like Hugging Face `GPT2LMHeadModel.state_dict()`
without the tied `lm_head.weight`, so loading a checkpoint is a copy and exporting is a copy.
"""
from __future__ import annotations

import numpy as np

from gpt2np.backends import get_backend

from gpt2np import layers as L
from gpt2np.config import GPTConfig

_DTYPES = ("float32", "float64")


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


class GPT:
    """GPT-2 with a hand-written backward.

    model = GPT(GPTConfig(...), backend="numpy", dtype="float32", seed=0)
    logits, loss = model.forward(idx, targets)     # idx, targets (B, T) ints
    grads = model.backward()                       # same keys and shapes as model.params

    precision ("fp32" | "tf32" | "bf16") is that of the matmuls (see gpt2np.layers): the
    weights, gradients and everything between the matmuls stay in `dtype`, which must be
    float32 for tf32/bf16 (float32 master weights, as mixed-precision training keeps them).
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
        idx = self._check_ids(idx, "idx")
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} is longer than the block size "
                             f"{self.config.block_size}")
        if targets is not None:  # array-likes (lists) welcome, as for idx
            targets = self._check_ids(targets, "targets", allow_ignore=True)
            if tuple(targets.shape) != (B, T):
                raise ValueError(f"targets shape {tuple(targets.shape)} must equal idx shape {(B, T)}")

        with L.matmul_precision(self.precision):
            return self._forward(idx, targets)

    __call__ = forward

    def _forward(self, idx, targets):
        B, T = idx.shape
        p = self.params
        cfg = self.config
        x, emb_cache = L.embedding_forward(idx, p["transformer.wte.weight"], p["transformer.wpe.weight"])
        block_caches = []
        for i in range(cfg.n_layer):
            x, c = L.block_forward(x, self._block_params(i), cfg.n_head)
            block_caches.append(c)
        x, lnf_cache = L.layernorm_forward(x, p["transformer.ln_f.weight"], p["transformer.ln_f.bias"],
                                           operand=True)  # only the lm_head's matmul reads it
        V = cfg.vocab_size
        if targets is None:
            logits, _ = L.lm_head_forward(x, p["transformer.wte.weight"])
            self._cache = None
            return logits, None
        logits, head_cache = L.lm_head_forward(x, p["transformer.wte.weight"],
                                               out=self._buffer("logits", (B, T, V)))
        loss, ce_cache = L.cross_entropy_forward(logits, targets,
                                                 out=self._buffer("probs", (B, T, V)))
        self._cache = (emb_cache, block_caches, lnf_cache, head_cache, ce_cache)
        return logits, loss

    def backward(self):
        """Gradients of the last forward's loss: a dict with the same keys as params.

        The returned arrays are valid until the next forward/backward: some of them (the
        (V,C) wte gradient) are buffers that the next step reuses. Copy what you keep.
        """
        if self._cache is None:
            raise RuntimeError("backward() needs a forward(idx, targets) with targets first "
                               "(and runs once per forward)")
        with L.matmul_precision(self.precision):
            return self._backward()

    def _backward(self):
        emb_cache, block_caches, lnf_cache, head_cache, ce_cache = self._cache
        self._cache = None  # free the activations as we go and forbid a second backward
        cfg = self.config
        grads = {}
        dlogits = L.cross_entropy_backward(1.0, ce_cache, operand=True)  # only matmuls read it
        dwte = self._buffer("dwte", self.params["transformer.wte.weight"].shape)
        dx, dwte = L.lm_head_backward(dlogits, head_cache, dwte=dwte)
        del dlogits, ce_cache, head_cache
        dx, grads["transformer.ln_f.weight"], grads["transformer.ln_f.bias"] = \
            L.layernorm_backward(dx, lnf_cache)
        for i in reversed(range(cfg.n_layer)):
            dx, g = L.block_backward(dx, block_caches.pop())
            prefix = f"transformer.h.{i}."
            grads.update({prefix + k: v for k, v in g.items()})
        # wte is used twice (embedding and lm_head): its gradient is the sum of both uses,
        # so the embedding's rows are scattered straight into the lm_head's share
        grads["transformer.wte.weight"], grads["transformer.wpe.weight"] = \
            L.embedding_backward(dx, emb_cache, dwte=dwte)
        return {k: grads[k] for k in self.params}  # the params' order

    def _buffer(self, name, shape):
        """A reusable array of this shape (made on first use or when the shape changes)."""
        buf = self._buffers.get(name)
        if buf is None or buf.shape != tuple(shape):
            self._buffers.pop(name, None)  # free the old one before making the new
            buf = self.xp.empty(shape, dtype=self.dtype)
            self._buffers[name] = buf
        return buf

    def _block_params(self, i):
        """Block i's params named as layers.block_forward takes them (no "transformer.h.i.")."""
        return L.sub_params(self.params, f"transformer.h.{i}.")

    # ---------------------------------------------------------------- conveniences

    def generate(self, idx, max_new_tokens, **kwargs):
        """Sample `max_new_tokens` after idx (B,T); see gpt2np.generate.generate."""
        from gpt2np.generate import generate

        return generate(self, idx, max_new_tokens, **kwargs)
