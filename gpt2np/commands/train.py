"""`gpt2np train`: train GPT-2 on tiny Shakespeare or token shards (gpt2np.train.loop)."""
from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from gpt2np.cli import ArgumentParser, UsageError, nonneg_float, nonneg_int, positive_int, run_main
from gpt2np.data.shakespeare import DataNotFoundError
from gpt2np.io.checkpoint import CheckpointError
from gpt2np.train.loop import train
from gpt2np.train.settings import DEFAULTS, TrainConfig


def build_parser() -> ArgumentParser:
    d = DEFAULTS
    p = ArgumentParser(
        prog="gpt2np train",
        description="Train GPT-2 on tiny Shakespeare with gpt2np (or its PyTorch reference).",
        epilog="Run settings left unset take the defaults shown, or the checkpoint's values "
               "with --resume.")
    a = p.add_argument
    a("--backend", choices=["numpy", "cupy", "torch"], help=f"engine (default {d['backend']})")
    a("--data", help="tiny Shakespeare text (else $GPT2NP_DATA, the cache, a download)")
    a("--data-shards", metavar="DIR",
      help="train on token shards from `python -m gpt2np.data.prepare` (shard 0 = val) instead")
    a("--hellaswag", metavar="PATH", help="also score HellaSwag at every eval (this val jsonl): "
                                          "hellaswag_acc, hellaswag_acc_norm in log.jsonl")
    a("--device", default="cpu", type=_device, help="the torch engine's device: cpu or cuda[:N]")
    a("--dist-backend", choices=["gloo", "nccl"],
      help="torch.distributed backend under torchrun (default: gloo for numpy and torch-CPU, "
           "nccl for cupy and torch-CUDA)")
    a("--cache-dir", help="downloads and token caches (else $GPT2NP_CACHE or ~/.cache/gpt2np)")
    a("--out-dir", default="out/shakespeare", help="log, plot, checkpoint and samples (default out/shakespeare)")
    a("--max-steps", type=positive_int, help=f"optimizer steps (default {d['max_steps']})")
    a("--batch-size", type=positive_int, help=f"sequences per micro-batch (default {d['batch_size']})")
    a("--block-size", type=positive_int, help=f"tokens per sequence (default {d['block_size']})")
    a("--vocab-size", type=positive_int,
      help=f"embedding rows, >= 50257; 50304 pads to a multiple of 128 for GPU speed "
           f"(default {d['vocab_size']})")
    a("--n-layer", type=positive_int, help=f"default {d['n_layer']}")
    a("--n-head", type=positive_int, help=f"default {d['n_head']}")
    a("--n-embd", type=positive_int, help=f"default {d['n_embd']}")
    a("--dtype", choices=["float32", "float64"], help=f"default {d['dtype']}")
    a("--precision", choices=["fp32", "tf32", "bf16"],
      help="of the matmuls (float32 weights and statistics either way; bf16/tf32 run on the "
           f"GPU's tensor cores with cupy, emulated on the CPU) (default {d['precision']})")
    a("--lr", type=nonneg_float, help=f"peak learning rate (default {d['lr']})")
    a("--min-lr", type=nonneg_float, help="final learning rate of the cosine (default lr/10)")
    a("--warmup-steps", type=nonneg_int, help=f"linear warmup steps (default {d['warmup_steps']})")
    a("--weight-decay", type=nonneg_float, help=f"AdamW decay of matrices (default {d['weight_decay']})")
    a("--grad-clip", type=nonneg_float, help=f"max global grad norm, 0 = off (default {d['grad_clip']})")
    a("--total-batch-size", type=positive_int,
      help="tokens per optimizer step over all ranks, a multiple of batch*block*ranks: "
           "gradient accumulation (default one micro-batch per rank)")
    a("--eval-interval", type=positive_int, help=f"steps between val evals (default {d['eval_interval']})")
    a("--eval-batches", type=positive_int,
      help="val batches per eval, all ranks together (default: the val split, at most 16)")
    a("--random-batches", action="store_true", default=None,
      help="random offsets instead of the sequential order")
    a("--seed", type=nonneg_int, help=f"init and data seed (default {d['seed']})")
    a("--init-from", help="start from pretrained weights: a Hugging Face name or folder, or a "
                          "training run's out-dir")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true", help="continue from OUT/ckpt.safetensors")
    again.add_argument("--overwrite", action="store_true",
                       help="start afresh even if OUT has a checkpoint")
    a("--stop-after", type=positive_int, help="stop (with a checkpoint) after N steps of this run")
    a("--save-interval", type=positive_int, help="steps between checkpoints (default: every eval)")
    a("--num-samples", type=nonneg_int, default=3, help="samples printed at the end (default 3)")
    a("--sample-tokens", type=nonneg_int, default=80, help="tokens per sample (default 80)")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    a("--diagnostics", type=nonneg_int, default=0, metavar="N",
      help="every N steps: grad and param norms, update ratios and activation figures in "
           "diagnostics.jsonl and diagnostics.png (default 0: off)")
    return p


def _device(text):
    if text in ("cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")


def _main(argv) -> int:
    args = build_parser().parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)
                         if hasattr(args, f.name)})
    try:
        result = train(cfg)
    except (CheckpointError, DataNotFoundError) as e:
        # the checkpoint or data file that --resume / --data named: a usage error (exit 2)
        raise UsageError(str(e)) from e
    return 1 if result.status == "diverged" else 0


def main(argv=None) -> int:
    """`gpt2np train` / `python -m gpt2np.train.loop`: exit 0 done or stopped, 1 diverged or a
    failure, 2 a bad command line (flags, settings, --resume's checkpoint, --data)."""
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
