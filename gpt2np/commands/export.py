"""`gpt2np export SRC DEST`: write any model source as a folder transformers loads, or as
llm.c's files (--format llmc)."""
from __future__ import annotations


from gpt2np.cli import ArgumentParser, UsageError, run_main
from gpt2np.config import GPT2_VOCAB_SIZE
from gpt2np.io.export import DTYPES, FORMATS, LLMC_DTYPES, LLMC_TOKENIZER_NAME, export

# ------------------------------------------------------------------------------ the command


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="gpt2np export", description=(
        "Write a model as a folder transformers.GPT2LMHeadModel.from_pretrained loads "
        "(model.safetensors, config.json, generation_config.json, GPT-2's tokenizer files), "
        f"or with --format llmc as llm.c's model file and {LLMC_TOKENIZER_NAME}."))
    a = ap.add_argument
    a("src", metavar="SRC", help="a training run's out-dir or its ckpt.safetensors, a folder with "
      "model.safetensors + config.json, an llm.c model file, or a hub id (gpt2, ...)")
    a("dest", metavar="DEST", help="the folder to write (must not exist, or be empty)")
    a("--format", default="hf", choices=FORMATS, help="hf: a folder transformers loads "
      "(default); llmc: llm.c's model file (gpt2_<N>M.bin, gpt2_<N>M_bf16.bin) and "
      "tokenizer file")
    a("--dtype", default="float32", choices=DTYPES, help="of the saved weights (default "
      f"float32; llmc: {' or '.join(LLMC_DTYPES)})")
    a("--keep-padded-vocab", action="store_true",
      help=f"hf: keep a padded vocabulary's rows past GPT-2's {GPT2_VOCAB_SIZE} tokens "
      "(default: crop them; llmc always keeps them)")
    a("--overwrite", action="store_true", help="replace DEST if it holds an earlier export")
    return ap


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    if not str(args.src).strip() or not str(args.dest).strip():
        raise UsageError("SRC and DEST must not be empty")
    r = export(args.src, args.dest, format=args.format, dtype=args.dtype,
               keep_padded_vocab=args.keep_padded_vocab, overwrite=args.overwrite)
    cfg = r["config"]
    if args.format == "llmc":
        h = r["llmc_header"]
        vocab = f"; vocabulary V={h.vocab_size} in Vp={h.padded_vocab_size} rows, as llm.c pads it"
    elif r["vocab_size"] != cfg.vocab_size:
        vocab = f"; vocabulary cropped from {cfg.vocab_size} to {r['vocab_size']}"
    else:
        vocab = ""
    print(f"exported {args.src} ({r['params'] / 1e6:.2f}M params, {cfg.n_layer} layers, "
          f"{cfg.n_head} heads, {cfg.n_embd} dims, block {cfg.block_size}) as {r['dtype']} to "
          f"{r['dest']}/: {', '.join(r['files'])}{vocab}")
    if args.format == "llmc":
        model = r["dest"] / r["model_file"]
        build = "" if args.dtype == "bfloat16" else " (built with PRECISION=FP32)"
        tokenizer = (f", run where {LLMC_TOKENIZER_NAME} is (llm.c opens it from its working "
                     f"folder)" if LLMC_TOKENIZER_NAME in r["files"] else "")
        print(f"load it in llm.c with: ./train_gpt2cu -e {str(model)!r}{build}{tokenizer}")
    else:
        print(f"load it with: transformers.GPT2LMHeadModel.from_pretrained({str(r['dest'])!r})")
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)
