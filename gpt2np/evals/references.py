"""What a GPT-2 (124M) reproduction is compared with: the reference figures and their lines.

  OpenAI GPT-2 124M  HellaSwag acc_norm 0.2955, scored as gpt2np.evals.hellaswag scores it
                     (build-nanogpt's README: 2,967 / 10,042), and val loss 3.2924 on
                     FineWeb-Edu's val shard (build-nanogpt's plot)
  OpenAI GPT-3 124M  HellaSwag acc_norm 0.337 (the GPT-3 paper's table, its "Small" model)

A training run draws them on loss.png when they apply: the HellaSwag lines on the HellaSwag
panel of a GPT-2-sized run (12 layers, 12 heads, 768 dims), the val loss line on the loss
panel when that run trains on FineWeb-Edu shards.
"""
from __future__ import annotations

import os

HELLASWAG_ACC_NORM = {"OpenAI GPT-2 124M": 0.2955, "OpenAI GPT-3 124M": 0.337}
FINEWEB_EDU_VAL_LOSS = {"OpenAI GPT-2 124M": 3.2924}
GPT2_124M_SHAPE = (12, 12, 768)  # n_layer, n_head, n_embd
# names FineWeb-Edu shard folders go by: build-nanogpt's (edu_fineweb10B, edufineweb_*.npy),
# the hub's (fineweb-edu), and what `gpt2np.data.prepare --dataset` records in meta.json
_FINEWEB_EDU_NAMES = ("fineweb-edu", "fineweb_edu", "edu_fineweb", "edufineweb")


def is_gpt2_124m(settings) -> bool:
    """A run (or GPTConfig) of GPT-2 (124M)'s shape, whatever its vocab padding."""
    return (settings.n_layer, settings.n_head, settings.n_embd) == GPT2_124M_SHAPE


def is_fineweb_edu(data_dir) -> bool:
    """Whether a shard folder holds FineWeb-Edu: its meta.json's source dataset (written by
    `gpt2np.data.prepare --dataset`), else its folder or shard names."""
    if not data_dir or not os.path.isdir(data_dir):
        return False
    from gpt2np.data.shards import read_meta

    try:
        meta = read_meta(data_dir) or {}
    except OSError:
        meta = {}
    source = meta.get("source") if isinstance(meta.get("source"), dict) else {}
    names = [str(source.get("dataset", "")), os.path.basename(os.path.abspath(data_dir))]
    names += os.listdir(data_dir)[:5]
    return any(key in name.lower() for name in names for key in _FINEWEB_EDU_NAMES)


class LossReference:
    """An evaluator that measures nothing and brings the FineWeb-Edu val loss line onto
    loss.png's loss panel (a run_outputs.Panel overlay)."""

    def __init__(self, lines: dict = FINEWEB_EDU_VAL_LOSS):
        from gpt2np.train.outputs import Panel

        self.lines = lines
        self.panels = [Panel(("val_loss",), self.draw, overlay=True)]

    def evaluate(self, step, engine) -> dict:
        return {}

    def draw(self, ax, records):
        for name, value in self.lines.items():
            ax.axhline(value, color="tab:red", lw=1, ls="--",
                       label=f"{name} val loss on FineWeb-Edu ({value})")
        ax.legend()


def training_evaluators(cfg, run, ctx) -> list:
    """The evaluators a training run adds for its reference lines and HellaSwag (in
    gpt2np.train.evaluators.build_evaluators)."""
    from gpt2np.evals.hellaswag import HellaSwagEvaluator

    extra = []
    if cfg.hellaswag:
        lines = HELLASWAG_ACC_NORM if is_gpt2_124m(run) else {}
        on_gpu = run.backend == "cupy" or cfg.device != "cpu"  # (cfg.device: the torch engine's)
        extra.append(HellaSwagEvaluator(cfg.hellaswag, run.block_size, ctx, references=lines,
                                        on_gpu=on_gpu, vocab_size=run.vocab_size))
    shards = getattr(run, "data_shards", None) or cfg.data_shards  # (a resumed run's too)
    if is_gpt2_124m(run) and is_fineweb_edu(shards):
        extra.append(LossReference())
    return extra
