"""Sample from GPT-2 with the NumPy (or CuPy) model.

    python examples/generate.py                          # gpt2 from the Hugging Face hub / cache
    python examples/generate.py --model path/to/folder   # model.safetensors + config.json
    python examples/generate.py --temperature 0          # greedy

The prompt is encoded with GPT-2's BPE, repeated --num-samples times as one batch, and
continued with temperature and top-k sampling (nanoGPT's top 50 by default) through the
KV cache.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

import gpt2np  # noqa: E402
from gpt2np.tokenizer import get_encoding  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt2",
                    help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, a hub id, or a local folder")
    ap.add_argument("--prompt", default="Hello, I'm a language model,")
    ap.add_argument("--num-samples", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=30)
    ap.add_argument("--top-k", type=int, default=50, help="0 samples from the whole vocabulary")
    ap.add_argument("--temperature", type=float, default=1.0, help="0 is greedy")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--backend", default="numpy", choices=["numpy", "cupy"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    args = ap.parse_args(argv)
    if args.num_samples < 1:
        ap.error("--num-samples must be >= 1")

    t0 = time.perf_counter()
    try:
        model = gpt2np.from_pretrained(args.model, backend=args.backend, dtype=args.dtype)
    except (OSError, ValueError) as e:  # no such folder, not cached offline, bad config...
        sys.exit(f"error: {e}")
    print(f"loaded {args.model} ({model.num_params() / 1e6:.1f}M params, {model.config}) "
          f"in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    enc = get_encoding()
    tokens = enc.encode(args.prompt, allowed_special={"<|endoftext|>"}) or [enc.eot_token]
    if max(tokens) >= model.config.vocab_size:
        sys.exit(f"the prompt has token ids up to {max(tokens)}, beyond this model's vocabulary "
                 f"({model.config.vocab_size}): it was not trained on GPT-2's BPE")
    idx = np.tile(np.array(tokens, dtype=np.int64), (args.num_samples, 1))

    t0 = time.perf_counter()
    out = model.generate(idx, args.max_new_tokens, temperature=args.temperature,
                         top_k=args.top_k or None, seed=args.seed)
    dt = time.perf_counter() - t0
    for i, row in enumerate(out):
        # a padded vocabulary (e.g. 50304) has ids the BPE cannot decode: drop them
        text = enc.decode([int(t) for t in row if t < enc.n_vocab])
        print(f"> {text}")
    n = args.num_samples * args.max_new_tokens
    print(f"{n} tokens in {dt:.2f}s ({n / dt:.1f} tokens/s)", file=sys.stderr)


if __name__ == "__main__":
    main()
