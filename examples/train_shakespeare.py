#!/usr/bin/env python
"""Train GPT-2 on tiny Shakespeare with gpt2np's hand-written backward.

    python examples/train_shakespeare.py                  # the defaults: a small model, on the CPU
    python examples/train_shakespeare.py --backend torch  # the same run with PyTorch autograd
    python examples/train_shakespeare.py --help

Data parallel (gloo on CPUs, NCCL on GPUs; see docs/distributed.md):

    torchrun --standalone --nproc_per_node=2 examples/train_shakespeare.py --backend numpy
    torchrun --standalone --nproc_per_node=8 examples/train_shakespeare.py --backend cupy
    torchrun --standalone --nproc_per_node=8 examples/train_shakespeare.py --backend torch --device cuda

The same command is `gpt2np train`. See gpt2np.train.loop for the loop (and its parts in
gpt2np/train/), gpt2np.train.settings for every flag, and docs/training.md for what the
defaults reach.
"""
import os
import sys

# run from a checkout without installing: put the repository root on the path
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gpt2np.commands.train import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
