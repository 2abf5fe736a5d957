#!/usr/bin/env python
"""Reproduce GPT-2 (124M): build-nanogpt's recipe on FineWeb-Edu shards, with gpt2np.

    # the data: 10B tokens of FineWeb-Edu (sample-10BT) as 100 shards of 1e8 tokens
    gpt2np prepare --dataset HuggingFaceFW/fineweb-edu --dataset-config sample-10BT \\
        --out-dir data/edu_fineweb10B --shard-size 100000000 --prefix edufineweb
    # the run: 8 GPUs, 19,073 steps of 524,288 tokens (one epoch of the 10B tokens)
    torchrun --standalone --nproc_per_node=8 examples/train_gpt2.py \
        --data-shards data/edu_fineweb10B

Every flag of `gpt2np train` is here; only the defaults differ, and they are the recipe of "Let's reproduce GPT-2 (124M)" (build-nanogpt's train_gpt2.py):

  model      12 layers, 12 heads, 768 dims, vocab 50304 (50257 padded to a multiple of 128),
             block 1024
  batch      micro-batch 64 x 1024 tokens per GPU; 524,288 tokens (2**19) per optimizer step,
             the rest by gradient accumulation. Out of memory? Lower --batch-size (32, 16, ...):
             the step stays 524,288 tokens, accumulation makes up the difference.
  optimizer  AdamW (0.9, 0.95), weight decay 0.1, clip 1.0; lr 6e-4 -> 6e-5 on a cosine after
             715 warmup steps; 19,073 steps (10B tokens)
  evals      every 250 steps: val loss on 20 batches of 524,288 tokens (10.5M tokens, what
             build-nanogpt's 8 GPUs x 20 val steps read) and HellaSwag (acc_norm; the cache,
             else a download of the val split; --hellaswag PATH, or --no-hellaswag); a
             checkpoint every 5,000 steps and at the end
  engine     --backend cupy --precision bf16 when CuPy sees a GPU, else numpy (fp32)

A resumed run (--resume) keeps its checkpoint's settings: the recipe fills in only what a
fresh run leaves unset. See docs/reproduce-gpt2.md for what a run reaches.
"""
import os
import sys

# run from a checkout without installing: put the repository root on the path
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gpt2np.cli import run_main  # noqa: E402
from gpt2np.commands import train  # noqa: E402
from gpt2np.train.settings import flag  # noqa: E402

# the run settings of the recipe (a fresh run's defaults; a resumed run keeps its own)
RECIPE = dict(
    n_layer=12, n_head=12, n_embd=768, vocab_size=50304, block_size=1024,
    batch_size=64, total_batch_size=524288,
    lr=6e-4, min_lr=6e-5, warmup_steps=715, max_steps=19073,
    weight_decay=0.1, grad_clip=1.0, eval_interval=250, eval_batches=20,
)
# this invocation's defaults (also on resume)
INVOCATION = dict(out_dir="out/gpt2-124m", save_interval=5000, num_samples=4, sample_tokens=32)
PREPARE = ("gpt2np prepare --dataset HuggingFaceFW/fineweb-edu --dataset-config "
           "sample-10BT --out-dir data/edu_fineweb10B --shard-size 100000000 --prefix edufineweb")


def has_gpu() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:  # no cupy, no driver, no device: the CPU engine
        return False


def engine_defaults() -> dict:
    return dict(backend="cupy", precision="bf16") if has_gpu() else dict(backend="numpy",
                                                                       precision="fp32")


def build_parser(engine: dict | None = None):
    """`gpt2np train`'s parser with the recipe's defaults, and --no-hellaswag."""
    p = train.build_parser(
        {**RECIPE, **(engine or {}), **INVOCATION}, prog="examples/train_gpt2.py",
        description="Reproduce GPT-2 (124M) on FineWeb-Edu shards: build-nanogpt's recipe. "
                    "A new run needs --data-shards.",
        epilog=f"Make the shards first: {PREPARE}")
    p.add_argument("--no-hellaswag", action="store_true",
                   help="no HellaSwag at the evals (default: --hellaswag PATH, else the cached "
                        "or downloaded val split)")
    return p


def recipe_argv(argv: list) -> list:
    """argv for `gpt2np train`: the user's flags plus the recipe's for what they left unset."""
    engine = engine_defaults()
    parser = build_parser(engine)
    args = parser.parse_args(argv)
    if args.data_shards is None and not args.resume:  # (a resumed run knows its shards)
        parser.error("--data-shards is required for a new run: the token shards of "
                     f"FineWeb-Edu (or any corpus); make them with: {PREPARE}")
    argv = [a for a in argv if a != "--no-hellaswag"]
    extra = []
    if args.backend is not None:  # the user's engine; bf16 matmuls only for cupy
        engine = dict(precision="bf16") if args.backend == "cupy" else {}
    if not args.resume:  # a resumed run keeps the settings stored in its checkpoint
        for key, value in {**RECIPE, **engine}.items():
            if getattr(args, key) is None:
                extra += [flag(key), str(value)]
    for key in INVOCATION:  # the parsed value: the user's (however spelt), else the recipe's
        if not any(a == flag(key) or a.startswith(flag(key) + "=") for a in argv):
            extra += [flag(key), str(getattr(args, key))]
    if not args.no_hellaswag and args.hellaswag is None:
        extra += ["--hellaswag", str(hellaswag_file(args.cache_dir))]
    return argv + extra


def hellaswag_file(cache_dir):
    """HellaSwag's val split for the recipe's evals: gpt2np's cache (--cache-dir, else
    $GPT2NP_CACHE or ~/.cache/gpt2np), else a download into it."""
    from gpt2np.errors import UsageError
    from gpt2np.evals.hellaswag import find_hellaswag

    try:
        return find_hellaswag(cache=cache_dir, flag="--hellaswag")
    except FileNotFoundError as e:
        raise UsageError(f"{e}; or train without it: --no-hellaswag") from e


def main(argv=None) -> int:
    # errors of the recipe itself (no HellaSwag file offline, ...) end in one `error:` line
    return run_main(lambda a: train.main(recipe_argv(sys.argv[1:] if a is None else list(a))),
                    argv)


if __name__ == "__main__":
    sys.exit(main())
