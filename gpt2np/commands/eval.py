"""`gpt2np eval`: HellaSwag accuracy, or the loss on a text or shards, of any model source."""
from __future__ import annotations

import json
from pathlib import Path

from gpt2np import files
from gpt2np.cli import ArgumentParser, UsageError, positive_int, run_main
from gpt2np.evals.loss import BACKENDS, TASKS, load_eval_tokens, token_loss

# ------------------------------------------------------------------------------ the command


def load_model(name, backend: str = "numpy", dtype: str = "float32", device: str | None = None):
    """A model to evaluate: a gpt2np.GPT (numpy/cupy), or for backend "torch" the torch
    reference holding the same weights (on `device`, default cuda when there is one)."""
    from gpt2np import from_pretrained

    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend != "torch":
        return from_pretrained(name, backend=backend, dtype=dtype)
    import torch

    from gpt2np.backends.torch_reference import TorchGPT

    host = from_pretrained(name, backend="numpy", dtype=dtype)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    module = TorchGPT.from_params(host.config, host.state_dict(), dtype=getattr(torch, dtype),
                                  device=device)
    return module.eval()


def check_json_output(path, data, model) -> Path:
    """--json, checked before any work: a file in a folder that exists, and not one of the
    inputs (--data, HellaSwag's cached file, a local --model) nor a file in an input folder
    other than an earlier result."""
    inputs = [("--data", data if data is not None else hellaswag_cache_file()),
              ("--model", model)]
    return files.check_output(path, "--json", inputs, earlier_output=_is_result)


def hellaswag_cache_file() -> Path:
    from gpt2np.evals.hellaswag import CACHE_FOLDER, VAL_FILE

    return files.cache_dir() / CACHE_FOLDER / VAL_FILE


def _is_result(path: Path) -> bool:
    """Whether `path` holds a result this command wrote (a small JSON object with its keys)."""
    try:
        if path.is_symlink() or path.stat().st_size > 1 << 16:
            return False
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and {"task", "model"} <= set(record)


def build_parser() -> ArgumentParser:
    ap = ArgumentParser(prog="gpt2np eval", description=(
        "Evaluate a model: HellaSwag acc / acc_norm (completion style, as build-nanogpt), or "
        "the mean cross-entropy and perplexity of a text file or a shard folder's val split."))
    ap.add_argument("--model", required=True,
                    help="anything gpt2np.from_pretrained takes: gpt2, a folder, a training run, "
                         "an llm.c model file")
    ap.add_argument("--task", required=True, choices=TASKS)
    ap.add_argument("--data", default=None, help=(
        "hellaswag: the val jsonl (default: in gpt2np's cache, $GPT2NP_CACHE or "
        "~/.cache/gpt2np, else downloaded there); "
        "loss: a text file, a shard file, or a shard folder (its val split) - required"))
    ap.add_argument("--limit", type=positive_int, default=None, metavar="N",
                    help="only the first N items (hellaswag) or windows (loss) (default: all)")
    ap.add_argument("--backend", choices=BACKENDS, default="numpy", help="(default %(default)s)")
    ap.add_argument("--device", default=None, help="torch backend: cpu or cuda (default: cuda "
                                                  "when available)")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32",
                    help="of the model (default %(default)s)")
    ap.add_argument("--json", default=None, metavar="OUT", help="also write the result as JSON")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    return ap


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.task == "loss" and args.data is None:
        raise UsageError("--task loss needs --data: a text file, a shard file or a shard folder")
    if args.device is not None and args.backend != "torch":
        raise UsageError("--device is for --backend torch (numpy runs on the CPU, cupy on the GPU)")
    if args.json:
        check_json_output(args.json, args.data, args.model)  # before any work
    from gpt2np import distributed

    ctx = distributed.init(args.backend, torch_device=args.device)
    try:
        model = load_model(args.model, args.backend, args.dtype, args.device)
        progress = not args.no_progress
        if args.task == "hellaswag":
            from gpt2np.evals.hellaswag import evaluate

            result = evaluate(model, args.data, limit=args.limit, ctx=ctx, progress=progress)
            record = {"task": "hellaswag", "n": result.n, "acc": result.acc,
                      "acc_norm": result.acc_norm, "correct": result.correct,
                      "correct_norm": result.correct_norm, "cut": result.cut}
        else:
            result = token_loss(model, load_eval_tokens(args.data), limit=args.limit, ctx=ctx,
                                progress=progress)
            record = {"task": "loss", "n_tokens": result.n_tokens, "loss": result.loss,
                      "ppl": result.ppl}
        if ctx.is_main:
            print(f"{args.model}: {result}")
            if args.json:
                files.write_json(args.json, {**record, "model": str(args.model)})
    finally:
        ctx.destroy()
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)
