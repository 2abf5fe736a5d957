"""A training run's settings: what one invocation asks for, and what the run then is.

TrainConfig   one invocation: every flag of `gpt2np train`, None meaning "not given" for the
              run settings (a fresh run takes DEFAULTS, a resumed run the checkpoint's).
RunSettings   the run itself, resolved once by `resolve` and checked there: frozen, stored
              in every checkpoint (`state["run"]`, a plain dict of the same keys) and
              inherited by a resumed run unless a flag overrides it.

check_invocation, check_device, check_init_shape: the other checks of flags that make no
sense (together, or with this machine, or with --init-from's weights), all TrainError.

Adding a flag: a field on TrainConfig, a line in gpt2np.train.loop.build_parser, and (when it
changes what a run *is*, so a resume must inherit it) a key in DEFAULTS and a field on
RunSettings. May touch: nothing but its arguments (no files, no arrays).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields

from gpt2np.config import GPT2_VOCAB_SIZE
from gpt2np.errors import UsageError

# Settings that define a run. Chosen so the NumPy backend trains on a 2-core CPU in under
# 10 minutes: measured 7 min 44 s to val loss 5.19 (torch: 5.20). lr 2e-3 beat 1e-3 and
# 4e-3 on val loss at step 60 of this model.
DEFAULTS = dict(
    backend="numpy", dtype="float32", precision="fp32",
    n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=GPT2_VOCAB_SIZE, batch_size=16,
    total_batch_size=None,
    max_steps=600, lr=2e-3, min_lr=None, warmup_steps=30, weight_decay=0.1, grad_clip=1.0,
    eval_interval=100, eval_batches=None, random_batches=False, seed=0, init_from=None,
    data_shards=None,
)
# Changing these on resume would change what the checkpointed state means: refuse.
MUST_MATCH = ("dtype", "n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size",
              "total_batch_size", "random_batches", "seed", "init_from")


class TrainError(UsageError, RuntimeError):
    """A run that cannot start or go on as asked; the message says why and what to do (on the
    command line: one `error:` line, exit 2, as for a bad flag)."""


@dataclass
class TrainConfig:
    # run settings (None: default, or the checkpoint's when resuming)
    backend: str | None = None
    dtype: str | None = None
    precision: str | None = None  # of the matmuls: fp32, tf32 or bf16 (numpy/cupy engines)
    n_layer: int | None = None
    n_head: int | None = None
    n_embd: int | None = None
    block_size: int | None = None
    vocab_size: int | None = None  # >= 50257; 50304 (a multiple of 128) is faster on a GPU
    batch_size: int | None = None
    total_batch_size: int | None = None  # tokens per optimizer step (None: one micro-batch)
    max_steps: int | None = None
    lr: float | None = None
    min_lr: float | None = None  # None: lr / 10
    warmup_steps: int | None = None
    weight_decay: float | None = None
    grad_clip: float | None = None
    eval_interval: int | None = None
    eval_batches: int | None = None  # val batches of total_batch_size tokens, all ranks together
    random_batches: bool | None = None
    seed: int | None = None
    init_from: str | None = None
    data_shards: str | None = None  # a gpt2np.data.prepare shard folder instead of tiny Shakespeare
    # this invocation only
    data: str | None = None  # tiny Shakespeare's file (else found: see gpt2np.data.shakespeare)
    hellaswag: str | None = None  # a HellaSwag val jsonl: acc / acc_norm at every eval
    diagnostics: int = 0  # every N steps: gradient/activation diagnostics (gpt2np.train.diagnostics)
    device: str = "cpu"  # the torch engine's device: "cpu" or "cuda" (numpy/cupy imply theirs)
    dist_backend: str | None = None  # torch.distributed backend override: "gloo" or "nccl"
    cache_dir: str | None = None
    out_dir: str = "out/shakespeare"
    resume: bool = False
    overwrite: bool = False
    stop_after: int | None = None  # stop (and checkpoint) after this many steps of this run
    save_interval: int | None = None  # None: at every eval
    num_samples: int = 3
    sample_tokens: int = 80
    progress: bool = True
    # data parallel: taken from torchrun's environment (RANK, WORLD_SIZE), not from flags;
    # only rank 0 logs and checkpoints
    rank: int = 0
    world_size: int = 1


@dataclass(frozen=True)
class RunSettings:
    """The resolved run settings (DEFAULTS' keys), checked; `settings["lr"]` reads too."""

    backend: str
    dtype: str
    precision: str
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int
    batch_size: int
    total_batch_size: int  # tokens per optimizer step, all ranks together
    max_steps: int
    lr: float
    min_lr: float
    warmup_steps: int
    weight_decay: float
    grad_clip: float
    eval_interval: int
    eval_batches: int | None  # global batches (total_batch_size tokens each); None: see
    #                           gpt2np.train.evaluators.val_batches
    random_batches: bool
    seed: int
    init_from: str | None
    data_shards: str | None  # the shard folder (absolute), or None: tiny Shakespeare

    def __getitem__(self, key):  # read access as the plain dict it is stored as
        return getattr(self, key)

    def to_dict(self) -> dict:
        """What a checkpoint stores as state["run"]."""
        return asdict(self)

    def grad_accum(self, world_size: int) -> int:
        """Micro-steps per optimizer step on each rank."""
        return self.total_batch_size // (self.batch_size * self.block_size * world_size)


def resolve(cfg: TrainConfig, stored: dict | None) -> RunSettings:
    """The run's settings: explicit flags, else the checkpoint's, else DEFAULTS."""
    run = {}
    for key, default in DEFAULTS.items():
        given = getattr(cfg, key)
        if given is not None:
            run[key] = given
        elif key == "data_shards" and cfg.data is not None:
            run[key] = None  # --data given on resume: tiny Shakespeare, not the stored shards
        elif stored is not None and key in stored:
            run[key] = stored[key]
        else:
            run[key] = default
    if stored is not None:
        clash = [f"{k}: checkpoint {stored.get(k)!r}, now {run[k]!r}"
                 for k in MUST_MATCH if getattr(cfg, k) is not None and run[k] != stored.get(k)]
        if clash:
            raise TrainError("the checkpoint does not match this run's settings ("
                             + "; ".join(clash) + "). Drop those flags to continue the "
                             "checkpointed run, or start a new one with another --out-dir or "
                             "--overwrite")
    _check(run)
    tokens_per_micro = run["batch_size"] * run["block_size"] * cfg.world_size
    if run["total_batch_size"] is None:
        run["total_batch_size"] = tokens_per_micro
    if run["total_batch_size"] % tokens_per_micro:
        raise TrainError(f"--total-batch-size {run['total_batch_size']} must be a multiple of "
                         f"batch_size * block_size * world_size = {tokens_per_micro}")
    if run["min_lr"] is None:
        run["min_lr"] = run["lr"] / 10
    if run["data_shards"] is not None:  # stored so that a resume finds it from anywhere
        run["data_shards"] = os.path.abspath(run["data_shards"])
    return RunSettings(**{f.name: run[f.name] for f in fields(RunSettings)})


def _check(run: dict):
    if run["backend"] not in ("numpy", "cupy", "torch"):
        raise TrainError(f"--backend must be numpy, cupy or torch, got {run['backend']!r}")
    if run["dtype"] not in ("float32", "float64"):
        raise TrainError(f"--dtype must be float32 or float64, got {run['dtype']!r}")
    if run["vocab_size"] < GPT2_VOCAB_SIZE:
        raise TrainError(f"--vocab-size {run['vocab_size']} is smaller than GPT-2's {GPT2_VOCAB_SIZE} "
                         "tokens; pad it up (50304 is a multiple of 128), never down")
    if run["precision"] not in ("fp32", "tf32", "bf16"):
        raise TrainError(f"--precision must be fp32, tf32 or bf16, got {run['precision']!r}")
    if run["precision"] != "fp32" and run["dtype"] != "float32":
        raise TrainError(f"--precision {run['precision']} rounds float32 matmul operands: it "
                         f"needs --dtype float32, not {run['dtype']}")
    if run["precision"] != "fp32" and run["backend"] == "torch":
        raise TrainError("--precision applies to the numpy and cupy engines; the torch "
                         "reference trains with full float32 or float64 matmuls")
    _in_range(run, POSITIVE, NON_NEGATIVE)


# the ranges the command line enforces (gpt2np.cli types), checked again here for callers
# of train() that build a TrainConfig themselves
POSITIVE = ("max_steps", "eval_interval", "batch_size", "block_size", "n_layer", "n_head",
            "n_embd", "total_batch_size", "eval_batches", "stop_after", "save_interval")
NON_NEGATIVE = ("lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "seed",
                "num_samples", "sample_tokens")


def _in_range(values: dict, positive, non_negative):
    for key, value in values.items():
        if value is None or isinstance(value, (bool, str)) or key not in positive + non_negative:
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, float) and not math.isfinite(value):
            raise TrainError(f"{flag} must be a finite number, got {value}")
        if key in positive and value <= 0:
            raise TrainError(f"{flag} must be positive, got {value}")
        if key in non_negative and value < 0:
            raise TrainError(f"{flag} must be >= 0, got {value}")


def check_invocation(cfg: TrainConfig):
    """The flags of this invocation only (not stored in the checkpoint)."""
    _in_range({k: getattr(cfg, k) for k in ("stop_after", "save_interval", "num_samples",
                                              "sample_tokens")}, POSITIVE, NON_NEGATIVE)
    if cfg.resume and cfg.overwrite:
        raise TrainError("--resume continues the run in --out-dir and --overwrite starts it "
                         "afresh: pass one of them")


def check_device(cfg: TrainConfig, run: RunSettings):
    """--device: the torch engine's, and a GPU that torch can see."""
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise TrainError(f"--device must be cpu or cuda, got {cfg.device!r}")
    if cfg.device != "cpu" and run.backend != "torch":
        raise TrainError("--device is for --backend torch (numpy runs on the CPU, cupy on the GPU)")
    if cfg.device != "cpu":
        import torch

        if not torch.cuda.is_available():
            raise TrainError(f"--device {cfg.device}: this torch sees no CUDA GPU (torch "
                             f"{torch.__version__}, torch.cuda.is_available() is False); use "
                             "--device cpu, or a CUDA build of torch on a machine with a GPU")


def check_init_shape(cfg: TrainConfig, model_cfg):
    """--init-from brings its own shape: explicit shape flags must agree with it."""
    clash = [f"--{k.replace('_', '-')} {getattr(cfg, k)} (the weights have "
             f"{getattr(model_cfg, k)})" for k in ("n_layer", "n_head", "n_embd")
             if getattr(cfg, k) is not None and getattr(cfg, k) != getattr(model_cfg, k)]
    if clash:
        raise TrainError(f"--init-from {cfg.init_from} fixes the model's shape; it disagrees with "
                         + ", ".join(clash) + ": drop those flags")
