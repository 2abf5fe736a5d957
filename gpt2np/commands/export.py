"""`gpt2np export SRC DEST`: write any model source as a folder transformers loads."""
from __future__ import annotations

import sys

from gpt2np.cli import ArgumentParser, UsageError, run_main
from gpt2np.config import GPT2_VOCAB_SIZE
from gpt2np.io.export import DTYPES, export

# ------------------------------------------------------------------------------ the command


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="gpt2np export", description=(
        "Write a model as a folder transformers.GPT2LMHeadModel.from_pretrained loads "
        "(model.safetensors, config.json, generation_config.json, GPT-2's tokenizer files)."))
    a = ap.add_argument
    a("src", metavar="SRC", help="a training run's out-dir or its ckpt.safetensors, a folder with "
      "model.safetensors + config.json, or a hub id (gpt2, ...)")
    a("dest", metavar="DEST", help="the folder to write (must not exist, or be empty)")
    a("--dtype", default="float32", choices=DTYPES, help="of the saved weights (default float32)")
    a("--keep-padded-vocab", action="store_true",
      help=f"keep a padded vocabulary's rows past GPT-2's {GPT2_VOCAB_SIZE} tokens (default: crop them)")
    a("--overwrite", action="store_true", help="replace DEST if it holds an earlier export")
    return ap


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    if not str(args.src).strip() or not str(args.dest).strip():
        raise UsageError("SRC and DEST must not be empty")
    r = export(args.src, args.dest, dtype=args.dtype, keep_padded_vocab=args.keep_padded_vocab,
               overwrite=args.overwrite)
    cfg = r["config"]
    cropped = (f"; vocabulary cropped from {cfg.vocab_size} to {r['vocab_size']}"
               if r["vocab_size"] != cfg.vocab_size else "")
    print(f"exported {args.src} ({r['params'] / 1e6:.2f}M params, {cfg.n_layer} layers, "
          f"{cfg.n_head} heads, {cfg.n_embd} dims, block {cfg.block_size}) as {r['dtype']} to "
          f"{r['dest']}/: {', '.join(r['files'])}{cropped}")
    print(f"load it with: transformers.GPT2LMHeadModel.from_pretrained({str(r['dest'])!r})")
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
