"""Gradient and activation diagnostics of a training step: what a person checks when a run
misbehaves, logged every N optimizer steps (`--diagnostics N`) to diagnostics.jsonl and drawn
in diagnostics.png (gpt2np.train.diagnostics_plot).

One JSON line per diagnostic step:
  step          the 0-based optimizer step, as log.jsonl's
  grad_norm     {tensor: L2 norm of the gradient the optimizer sees: accumulated over the
                micro-steps, all-reduced over the ranks, before clipping}
  param_norm    {tensor: L2 norm of the param before this step's update}
  update_ratio  {tensor: ||param after - param before|| / ||param before||: the AdamW
                update as applied, lr and weight decay included; null where the param is 0}
  activations   {"transformer.h.i": {resid_std, ln_1_std, attn_entropy, ln_2_std, gelu_tail},
                 "transformer.ln_f": {resid_std, ln_f_std}}, the mean over the step's
                micro-steps (on rank 0's data under data parallelism):
    resid_std     the residual stream entering the block (or ln_f): sqrt of the mean over
                  tokens of its variance over channels, the spread each LayerNorm divides
                  out. Read off the LayerNorm's cached 1/std (no pass over (B,T,C)).
    ln_*_std      the std of all entries of that LayerNorm's output (weight and bias applied).
    attn_entropy  the mean over batch, heads and query positions of the attention
                  distribution's entropy, in nats (position t can reach at most log(t+1)).
    gelu_tail     the fraction of GELU inputs below GELU_TAIL = -3, its flat tail: there
                  |gelu'(x)| < 0.012 (1.2% of the slope of the linear side), so such a unit
                  passes almost no gradient. A growing fraction means dying MLP units.
  cost_s        seconds this probe spent in the step (snapshots, norms, activations)

The numpy and cupy engines (gpt2np.GPT) compute the activations from the forward's caches
(no extra forward). The attention keeps no probabilities, only each row's log-sum-exp, so
the entropy recomputes the scores q.k per block of queries: one score GEMM and one exp per
layer, about a third of the attention forward's work, on diagnostic steps only. The torch
engine reaches the same tensors with forward hooks on its modules, registered only for the
diagnostic steps, and computes the figures with the same array code (the tensors are shared
with numpy or cupy without a copy).
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from gpt2np.backends import KernelCache, backend_of

from gpt2np.model import GPT
from gpt2np.files import append_text, replace_atomically
from gpt2np.train.outputs import read_jsonl

GELU_TAIL = -3.0
DIAG_NAME = "diagnostics.jsonl"
PLOT_NAME = "diagnostics.png"
_LN_EPS = 1e-5  # gpt2np.layers.layernorm_forward's (GPT-2's)
_ENTROPY_BLOCK = 256  # queries per score block (as gpt2np.layers' attention)


# ------------------------------------------------------------------ norms of tensors


def tensor_norms(arrays: dict) -> dict[str, float]:
    """{name: L2 norm}, each summed in float64; on a GPU one transfer for all of them."""
    if not arrays:
        return {}
    be = backend_of(next(iter(arrays.values())))
    if be.xp is np:
        return {k: math.sqrt(_sum_squares_host(a)) for k, a in arrays.items()}
    sums = [be.xp.vdot(a64, a64) for a64 in
            (a.reshape(-1).astype(be.xp.float64, copy=False) for a in arrays.values())]
    return {k: math.sqrt(float(s)) for k, s in zip(arrays, be.to_host(be.xp.stack(sums)))}


_NORM_BLOCK = 1 << 16  # elements cast to float64 at a time: 512 KB, stays in cache


def _sum_squares_host(a) -> float:
    """sum(a**2) of a numpy array, in float64 without a float64 copy of a float32 tensor
    (the copy of GPT-2's wte alone is 300 MB): block by block through a small buffer."""
    flat = np.ascontiguousarray(a).reshape(-1)
    if flat.dtype == np.float64:
        return float(np.dot(flat, flat))
    buf = np.empty(min(flat.size, _NORM_BLOCK), dtype=np.float64)
    total = 0.0
    for i in range(0, flat.size, _NORM_BLOCK):
        b = buf[:min(_NORM_BLOCK, flat.size - i)]
        b[...] = flat[i:i + b.size]
        total += float(np.dot(b, b))
    return total


def update_ratios(before: dict, after: dict, before_norms: dict) -> dict[str, float | None]:
    """{name: ||after - before|| / ||before||}, None where ||before|| is 0."""
    diff = tensor_norms({k: after[k] - before[k] for k in before})
    return {k: (diff[k] / before_norms[k] if before_norms[k] > 0 else None) for k in before}


# ------------------------------------------------------------------ activation statistics


def _xp(a):
    return backend_of(a).xp


def residual_std(x) -> float:
    """x (..., C): sqrt(mean over tokens of the variance over channels)."""
    xp = _xp(x)
    return math.sqrt(float(x.var(axis=-1, dtype=xp.float64).mean()))


def residual_std_from_rstd(rstd, eps: float = _LN_EPS) -> float:
    """The same from a LayerNorm's cached rstd = 1/sqrt(var + eps), one per token."""
    xp = _xp(rstd)
    r = rstd.astype(xp.float64)
    return math.sqrt(max(float((1.0 / (r * r)).mean()) - eps, 0.0))


def std_all(a) -> float:
    """The std of every entry of a (float64 accumulation)."""
    return float(a.std(dtype=_xp(a).float64))


def gelu_tail_fraction(x, threshold: float = GELU_TAIL) -> float:
    """The fraction of GELU inputs x below `threshold` (its flat tail)."""
    return int(_xp(x).count_nonzero(x < threshold)) / max(1, x.size)


def bf16_to_float32(bits):
    """bfloat16 bits (uint16) as float32 values (bf16 is float32's upper half)."""
    xp = _xp(bits)
    return (bits.astype(xp.uint32) << 16).view(xp.float32)


def attention_entropy(qs, k, lse=None) -> float:
    """Mean entropy (nats) of causal softmax(qs @ k^T) rows; qs = q * scale, k (B,NH,T,hs).

    lse (B,NH,T[,1]): each row's log-sum-exp if the forward kept it, else computed here.
    Works through blocks of queries, each against the keys it can see: (B,NH,256,<=T)
    temporaries, never (B,NH,T,T).
    """
    xp = _xp(qs)
    B, NH, T, _ = qs.shape
    total = 0.0
    for r0 in range(0, T, _ENTROPY_BLOCK):
        r1 = min(T, r0 + _ENTROPY_BLOCK)
        s = xp.matmul(qs[:, :, r0:r1], k[:, :, :r1].swapaxes(-1, -2))  # (B,NH,n,r1)
        rows = xp.arange(r0, r1)[:, None]
        s = xp.where(xp.arange(r1)[None, :] <= rows, s, -xp.inf)  # causal mask
        if lse is None:
            m = s.max(axis=-1, keepdims=True)
            lse_b = xp.log(xp.exp(s - m).sum(axis=-1, keepdims=True)) + m
        else:
            lse_b = lse.reshape(B, NH, T)[:, :, r0:r1, None]
        logp = s - lse_b
        # masked entries: logp = -inf, p = 0; clamped so that p * logp is 0, not nan
        xp.maximum(logp, -1e4, out=logp)
        total -= float((xp.exp(logp) * logp).sum(dtype=xp.float64))
    return total / (B * NH * T)


# ------------------------------------------------------------------ from gpt2np.GPT's caches


def _layernorm_cache(cache, bias):
    """(residual std of the input, std of the output) from a LayerNorm's cache."""
    if isinstance(cache, KernelCache):  # CuPy's fused kernel: x, weight, mean, rstd (N,)
        x, weight, mean, rstd = cache.saved
        C = x.shape[-1]
        norm = (x.reshape(-1, C) - mean[:, None]) * rstd[:, None]
    else:  # gpt2np.layers: norm (B,T,C), rstd (B,T,1), weight
        norm, rstd, weight = cache
    return residual_std_from_rstd(rstd), std_all(norm * weight + bias)


def _gelu_input(cache):
    return cache.saved[0] if isinstance(cache, KernelCache) else cache[0]


def _attention_cache_entropy(cache) -> float:
    if isinstance(cache, KernelCache):
        saved = cache.saved
        if len(saved) == 4:  # flash: q*scale, k, v packed (3,B,NH,T,hs) in bf16 bits
            qkv16, _, lse, _ = saved
            return attention_entropy(bf16_to_float32(qkv16[0]), bf16_to_float32(qkv16[1]), lse)
        qs, k, _, _, lse, _ = saved  # query blocks: GEMM operands, bf16 bits in bf16
    else:
        qs, k, _, _, lse, _ = cache
    if qs.dtype == np.uint16:
        qs, k = bf16_to_float32(qs), bf16_to_float32(k)
    return attention_entropy(qs, k, lse)


def model_activations(model) -> dict:
    """The activation figures of gpt2np.GPT's last forward with targets (read from
    model._cache, which holds until backward())."""
    if model._cache is None:
        raise RuntimeError("model_activations needs the caches of a forward with targets, "
                           "before its backward")
    _, block_caches, lnf_cache, _, _ = model._cache
    p = model.params
    out = {}
    for i, (ln1, attn, ln2, mlp) in enumerate(block_caches):
        h = f"transformer.h.{i}."
        resid, ln1_std = _layernorm_cache(ln1, p[h + "ln_1.bias"])
        _, ln2_std = _layernorm_cache(ln2, p[h + "ln_2.bias"])
        out[f"transformer.h.{i}"] = {
            "resid_std": resid, "ln_1_std": ln1_std,
            "attn_entropy": _attention_cache_entropy(attn[1]),  # attn: (qkv, attention, proj)
            "ln_2_std": ln2_std, "gelu_tail": gelu_tail_fraction(_gelu_input(mlp[1]))}
    resid, lnf_std = _layernorm_cache(lnf_cache, p["transformer.ln_f.bias"])
    out["transformer.ln_f"] = {"resid_std": resid, "ln_f_std": lnf_std}
    return out


# ------------------------------------------------------------------ from the torch engine


def _from_torch(t):
    """A torch tensor as a numpy (CPU) or cupy (CUDA) array sharing its memory (without
    CuPy, a CUDA tensor's host copy)."""
    t = t.detach()
    if t.is_cuda:
        try:
            import cupy
        except ImportError:  # torch on a GPU without CuPy: copy to the host instead
            return t.cpu().numpy()
        return cupy.from_dlpack(t)
    return t.numpy()


class TorchActivationHooks:
    """Forward hooks on a gpt2np.backends.torch_reference.TorchGPT collecting model_activations'
    figures for every forward while registered; remove() takes them off again."""

    def __init__(self, model):
        self.forwards: list[dict] = []  # one dict per forward, as model_activations'
        self._handles = []
        n_head = model.config.n_head
        reg = lambda module, f: self._handles.append(module.register_forward_hook(f))  # noqa: E731
        # a new forward begins (TorchGPT reads wte's weight directly, not through its module)
        self._handles.append(model.register_forward_pre_hook(lambda m, i: self.forwards.append({})))
        for idx, block in enumerate(model.transformer.h):
            name = f"transformer.h.{idx}"
            reg(block.ln_1, self._hook(name, lambda x, y: {"resid_std": residual_std(x),
                                                             "ln_1_std": std_all(y)}))
            reg(block.attn.c_attn, self._hook(name, lambda x, qkv: {
                "attn_entropy": _qkv_entropy(qkv, n_head)}))
            reg(block.ln_2, self._hook(name, lambda x, y: {"ln_2_std": std_all(y)}))
            reg(block.mlp.c_fc, self._hook(name, lambda x, y: {"gelu_tail": gelu_tail_fraction(y)}))
        reg(model.transformer.ln_f, self._hook("transformer.ln_f", lambda x, y: {
            "resid_std": residual_std(x), "ln_f_std": std_all(y)}))

    def _hook(self, name, figures):
        def hook(module, inputs, output):
            stats = figures(_from_torch(inputs[0]), _from_torch(output))
            self.forwards[-1].setdefault(name, {}).update(stats)
        return hook

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []


def _qkv_entropy(qkv, n_head) -> float:
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    q, k, _ = qkv.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)  # (B,NH,T,hs) each
    return attention_entropy(q * (1.0 / math.sqrt(hs)), k)


def _mean_of(forwards: list[dict]) -> dict:
    """The mean of each figure over the micro-steps' forwards."""
    n = len(forwards)
    return {name: {key: sum(f[name][key] for f in forwards) / n for key in forwards[0][name]}
            for name in forwards[0]}


# ------------------------------------------------------------------ the step probe


class DiagnosticsProbe:
    """Every `every` optimizer steps: one line of diagnostics.jsonl in out_dir (rank 0), and
    diagnostics.png redrawn when loss.png is (every eval_interval steps and the last step).

    A diagnostic step pays for: one copy of the params (before the update, for the update
    ratio), three sets of norms, and the activation figures of each micro-step's forward
    (ArrayEngine: from its caches; TorchEngine: forward hooks). Other steps pay nothing.
    """

    def __init__(self, every: int, out_dir, is_main: bool = True, eval_interval: int = 0,
                 max_steps: int = 0):
        if every <= 0:
            raise ValueError(f"--diagnostics must be > 0 to log (0 is off), got {every}")
        self.every, self.is_main = every, is_main
        self.path = Path(out_dir) / DIAG_NAME
        self.plot_path = Path(out_dir) / PLOT_NAME
        self.eval_interval, self.max_steps = eval_interval, max_steps
        self.records: list | None = None  # read at the first step (a resumed run keeps its own)
        self._active = False
        self._stale_plot = False

    def _open(self, step):
        """The first step of this invocation: keep an earlier run's records before it."""
        self.records = read_jsonl(self.path, before=step) if step > 0 else []
        if self.is_main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            replace_atomically(self.path, lambda tmp: tmp.write_text(
                "".join(json.dumps(r) + "\n" for r in self.records)))

    def start_step(self, step, engine):
        if self.records is None:
            self._open(step)
        # rank 0 alone: the gradient is the same on every rank after the all-reduce, and the
        # activations of rank 0's micro-batches stand for the step's
        self._active = self.is_main and step % self.every == 0
        if not self._active:
            return
        t0 = time.perf_counter()
        self._forwards, self._hooks = [], None
        if isinstance(engine.model, GPT):  # ArrayEngine: gpt2np.GPT keeps the forward's caches
            engine.forward_hook = lambda e: self._forwards.append(model_activations(e.model))
        else:  # TorchEngine: hooks on its modules for this step's micro-steps
            self._hooks = TorchActivationHooks(engine.model)
        self._cost = time.perf_counter() - t0

    def before_update(self, step, engine):
        if not self._active:
            return
        t0 = time.perf_counter()
        if self._hooks is not None:
            self._hooks.remove()
            self._forwards = self._hooks.forwards
        engine.forward_hook = None
        self._before = {k: p.copy() for k, p in engine.params.items()}
        self._param_norm = tensor_norms(self._before)
        self._grad_norm = tensor_norms(engine.grads)
        self._cost += time.perf_counter() - t0

    def after_update(self, step, engine, record):
        if not self._active:
            if self._stale_plot and self._plot_due(step):
                self._plot()
            return
        t0 = time.perf_counter()
        ratios = update_ratios(self._before, engine.params, self._param_norm)
        del self._before
        rec = {"step": step, "grad_norm": self._grad_norm, "param_norm": self._param_norm,
               "update_ratio": ratios, "activations": _mean_of(self._forwards)}
        self._forwards = []
        rec["cost_s"] = self._cost + time.perf_counter() - t0
        self.records.append(rec)
        if self.is_main:
            append_text(self.path, json.dumps(rec) + "\n")
        self._stale_plot = True
        if self._plot_due(step):
            self._plot()

    def _plot_due(self, step) -> bool:
        done = step + 1
        return done == self.max_steps or (self.eval_interval and done % self.eval_interval == 0)

    def _plot(self):
        if self.is_main:
            from gpt2np.train.diagnostics_plot import plot_diagnostics

            plot_diagnostics(self.records, self.plot_path)
        self._stale_plot = False


def read_diagnostics(path) -> list[dict]:
    """Every record of a diagnostics.jsonl (or of a run folder's)."""
    path = Path(path)
    if path.is_dir():
        path = path / DIAG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {DIAG_NAME} at {path} (train with --diagnostics N)")
    return read_jsonl(path)


def probe_for(cfg, run, ctx) -> DiagnosticsProbe:
    """The probe of a training run's `--diagnostics N` (gpt2np.train.evaluators.build_probes)."""
    return DiagnosticsProbe(cfg.diagnostics, cfg.out_dir, ctx.is_main, run.eval_interval,
                            run.max_steps)
