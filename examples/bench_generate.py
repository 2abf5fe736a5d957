"""Generation speed: gpt2np with its KV cache, gpt2np recomputing the full context every
token, and transformers' generate, on the CPU, same weights, prompt and length, one run.

    python examples/bench_generate.py                      # GPT-2 small shape, 256 new tokens
    python examples/bench_generate.py --skip-recompute        # the recompute baseline is slow
    python examples/bench_generate.py --n-layer 4 --n-head 4 --n-embd 256   # a smaller GPT-2

The model is a random GPT-2 built by transformers (GPT-2 small's shape by default), saved to
a temporary folder and loaded into gpt2np with from_pretrained, so both sides hold the very
same float32 weights. Decoding is greedy for all three, so they do the same work; the table
also says whether the token sequences agree.

The limit. At batch 1 each new token reads every weight once (all but the position table:
497 MB for GPT-2 small in float32), so a token cannot take less than those bytes over the
machine's matrix-vector bandwidth. That bandwidth is measured in the same run: the fastest
of many lm_head-sized products (1, C) @ (C, V), by numpy's BLAS on its own threads and by
the numpy backend's matmul, sampled in turns with --repeats runs of the KV-cache
generation (whose median is reported). "of the limit" = (bytes per token x tokens/s) /
that bandwidth. Benchmark with OpenBLAS's own kernels (see examples/bench.py):
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/bench_generate.py
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(_HERE, ".."))
sys.path.insert(0, _HERE)

import numpy as np  # noqa: E402

from bench import blas_info, kernel_warning  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


class GemvPeak:
    """The matrix-vector bandwidth of this machine: the fastest of many (1, C) @ (C, V)
    products with the model's own (V, C) embedding (too big for any cache), by numpy's BLAS
    (its own threads) and by the numpy backend's matmul (its threads), sampled in turns
    with the generation runs so that quiet moments are caught by both."""

    def __init__(self, wte):
        from gpt2np.backends import get_backend

        self.w = wte.T  # (C, V): the lm_head's operand
        self.x = np.ones((1, wte.shape[1]), dtype=wte.dtype)
        self.out = np.empty((1, wte.shape[0]), dtype=wte.dtype)
        self.backend = get_backend("numpy")
        self.best = {"BLAS": float("inf"), "backend": float("inf")}

    def sample(self, reps=3):
        for _ in range(reps):
            for name, f in (("BLAS", lambda: np.matmul(self.x, self.w, out=self.out)),
                            ("backend", lambda: self.backend.matmul(self.x, self.w, out=self.out))):
                _, t = timed(f)
                self.best[name] = min(self.best[name], t)

    def bandwidth(self):
        return self.w.nbytes / min(self.best.values())

    def describe(self):
        parts = ", ".join(f"{k} {self.w.nbytes / t / 1e9:.1f}" for k, t in self.best.items())
        return f"{self.bandwidth() / 1e9:.1f} GB/s (the fastest: {parts} GB/s)"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-layer", type=int, default=12)
    ap.add_argument("--n-head", type=int, default=12)
    ap.add_argument("--n-embd", type=int, default=768)
    ap.add_argument("--vocab-size", type=int, default=50257)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("--prompt-len", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads (default: torch's own choice); set OMP_NUM_THREADS for numpy's BLAS")
    ap.add_argument("--skip-recompute", action="store_true", help="the slow baseline; skip it")
    ap.add_argument("--skip-transformers", action="store_true", help="time gpt2np alone")
    ap.add_argument("--repeats", type=int, default=3,
                    help="runs of the KV-cache generation (median), in turns with the limit's "
                    "samples")
    args = ap.parse_args(argv)

    import torch
    import transformers
    from transformers import GPT2Config, GPT2LMHeadModel

    import gpt2np
    from gpt2np.generate import generate

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    hf_cfg = GPT2Config(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                        vocab_size=args.vocab_size, n_positions=args.block_size,
                        bos_token_id=None, eos_token_id=None)  # no early stop at <|endoftext|>
    hf = GPT2LMHeadModel(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d)
        model = gpt2np.from_pretrained(d)  # the same weights, through the real loading path

    idx = np.random.default_rng(0).integers(0, args.vocab_size, (args.batch, args.prompt_len))
    n, B = args.new_tokens, args.batch
    print(f"model: {model.num_params() / 1e6:.1f}M params {model.config}, float32")
    print(f"batch {B}, prompt {args.prompt_len} tokens, {n} new tokens, greedy")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"load average {os.getloadavg()[0]:.1f}; numpy {np.__version__}, torch {torch.__version__} "
          f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")
    print(f"BLAS: {blas_info()}")
    if kernel_warning():
        print(kernel_warning())

    def hf_generate(k):
        with torch.no_grad():
            t = torch.from_numpy(idx)
            return hf.generate(t, attention_mask=torch.ones_like(t), do_sample=False, max_new_tokens=k,
                               min_new_tokens=k, pad_token_id=0).numpy()

    # warm up each path (first-call allocations, torch's dispatch caches)
    generate(model, idx, 4, temperature=0)
    hf_generate(4)

    # the KV-cache runs in turns with the limit's samples; the others once each
    peak = GemvPeak(model.params["transformer.wte.weight"])
    peak.sample()
    kv_times = []
    for _ in range(max(1, args.repeats)):
        out_kv, t = timed(lambda: generate(model, idx, n, temperature=0))
        kv_times.append(t)
        peak.sample()
    rows = [("gpt2np, KV cache", float(np.median(kv_times)), out_kv)]
    print(f"  gpt2np, KV cache: {B * n} tokens in {rows[0][1]:.1f} s (median of "
          f"{len(kv_times)})", file=sys.stderr, flush=True)
    methods = []
    if not args.skip_recompute:
        methods.append(("gpt2np, full recompute",
                        lambda: generate(model, idx, n, temperature=0, use_cache=False)))
    if not args.skip_transformers:
        methods.append(("transformers generate (CPU)", lambda: hf_generate(n)))
    for name, fn in methods:
        out, t = timed(fn)
        rows.append((name, t, out))
        print(f"  {name}: {B * n} tokens in {t:.1f} s", file=sys.stderr, flush=True)
    t_kv, ref = rows[0][1], rows[-1][2]

    # every weight but the position table is read once per step of the batch
    step_bytes = sum(p.nbytes for k, p in model.params.items() if k != "transformer.wpe.weight")
    print(f"\nload average after the run {os.getloadavg()[0]:.1f}")
    print(f"the limit: {step_bytes / 1e6:.0f} MB of weights per step over the matrix-vector "
          f"bandwidth {peak.describe()} = {peak.bandwidth() / step_bytes:.1f} steps/s")
    print(f"| {'method':<28} | {'tokens/s':>9} | {'of the limit':>12} | {'KV cache is x faster':>20} "
          f"| same tokens as {'HF' if not args.skip_transformers else 'the last'} |")
    print(f"|{'-' * 30}|{'-' * 11}:|{'-' * 13}:|{'-' * 21}:|{'-' * 19}|")
    for name, t, out in rows:
        same = "yes" if np.array_equal(out, ref) else \
            f"no (from token {int(np.argmax((out != ref).any(axis=0)))})"
        fraction = (n / t) * step_bytes / peak.bandwidth()  # steps/s over the limit's
        print(f"| {name:<28} | {B * n / t:>9.1f} | {fraction:>12.1%} | {t / t_kv:>20.2f} | {same:<17} |")


if __name__ == "__main__":
    main()
