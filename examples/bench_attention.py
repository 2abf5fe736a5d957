"""Causal attention alone, forward and backward: ms and TFLOP/s of each implementation.

On the GPU (--backend cupy) it compares, on the same qkv and in one run:
  flash bf16      gpt2np/backends/cuda/flash_attention.cu (the bf16 default)
  blocks bf16     the query-block attention with bf16 cuBLAS GEMMs (GPT2NP_FLASH=0)
  blocks tf32     the same in TF32, and in fp32
  torch sdpa      torch's scaled_dot_product_attention(is_causal=True) in bf16 (flash
                  kernels), on (B, NH, T, hs) views of the same data, if torch has CUDA
On the CPU (--backend numpy) the numpy backend's kernel (gpt2np.backends.numpy_kernels:
heads per task on the threads) and the reference layer it replaces, in float32 and in
emulated bf16.

FLOPs as FlashAttention counts them: forward 4 B NH T^2 hs / 2 (two products, causal half),
backward 2.5 times that. `err` is each output's max relative difference from the first row.

--seq-lens 128,256,...: how the cost grows with T, the batch shrinking so that every T has
--tokens tokens: per T, attention's forward+backward (the backend's kernel) beside the
linears of the same tokens (c_attn's and c_fc's GEMMs, forward and backward), both in
TFLOP/s, timed in turns.

    python examples/bench_attention.py --backend cupy -B 16 --n-head 12 -T 1024 --head-size 64
    python examples/bench_attention.py -B 1 -T 1024                      # CPU, GPT-2's heads
    python examples/bench_attention.py --seq-lens 128,256,512,1024,2048 --tokens 2048
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))
sys.path.insert(0, _HERE)

from gpt2np.backends import get_backend  # noqa: E402
from gpt2np import layers as L  # noqa: E402
from profile_step import Timers  # noqa: E402  (CUDA events on the GPU, host clocks else)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=("numpy", "cupy"), default="numpy")
    p.add_argument("-B", "--batch-size", type=int, default=4)
    p.add_argument("--n-head", type=int, default=12)
    p.add_argument("-T", "--seq-len", type=int, default=256)
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--steps", type=int, default=10, help="timed repetitions")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seq-lens", help="comma-separated T values: the sweep against the linears")
    p.add_argument("--tokens", type=int, default=2048, help="tokens per T of the sweep")
    p.add_argument("--json", help="also write the rows to this file")
    return p.parse_args(argv)


def time_ours(backend, qkv, dy, n_head, precision, flash, steps, warmup, clock, ops=None):
    """(forward ms, forward+backward ms, y, dqkv) of the backend's attention (the fused one
    on the GPU, the numpy kernel on the CPU; `ops` to time others) in `precision`, as a
    model runs it."""
    os.environ["GPT2NP_FLASH"] = "1" if flash else "0"
    ops = ops or backend.layer_ops(qkv.dtype)
    fwd, both = [], []
    with L.matmul_precision(precision, backend):
        for i in range(warmup + steps):
            t0 = clock.mark()
            y, cache = ops.attention_forward(qkv, n_head)
            t1 = clock.mark()
            dqkv = ops.attention_backward(dy, cache)
            t2 = clock.mark()
            if i >= warmup:
                fwd.append(clock.ms(t0, t1))
                both.append(clock.ms(t0, t2))
    return float(np.median(fwd)), float(np.median(both)), y, dqkv


def time_torch(qkv, dy, n_head, steps, warmup, clock):
    """The same with torch's SDPA in bf16 on the same device memory (via DLPack)."""
    import torch
    import torch.nn.functional as F

    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // n_head
    x = torch.from_dlpack(qkv).to(torch.bfloat16)
    q, k, v = (t.view(B, T, n_head, hs).transpose(1, 2).detach().requires_grad_(True)
               for t in x.split(C, dim=-1))
    g = torch.from_dlpack(dy).to(torch.bfloat16).view(B, T, n_head, hs).transpose(1, 2)
    fwd, both = [], []
    for i in range(warmup + steps):
        t0 = clock.mark()
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        t1 = clock.mark()
        y.backward(g)
        t2 = clock.mark()
        if i >= warmup:
            fwd.append(clock.ms(t0, t1))
            both.append(clock.ms(t0, t2))
        q.grad = k.grad = v.grad = None
    y_ours = y.detach().transpose(1, 2).reshape(B, T, C).float()
    return float(np.median(fwd)), float(np.median(both)), y_ours


def sweep(backend, args, clock):
    """Attention's forward+backward against the linears', T by T, at --tokens tokens each:
    rows of (T, B, attention TFLOP/s, linears TFLOP/s)."""
    xp = backend.xp
    NH, hs = args.n_head, args.head_size
    C = NH * hs
    rng = np.random.default_rng(0)
    ops = backend.layer_ops(xp.float32)
    w = {n: xp.asarray(rng.standard_normal((C, n * C)) * 0.02, dtype=xp.float32) for n in (3, 4)}
    rows = []
    for T in [int(t) for t in args.seq_lens.split(",")]:
        B = max(1, args.tokens // T)
        x = xp.asarray(rng.standard_normal((B, T, C)), dtype=xp.float32)
        qkv = xp.asarray(rng.standard_normal((B, T, 3 * C)), dtype=xp.float32)
        dy = xp.asarray(rng.standard_normal((B, T, C)), dtype=xp.float32)
        att, lin = [], []
        with L.matmul_precision("fp32", backend):
            for i in range(args.warmup + args.steps):
                t0 = clock.mark()
                _, cache = ops.attention_forward(qkv, NH)
                ops.attention_backward(dy, cache)
                t1 = clock.mark()
                for n in (3, 4):  # c_attn's and c_fc's GEMMs, forward and backward
                    out, c = ops.linear_forward(x, w[n], None)
                    ops.linear_backward(out, c)
                t2 = clock.mark()
                if i >= args.warmup:
                    att.append(clock.ms(t0, t1))
                    lin.append(clock.ms(t1, t2))
        att_flops = 3.5 * 2.0 * B * NH * T * T * hs  # causal, as above
        lin_flops = 3 * 2 * B * T * C * 7 * C  # (C,3C) and (C,4C): forward + 2x backward
        rows.append((T, B, att_flops / np.median(att) / 1e9, lin_flops / np.median(lin) / 1e9))
    print(f"attention (the backend's kernel, fp32) against the linears, {args.tokens} tokens per "
          f"T, NH={NH} hs={hs}, medians of {args.steps}; TFLOP/s")
    print(f"{'T':>6s} {'B':>4s} {'attention':>10s} {'linears':>9s} {'ratio':>6s}")
    for T, B, a, li in rows:
        print(f"{T:6d} {B:4d} {a:10.4f} {li:9.4f} {a / li:6.2f}")
    return rows


def main(argv=None):
    args = parse_args(argv)
    backend = get_backend(args.backend)
    if args.seq_lens:
        rows = sweep(backend, args, Timers(backend))
        if args.json:
            with open(args.json, "w") as f:
                json.dump([dict(T=T, B=B, attention_tflops=a, linears_tflops=li)
                           for T, B, a, li in rows], f, indent=1)
        return 0
    xp = backend.xp
    B, NH, T, hs = args.batch_size, args.n_head, args.seq_len, args.head_size
    C = NH * hs
    rng = np.random.default_rng(0)
    qkv = xp.asarray(rng.standard_normal((B, T, 3 * C)), dtype=xp.float32)
    dy = xp.asarray(rng.standard_normal((B, T, C)), dtype=xp.float32)
    clock = Timers(backend)  # its mark() and ms()
    flops_fwd = 2.0 * B * NH * T * T * hs  # 4 B NH T^2 hs, halved by the causal mask

    if args.backend == "cupy":
        cases = [("flash bf16", "bf16", True, None), ("blocks bf16", "bf16", False, None),
                 ("blocks tf32", "tf32", False, None), ("blocks fp32", "fp32", False, None)]
    else:
        cases = [("numpy kernel fp32", "fp32", False, None),
                 ("reference fp32", "fp32", False, L.REFERENCE_OPS),
                 ("numpy kernel bf16 (emulated)", "bf16", False, None),
                 ("reference bf16 (emulated)", "bf16", False, L.REFERENCE_OPS)]
    saved_flag = os.environ.get("GPT2NP_FLASH")
    rows, first = [], None
    try:
        for name, precision, flash, ops in cases:
            f_ms, b_ms, y, _ = time_ours(backend, qkv, dy, NH, precision, flash, args.steps,
                                         args.warmup, clock, ops)
            rows.append((name, f_ms, b_ms, y))
    finally:
        if saved_flag is None:
            os.environ.pop("GPT2NP_FLASH", None)
        else:
            os.environ["GPT2NP_FLASH"] = saved_flag
    if args.backend == "cupy":
        try:
            import torch

            if torch.cuda.is_available():
                rows.append(("torch sdpa bf16", *time_torch(qkv, dy, NH, args.steps,
                                                            args.warmup, clock)))
        except ImportError:
            pass

    print(f"causal attention B={B} NH={NH} T={T} hs={hs} ({args.backend}), median of "
          f"{args.steps}")
    print(f"{'':24s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'fwd TFLOP/s':>12s} "
          f"{'f+b TFLOP/s':>12s} {'err':>9s}")
    table = []
    for name, f_ms, b_ms, y in rows:
        y = np.asarray(y.get() if hasattr(y, "get") else
                       (y.cpu().numpy() if hasattr(y, "cpu") else y), dtype=np.float64)
        first = y if first is None else first
        err = float(np.abs(y - first).max() / np.abs(first).max())
        tf_f, tf_b = flops_fwd / f_ms / 1e9, 3.5 * flops_fwd / b_ms / 1e9
        print(f"{name:24s} {f_ms:9.3f} {b_ms:11.3f} {tf_f:12.4g} {tf_b:12.4g} {err:9.1e}")
        table.append(dict(name=name, fwd_ms=f_ms, fwd_bwd_ms=b_ms, fwd_tflops=tf_f,
                          fwd_bwd_tflops=tf_b, rel_err=err))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(B=B, n_head=NH, T=T, head_size=hs, backend=args.backend,
                           rows=table), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
