"""`gpt2np gradcheck`: check a model's hand-written gradients on real text."""
from __future__ import annotations

import sys
import time

from gpt2np import files
from gpt2np.cli import ArgumentParser, UsageError, nonneg_int, positive_int, run_main
from gpt2np.evals.gradcheck import (DEFAULT_B, DEFAULT_T, GradcheckResult, batch_from_shards,
                                    batch_from_text, check_gradients)


def format_table(r: GradcheckResult) -> str:
    width = max(len(k) for k in r.tensors)
    head = (f"{'tensor':<{width}}  {'shape':>13}  {'rel err vs torch':>16}  {'fd err':>9}"
            f"  {'fd tol':>9}")
    lines = [head, "-" * len(head)]
    bad = set(r.failures())
    for name, err in r.tensors.items():
        shape = "x".join(map(str, r.shapes[name]))
        fd = "-" if name not in r.fd else f"{r.fd[name]:9.2e}  {r.fd_tol[name]:9.2e}"
        lines.append(f"{name:<{width}}  {shape:>13}  {err:16.2e}  {fd:>20}"
                     f"{'  FAIL' if name in bad else ''}")
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="gpt2np gradcheck", description=__doc__.split("\n\n")[0],
                       epilog="Exit status 1 if any tensor is over tolerance (named on stderr).")
    a = p.add_argument
    a("--model", required=True, help="a Hugging Face name or folder, a training run, or an "
      "llm.c model file")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", metavar="FILE",
                     help="a text file (default: tiny Shakespeare: $GPT2NP_DATA, cache, download)")
    src.add_argument("--data-shards", metavar="DIR", help="token shards from gpt2np prepare")
    a("-B", "--batch-size", type=positive_int, default=DEFAULT_B,
      help=f"sequences in the batch (default {DEFAULT_B})")
    a("-T", "--block-size", type=positive_int,
      help=f"tokens per sequence (default {DEFAULT_T}, or the model's block size if smaller)")
    a("--fd", type=nonneg_int, default=1, metavar="K",
      help="finite-difference entries per tensor, 0 = none; each costs four forwards "
           "(default 1)")
    a("--seed", type=nonneg_int, default=0, help="which entries --fd samples (default 0)")
    a("--json", metavar="OUT", help="also write the errors as JSON to OUT")
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.json:  # before any work: a file that can be written and is no input
        inputs = (("--model", args.model), ("--text", args.text), ("--data-shards", args.data_shards))
        files.check_output(args.json, "--json", [(flag, p) for flag, p in inputs if p])
    from gpt2np import from_pretrained

    t_start = time.perf_counter()
    model = from_pretrained(args.model, dtype="float64")
    T = args.block_size or min(DEFAULT_T, model.config.block_size)
    if T > model.config.block_size:
        raise UsageError(f"-T {T} is longer than the model's block size {model.config.block_size}")
    if args.data_shards:
        x, y = batch_from_shards(args.data_shards, args.batch_size, T)
    else:
        from gpt2np.data.shakespeare import find_data

        x, y = batch_from_text(find_data(args.text, flag="--text"), args.batch_size, T)
    n = model.num_params()
    print(f"{args.model}: {n / 1e6:.1f}M params, {len(model.params)} tensors; batch "
          f"B={args.batch_size} T={T}; float64; --fd {args.fd} entries per tensor "
          f"({4 * args.fd * len(model.params)} forwards)", flush=True)
    r = check_gradients(model, x, y, fd=args.fd, seed=args.seed)
    r.seconds["total"] = time.perf_counter() - t_start
    print(format_table(r))
    fd_text = "" if r.worst_fd_ratio is None else \
        f", worst fd err / its tolerance {r.worst_fd_ratio:.2g} (<= 1 passes)"
    print(f"loss {r.loss:.6f} (torch {r.torch_loss:.6f}); worst rel err vs torch "
          f"{r.worst_rel_err:.2e} (tolerance {r.tolerance:.0e}){fd_text}; "
          + ", ".join(f"{k} {v:.1f}s" for k, v in r.seconds.items()))
    if args.json:
        files.write_json(args.json, r.to_json())
    bad = r.failures()
    if bad:
        print(f"error: {len(bad)} tensor(s) over tolerance: {', '.join(bad[:10])}"
              f"{' ...' if len(bad) > 10 else ''}", file=sys.stderr)
        return 1
    print("gradients OK")
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)
