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
                  out.
    ln_*_std      the std of all entries of that LayerNorm's output (weight and bias applied).
    attn_entropy  the mean over batch, heads and query positions of the attention
                  distribution's entropy, in nats (position t can reach at most log(t+1)).
    gelu_tail     the fraction of GELU inputs below GELU_TAIL = -3, its flat tail: there
                  |gelu'(x)| < 0.012 (1.2% of the slope of the linear side), so such a unit
                  passes almost no gradient. A growing fraction means dying MLP units.
  cost_s        seconds this probe spent in the step (snapshots, norms, activations)

The figures come from the input and output of a few named modules (POINTS) in each
micro-step's forward, on diagnostic steps only: the numpy and cupy engines (gpt2np.GPT)
show them to the model's observer, the torch engine to forward hooks on its modules of the
same names; one ActivationRecorder computes the figures from either (torch's tensors are
shared with numpy or cupy without a copy). The entropy recomputes the scores q.k and their
softmax per block of queries: about the attention forward's work again, once per layer.

This module knows the step probe interface of gpt2np.train.evaluators (start_step,
before_update, after_update) by its shape alone: it imports nothing from the loop.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np

from gpt2np.backends import backend_of
from gpt2np.files import append_text, replace_atomically
from gpt2np.model import GPT
from gpt2np.train.outputs import read_jsonl

GELU_TAIL = -3.0
DIAG_NAME = "diagnostics.jsonl"
PLOT_NAME = "diagnostics.png"
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


def std_all(a) -> float:
    """The std of every entry of a (float64 accumulation)."""
    return float(a.std(dtype=_xp(a).float64))


def gelu_tail_fraction(x, threshold: float = GELU_TAIL) -> float:
    """The fraction of GELU inputs x below `threshold` (its flat tail)."""
    return int(_xp(x).count_nonzero(x < threshold)) / max(1, x.size)


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


def qkv_entropy(qkv, n_head) -> float:
    """attention_entropy of the heads of a fused projection qkv (B,T,3C) (with its bias)."""
    B, T, C3 = qkv.shape
    hs = C3 // 3 // n_head
    q, k, _ = qkv.reshape(B, T, 3, n_head, hs).transpose(2, 0, 3, 1, 4)  # (B,NH,T,hs) each
    return attention_entropy(q * (1.0 / math.sqrt(hs)), k)


# ------------------------------------------------------------------ the observed points

# module (within block i, or at the top) -> its figures from (input x, output y, n_head)
_FIGURES = {
    "ln_1": lambda x, y, n_head: {"resid_std": residual_std(x), "ln_1_std": std_all(y)},
    "attn.c_attn": lambda x, qkv, n_head: {"attn_entropy": qkv_entropy(qkv, n_head)},
    "ln_2": lambda x, y, n_head: {"ln_2_std": std_all(y)},
    "mlp.c_fc": lambda x, y, n_head: {"gelu_tail": gelu_tail_fraction(y)},
    "ln_f": lambda x, y, n_head: {"resid_std": residual_std(x), "ln_f_std": std_all(y)},
}


def points(n_layer: int) -> list[str]:
    """The modules whose input and output the figures need, named as in GPT2LMHeadModel
    (and gpt2np.GPT's observer), in the order of a forward."""
    block = [p for p in _FIGURES if p != "ln_f"]
    return [f"transformer.h.{i}.{p}" for i in range(n_layer) for p in block] + ["transformer.ln_f"]


class ActivationRecorder:
    """The activation figures of forwards: call it with (name, input, output) at each of
    points() (it is a gpt2np.GPT's observer, or torch hooks call it), and end_forward() after
    each forward. `forwards` holds one {"transformer.h.i" | "transformer.ln_f": figures} per
    forward; `seconds` the time spent computing them."""

    def __init__(self, n_head: int):
        self.n_head = n_head
        self.forwards: list[dict] = []
        self.seconds = 0.0
        self._current: dict = {}

    def __call__(self, name, x, y):
        t0 = time.perf_counter()
        # "transformer.h.3.attn.c_attn" -> ("transformer.h.3", "attn.c_attn"); "transformer.ln_f"
        parts = name.split(".", 3)
        owner, point = (".".join(parts[:3]), parts[3]) if parts[1] == "h" else (name, parts[1])
        self._current.setdefault(owner, {}).update(_FIGURES[point](x, y, self.n_head))
        self.seconds += time.perf_counter() - t0

    def end_forward(self):
        self.forwards.append(self._current)
        self._current = {}

    def mean(self) -> dict:
        """The mean of each figure over the forwards."""
        n, first = len(self.forwards), self.forwards[0]
        return {name: {key: sum(f[name][key] for f in self.forwards) / n for key in first[name]}
                for name in first}


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
    """Forward hooks on a gpt2np.backends.torch_reference.TorchGPT's modules of points(),
    showing their input and output to `recorder`; remove() takes them off again."""

    def __init__(self, model, recorder: ActivationRecorder):
        self._handles = []
        for name in points(model.config.n_layer):
            hook = (lambda name: lambda module, inputs, output: recorder(
                name, _from_torch(inputs[0]), _from_torch(output)))(name)
            self._handles.append(model.get_submodule(name).register_forward_hook(hook))

    def remove(self):
        for h in self._handles:
            h.remove()
        self._handles = []


# ------------------------------------------------------------------ the step probe


class DiagnosticsProbe:
    """Every `every` optimizer steps: one line of diagnostics.jsonl in out_dir (rank 0), and
    diagnostics.png redrawn when loss.png is (every eval_interval steps and the last step).
    A step probe of gpt2np.train.evaluators: start_step, before_update, after_update.

    A diagnostic step pays for: one copy of the params (before the update, for the update
    ratio), three sets of norms, and the activation figures of each micro-step's forward
    (ArrayEngine: the model's observer; TorchEngine: forward hooks). Other steps pay nothing.
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
        self._recorder, self._hooks = ActivationRecorder(engine.model.config.n_head), None
        if isinstance(engine.model, GPT):  # ArrayEngine: the model shows its observer
            engine.model.observer = self._recorder
        else:  # TorchEngine: hooks on its modules for this step's micro-steps
            self._hooks = TorchActivationHooks(engine.model, self._recorder)
        engine.forward_hook = lambda e: self._recorder.end_forward()  # after each forward
        self._cost = time.perf_counter() - t0

    def before_update(self, step, engine):
        if not self._active:
            return
        t0 = time.perf_counter()
        if self._hooks is not None:
            self._hooks.remove()
        else:
            engine.model.observer = None
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
               "update_ratio": ratios, "activations": self._recorder.mean()}
        rec["cost_s"] = self._cost + self._recorder.seconds + time.perf_counter() - t0
        self._recorder = None
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
