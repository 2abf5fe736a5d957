"""Where the milliseconds of one training step go, layer by layer.

Wraps each leaf layer function the model runs (model.ops: embedding, LayerNorm, linear,
attention, GELU, lm_head, cross-entropy; forward and backward, fused kernels where the
backend has them) and the optimizer step with timers:
CUDA events on the GPU (no synchronisation inside the step, so the timings are those of the
real pipeline), perf_counter on the CPU. Prints a table of milliseconds per step, share of
the step and, for the matmul layers, achieved TFLOP/s.

    python examples/profile_step.py --backend cupy --preset gpt2 -T 1024 -B 16 --precision bf16
    python examples/profile_step.py --backend numpy --n-layer 4 --n-embd 128 -T 128 -B 8
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import os
import sys
import time
from collections import defaultdict

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gpt2np import GPT, AdamW, GPTConfig  # noqa: E402
from gpt2np import layers as L  # noqa: E402

LEAVES = ("embedding", "layernorm", "linear", "attention", "gelu", "lm_head", "cross_entropy")


class Timers:
    """name -> list of (start, end) marks; CUDA events on the GPU, host clocks otherwise."""

    def __init__(self, backend):
        self.gpu = backend.name == "cupy"
        self.xp = backend.xp
        self.marks = defaultdict(list)

    def mark(self):
        if self.gpu:
            e = self.xp.cuda.Event()
            e.record()
            return e
        return time.perf_counter()

    def wrap(self, name, f):
        @functools.wraps(f)
        def timed(*args, **kwargs):
            t0 = self.mark()
            out = f(*args, **kwargs)
            self.marks[name].append((t0, self.mark()))
            return out
        return timed

    def ms(self, a, b):
        """Milliseconds between two marks (on the GPU: waits for b)."""
        if self.gpu:
            b.synchronize()
            return self.xp.cuda.get_elapsed_time(a, b)
        return 1e3 * (b - a)

    def totals_ms(self):
        if self.gpu:
            self.xp.cuda.Device().synchronize()
        return {k: sum(self.ms(a, b) for a, b in v) for k, v in self.marks.items()}


def matmul_flops(cfg, B, T):
    """FLOPs per step of each matmul layer (forward + backward = 3x forward)."""
    C, L_, V = cfg.n_embd, cfg.n_layer, cfg.vocab_size
    n = B * T
    linear = L_ * 2 * n * (C * 3 * C + C * C + C * 4 * C + 4 * C * C)
    attention = L_ * 2 * 2 * B * T * T * C  # q k^T and P v over the full (T,T)
    return {"linear": 3 * linear, "attention": 3 * attention, "lm_head": 3 * 2 * n * C * V}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=["numpy", "cupy"], default="numpy")
    ap.add_argument("--preset", help="gpt2, gpt2-medium, ... (else the sizes below)")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=50304)
    ap.add_argument("-B", "--batch-size", type=int, default=8)
    ap.add_argument("-T", "--seq-len", type=int, default=128)
    ap.add_argument("--precision", choices=list(L.PRECISIONS), default="fp32")
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (after one warmup)")
    args = ap.parse_args(argv)

    if args.preset:
        sizes = GPTConfig.from_preset(args.preset).to_dict()
    else:
        sizes = dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    sizes.update(vocab_size=args.vocab_size, block_size=max(args.seq_len, 1))
    cfg = GPTConfig(**{k: sizes[k] for k in ("n_layer", "n_head", "n_embd", "vocab_size",
                                             "block_size")})
    B, T = args.batch_size, args.seq_len
    model = GPT(cfg, backend=args.backend, precision=args.precision, seed=0)
    opt = AdamW(model.params, lr=6e-4)
    be = model.backend
    rng = np.random.default_rng(0)
    idx = be.asarray(rng.integers(0, cfg.vocab_size, (B, T)))
    targets = be.asarray(rng.integers(0, cfg.vocab_size, (B, T)))

    def step():
        _, loss = model.forward(idx, targets)
        opt.step(model.backward())
        return loss

    step()  # warmup: kernels built, buffers allocated
    be.synchronize()
    timers = Timers(be)
    untimed = model.ops
    model.ops = dataclasses.replace(untimed, **{
        f"{leaf}_{part}": timers.wrap(f"{leaf}_{part}", getattr(untimed, f"{leaf}_{part}"))
        for leaf in LEAVES for part in ("forward", "backward")})
    untimed_step = AdamW.step
    AdamW.step = timers.wrap("adamw", AdamW.step)
    try:
        t0 = timers.mark()
        for _ in range(args.steps):
            step()
        t1 = timers.mark()
        timers.marks["step"].append((t0, t1))
        totals = timers.totals_ms()
    finally:
        model.ops = untimed
        AdamW.step = untimed_step

    n = args.steps
    step_ms = totals.pop("step") / n
    flops = matmul_flops(cfg, B, T)
    print(f"# {args.backend} {args.precision}: {cfg.n_layer}L {cfg.n_head}H {cfg.n_embd}C "
          f"V{cfg.vocab_size}, B={B} T={T}; {step_ms:.2f} ms/step, "
          f"{B * T / step_ms * 1e3:,.0f} tok/s (profiled: timers add a little)")
    print(f"{'part':<26s}{'ms/step':>10s}{'share':>8s}{'TFLOP/s':>10s}")
    rows = sorted(totals.items(), key=lambda kv: -kv[1])
    for name, ms in rows:
        ms /= n
        leaf = name.rsplit("_", 1)[0]
        tf = ""
        if leaf in flops:  # forward is 1/3 of the layer's FLOPs, backward 2/3
            share = 1 / 3 if name.endswith("forward") else 2 / 3
            tf = f"{flops[leaf] * share / (ms * 1e-3) / 1e12:10.2f}"
        print(f"{name:<26s}{ms:10.2f}{ms / step_ms:8.1%}{tf}")
    covered = sum(totals.values()) / n
    print(f"{'(the rest: residual adds, copies, Python)':<26s}"
          f"{step_ms - covered:10.2f}{(step_ms - covered) / step_ms:8.1%}")
    print(attention_against_linears(flops, totals, n))
    return 0


def attention_against_linears(flops, totals, n):
    """One line: attention's forward+backward TFLOP/s beside the linears' (the table counts
    attention's products over the full T x T, twice the causal half that is needed)."""
    def tflops(leaf):
        ms = (totals.get(f"{leaf}_forward", 0) + totals.get(f"{leaf}_backward", 0)) / n
        return flops[leaf] / (ms * 1e-3) / 1e12 if ms else float("nan")

    att, lin = tflops("attention"), tflops("linear")
    return (f"# attention {att:.3f} TFLOP/s forward+backward over the full T x T ({att / 2:.3f} "
            f"over the causal half), linears {lin:.3f}: the linears run {lin / att:.2f}x "
            f"attention's rate ({2 * lin / att:.2f}x counting the causal half)")


if __name__ == "__main__":
    sys.exit(main())
