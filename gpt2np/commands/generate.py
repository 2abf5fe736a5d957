"""`gpt2np generate`: sample from any model source."""
from __future__ import annotations

import sys
import time

import numpy as np

from gpt2np.cli import ArgumentParser, nonneg_float, nonneg_int, positive_int, run_main
from gpt2np.generate import generate

# ------------------------------------------------------------------------------ the command


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="gpt2np generate", description=(
        "Sample from a GPT-2: the prompt (GPT-2's BPE) is repeated --num-samples times as one "
        "batch and continued with temperature and top-k sampling through the KV cache."))
    a = ap.add_argument
    a("--model", default="gpt2", help="a training run's out-dir or its ckpt.safetensors, a folder "
      "with model.safetensors + config.json, an llm.c model file, or a hub id (gpt2, "
      "gpt2-medium, ...; default gpt2)")
    a("--prompt", metavar="TEXT", default="Hello, I'm a language model,",
      help="the text to continue; empty: start from <|endoftext|> (default %(default)r)")
    a("--num-samples", metavar="N", type=positive_int, default=5, help="samples, one batch (default %(default)s)")
    a("--max-new-tokens", metavar="N", type=nonneg_int, default=30,
      help="tokens generated per sample (default %(default)s)")
    a("--top-k", metavar="K", type=nonneg_int, default=50,
      help="sample among the k likeliest tokens; 0: the whole vocabulary (default %(default)s)")
    a("--temperature", metavar="T", type=nonneg_float, default=1.0,
      help="divides the logits; 0 is greedy (default %(default)s)")
    a("--seed", metavar="N", type=nonneg_int, default=42, help="of the sampling (default %(default)s)")
    a("--backend", default="numpy", choices=["numpy", "cupy"], help="(default %(default)s)")
    a("--dtype", default="float32", choices=["float32", "float64"], help="(default %(default)s)")
    return ap


def _main(argv) -> int:
    from gpt2np.data.tokenizer import EOT_TEXT, get_encoding
    from gpt2np.io.pretrained import from_pretrained

    args = build_parser().parse_args(argv)
    t0 = time.perf_counter()
    model = from_pretrained(args.model, backend=args.backend, dtype=args.dtype)
    print(f"loaded {args.model} ({model.num_params() / 1e6:.2f}M params, {model.config}) "
          f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    enc = get_encoding()
    tokens = enc.encode(args.prompt, allowed_special={EOT_TEXT}) or [enc.eot_token]
    if max(tokens) >= model.config.vocab_size:
        raise ValueError(f"the prompt encodes to token ids up to {max(tokens)}, beyond this "
                         f"model's vocab_size {model.config.vocab_size}: it was not trained on "
                         f"GPT-2's BPE, which this command uses")
    idx = np.tile(np.array(tokens, dtype=np.int64), (args.num_samples, 1))  # (N, T)
    t0 = time.perf_counter()
    out = generate(model, idx, args.max_new_tokens, temperature=args.temperature,
                   top_k=args.top_k or None, seed=args.seed)
    dt = time.perf_counter() - t0
    for i, row in enumerate(out):
        print(f"--- sample {i + 1} ---\n{enc.decode(row.tolist())}")
    n = args.num_samples * args.max_new_tokens
    print(f"{n} new tokens in {dt:.2f}s ({n / max(dt, 1e-9):.1f} tokens/s)", file=sys.stderr)
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)
