"""`gpt2np prepare`: tokenize a corpus (files or a Hugging Face dataset) into token shards."""
from __future__ import annotations

import argparse
import math

from gpt2np.cli import ArgumentParser, UsageError, positive_int, run_main
from gpt2np.data.prepare import prepare

# ----------------------------------------------------------------------- command line


def token_count(text: str) -> int:
    """A whole number of tokens > 0, written 100000000, 100_000_000 or 1e8."""
    try:
        value = int(text)
    except ValueError:
        try:
            f = float(text)
        except ValueError:
            f = math.nan
        value = int(f) if math.isfinite(f) and f == int(f) else 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a whole number of tokens > 0 (e.g. "
                                         f"100000000 or 1e8), got {text!r}")
    return value


token_count.__name__ = "token count"


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(
        prog="gpt2np prepare",
        description="Tokenize text files, or a Hugging Face dataset, into uint16 GPT-2 token "
                    "shards (shard 0 = val).")
    source = ap.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", "-i", nargs="+",
                        help="text files (.txt: one document per file or per --doc-sep; "
                             ".jsonl: one document per line)")
    source.add_argument("--dataset", metavar="NAME", help=(
        "a Hugging Face dataset, streamed (HuggingFaceFW/fineweb-edu), or a datasets builder "
        "for local --data-files (json, parquet, csv, text); needs pip install datasets"))
    ap.add_argument("--dataset-config", metavar="CFG", help="the dataset's config (sample-10BT)")
    ap.add_argument("--split", default=None, help="the dataset's split (default: train)")
    ap.add_argument("--data-files", nargs="+", metavar="F",
                    help="the dataset's files (local files for a builder, or paths in the repo)")
    ap.add_argument("--out-dir", "-o", required=True, help="directory for the shards")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace the shards (and meta.json) already in --out-dir")
    ap.add_argument("--shard-size", type=token_count, default=10 ** 8,
                    help="tokens per shard (default 1e8)")
    ap.add_argument("--val-shard-size", type=token_count, default=None,
                    help="tokens in shard 0, the val split (default: --shard-size)")
    ap.add_argument("--workers", type=positive_int, default=None,
                    help="tokenizer processes (default: half the CPU cores)")
    ap.add_argument("--format", choices=("npy", "bin"), default="npy",
                    help="npy (numpy) or bin (llm.c's header + uint16) (default %(default)s)")
    ap.add_argument("--prefix", default="shard",
                    help="shard file name prefix (default %(default)s)")
    ap.add_argument("--doc-sep", default=None,
                    help="split plain-text files into documents at this string")
    ap.add_argument("--text-field", default="text",
                    help="the text field of .jsonl records and --dataset records "
                         "(default %(default)s)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    return ap


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    documents, source = _dataset(args)
    meta = prepare(args.input or [], args.out_dir, shard_size=args.shard_size,
                   val_shard_size=args.val_shard_size, workers=args.workers, fmt=args.format,
                   prefix=args.prefix, doc_sep=args.doc_sep, text_field=args.text_field,
                   progress=not args.no_progress, overwrite=args.overwrite, documents=documents,
                   info=None if source is None else {"source": source})  # where they came from
    print(f"{meta['documents']} documents, {meta['tokens']:,} tokens in "
          f"{len(meta['shards'])} shards -> {args.out_dir}")
    return 0


def _dataset(args):
    """--dataset's documents (gpt2np.data.hf_datasets, streamed) and its description, or (None, None)."""
    if args.dataset is None:
        if args.data_files or args.dataset_config or args.split:
            raise UsageError("--data-files, --dataset-config and --split go with --dataset")
        return None, None
    from gpt2np.data import hf_datasets

    split = args.split or "train"
    docs = hf_datasets.dataset_documents(args.dataset, args.dataset_config, split,
                                         args.data_files, args.text_field)
    return docs, hf_datasets.describe(args.dataset, args.dataset_config, split,
                                      args.data_files, args.text_field)


def main(argv=None) -> int:
    return run_main(_main, argv)
