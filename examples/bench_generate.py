"""Generation speed: gpt2np with its KV cache, gpt2np recomputing the full context every
token, and transformers' generate, on the CPU, same weights, prompt and length, one run.

    python examples/bench_generate.py                      # GPT-2 small shape, 256 new tokens
    python examples/bench_generate.py --skip-recompute        # the recompute baseline is slow
    python examples/bench_generate.py --n-layer 4 --n-head 4 --n-embd 256   # a smaller GPT-2

The model is a random GPT-2 built by transformers (GPT-2 small's shape by default), saved to
a temporary folder and loaded into gpt2np with from_pretrained, so both sides hold the very
same float32 weights. Decoding is greedy for all three, so they do the same work; the table
also says whether the token sequences agree.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


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

    def hf_generate(k):
        with torch.no_grad():
            t = torch.from_numpy(idx)
            return hf.generate(t, attention_mask=torch.ones_like(t), do_sample=False, max_new_tokens=k,
                               min_new_tokens=k, pad_token_id=0).numpy()

    # warm up each path (first-call allocations, torch's dispatch caches)
    generate(model, idx, 4, temperature=0)
    hf_generate(4)

    methods = [("gpt2np, KV cache", lambda: generate(model, idx, n, temperature=0))]
    if not args.skip_recompute:
        methods.append(("gpt2np, full recompute",
                        lambda: generate(model, idx, n, temperature=0, use_cache=False)))
    methods.append(("transformers generate (CPU)", lambda: hf_generate(n)))
    rows = []
    for name, fn in methods:
        out, t = timed(fn)
        rows.append((name, t, out))
        print(f"  {name}: {B * n} tokens in {t:.1f} s", file=sys.stderr, flush=True)
    t_kv, ref = rows[0][1], rows[-1][2]

    print(f"\nload average after the run {os.getloadavg()[0]:.1f}")
    print(f"| {'method':<28} | {'tokens/s':>9} | {'KV cache is x faster':>20} | same tokens as HF |")
    print(f"|{'-' * 30}|{'-' * 11}:|{'-' * 21}:|{'-' * 19}|")
    for name, t, out in rows:
        same = "yes" if np.array_equal(out, ref) else \
            f"no (from token {int(np.argmax((out != ref).any(axis=0)))})"
        print(f"| {name:<28} | {B * n / t:>9.1f} | {t / t_kv:>20.2f} | {same:<17} |")


if __name__ == "__main__":
    main()
