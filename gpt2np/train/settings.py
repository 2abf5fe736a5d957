"""A training run's settings, each declared once in SETTINGS; everything else is derived.

A Setting says what a flag of `gpt2np train` is: its name (the flag is --name-with-dashes),
type, default, range or choices, help, whether it is *stored* (a run setting: saved in every
checkpoint as state["run"] and inherited by a resumed run) or belongs to one invocation,
and whether a resume refuses a different value (must_match). From SETTINGS come:

  TrainConfig   one invocation, every setting a field: None on a stored setting means "not
                given" (a fresh run takes the default, a resumed run the checkpoint's)
  RunSettings   the run itself, resolved once by `resolve`: frozen, its to_dict() is what
                a checkpoint stores as state["run"]
  DEFAULTS, MUST_MATCH   the stored settings' defaults; those a resume must keep
  check_config  every given value against its declaration (type, range, choices), with
                the flag's name in the message; the other checks (settings that contradict
                each other, this machine, --init-from's weights) are below it
  the command line: gpt2np.commands.train builds its parser from SETTINGS (this package
                knows nothing of argparse)

Adding a flag: one Setting in SETTINGS (stored=True when it changes what a run *is*, so a
resume must inherit it; must_match=True when a resumed run may not change it), then its use:
`run.<name>` (stored) or `cfg.<name>` (this invocation) where it matters, for instance one line
in gpt2np.train.evaluators.build_evaluators or build_probes. Nothing else lists the flags.

May touch: nothing but its arguments (no files, no arrays).
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, make_dataclass

from gpt2np.config import GPT2_VOCAB_SIZE
from gpt2np.errors import UsageError


class TrainError(UsageError, RuntimeError):
    """A run that cannot start or go on as asked; the message says why and what to do (on the
    command line: one `error:` line, exit 2, as for a bad flag)."""


@dataclass(frozen=True)
class Setting:
    name: str  # a TrainConfig field; the flag is "--" + name with dashes
    type: type  # int, float, str or bool (a bool is a switch)
    default: object  # a fresh run's value; None: unset, see default_text
    help: str
    stored: bool = False  # a run setting: in state["run"], inherited by a resumed run
    must_match: bool = False  # a resume refuses another value (it would change the state's meaning)
    low: float | None = None  # the smallest value allowed
    above_low: bool = False  # ... and low itself is not allowed
    choices: tuple = ()
    accepts: object = None  # a predicate for values no range or choice list describes
    expect: str = ""  # what `accepts` wants, for the message
    hint: str = ""  # added to a range error: what to do instead
    default_text: str = ""  # the help's default when it is not the plain value
    metavar: str | None = None

    @property
    def flag(self) -> str:
        return flag(self.name)

    def check(self, value):
        """A TrainError naming the flag when `value` is not one this setting takes."""
        if self.type is bool:
            ok = isinstance(value, bool)
        elif self.type is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        else:
            ok = isinstance(value, self.type) and not isinstance(value, bool)
        if not ok:
            raise TrainError(f"{self.flag} must be {_KINDS[self.type]}, got {value!r}")
        if self.type is float and not math.isfinite(value):
            raise TrainError(f"{self.flag} must be a finite number, got {value}")
        if self.choices and value not in self.choices:
            raise TrainError(f"{self.flag} must be {_one_of(self.choices)}, got {value!r}")
        if self.accepts is not None and not self.accepts(value):
            raise TrainError(f"{self.flag} must be {self.expect}, got {value!r}")
        if self.low is not None and (value < self.low or (self.above_low and value == self.low)):
            bound = ("positive" if self.low == 0 and self.above_low
                     else f"> {self.low}" if self.above_low else f">= {self.low}")
            hint = f": {self.hint}" if self.hint else ""
            raise TrainError(f"{self.flag} must be {bound}, got {value}{hint}")


_KINDS = {int: "an integer", float: "a number", str: "a string", bool: "True or False"}


def flag(name: str) -> str:
    """The command-line flag of a setting: lr -> --lr, n_layer -> --n-layer."""
    return "--" + name.replace("_", "-")


def _one_of(choices) -> str:
    return ", ".join(map(str, choices[:-1])) + f" or {choices[-1]}"


def _is_device(text: str) -> bool:
    return text in ("cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit())


POSITIVE = dict(low=0, above_low=True)
NON_NEGATIVE = dict(low=0)


def _stored(name, type_, default, help, **kw) -> Setting:
    return Setting(name, type_, default, help, stored=True, **kw)


# Stored settings (what a run is) first, then this invocation's. The defaults train a small
# model on tiny Shakespeare with the NumPy engine on a CPU in minutes; lr 2e-3 gave that model
# a lower val loss than 1e-3 or 4e-3.
SETTINGS = (
    # the engine
    _stored("backend", str, "numpy", "engine", choices=("numpy", "cupy", "torch")),
    _stored("dtype", str, "float32", "of the params and activations", must_match=True,
         choices=("float32", "float64")),
    _stored("precision", str, "fp32", "of the matmuls (float32 weights and statistics either "
         "way; bf16/tf32 run on the GPU's tensor cores with cupy, emulated on the CPU)",
         choices=("fp32", "tf32", "bf16")),
    # the model
    _stored("n_layer", int, 4, "transformer blocks", must_match=True, **POSITIVE),
    _stored("n_head", int, 4, "attention heads", must_match=True, **POSITIVE),
    _stored("n_embd", int, 128, "embedding width", must_match=True, **POSITIVE),
    _stored("block_size", int, 64, "tokens per sequence", must_match=True, **POSITIVE),
    _stored("vocab_size", int, GPT2_VOCAB_SIZE, "embedding rows; 50304 pads GPT-2's 50257 tokens "
         "to a multiple of 128 for GPU speed", must_match=True, low=GPT2_VOCAB_SIZE,
         hint=f"GPT-2 has {GPT2_VOCAB_SIZE} tokens; pad the vocabulary up (50304 is a "
              "multiple of 128), never down"),
    # the batches
    _stored("batch_size", int, 16, "sequences per micro-batch", must_match=True, **POSITIVE),
    _stored("total_batch_size", int, None, "tokens per optimizer step over all ranks, a multiple "
         "of batch*block*ranks: gradient accumulation", must_match=True,
         default_text="one micro-batch per rank", **POSITIVE),
    _stored("random_batches", bool, False, "random offsets instead of the sequential order",
         must_match=True),
    _stored("seed", int, 0, "init and data seed", must_match=True, **NON_NEGATIVE),
    # the optimization
    _stored("max_steps", int, 600, "optimizer steps", **POSITIVE),
    _stored("lr", float, 2e-3, "peak learning rate", **NON_NEGATIVE),
    _stored("min_lr", float, None, "final learning rate of the cosine", default_text="lr/10",
         **NON_NEGATIVE),
    _stored("warmup_steps", int, 30, "linear warmup steps", **NON_NEGATIVE),
    _stored("weight_decay", float, 0.1, "AdamW decay of matrices", **NON_NEGATIVE),
    _stored("grad_clip", float, 1.0, "max global grad norm, 0 = off", **NON_NEGATIVE),
    # evaluations
    _stored("eval_interval", int, 100, "steps between val evals", **POSITIVE),
    _stored("eval_batches", int, None, "val batches per eval (of --total-batch-size tokens), all "
         "ranks together", default_text="the val split, at most 16 micro-batches", **POSITIVE),
    # where the weights and the data come from
    _stored("init_from", str, None, "start from pretrained weights: a Hugging Face name or "
         "folder, a training run's out-dir, or an llm.c model file", must_match=True,
         default_text="GPT-2's random init"),
    _stored("data_shards", str, None, "train on token shards from `gpt2np prepare` (shard 0 = "
         "val) instead", default_text="tiny Shakespeare", metavar="DIR"),
    # this invocation only
    Setting("data", str, None, "tiny Shakespeare text",
            default_text="$GPT2NP_DATA, the cache, a download", metavar="PATH"),
    Setting("cache_dir", str, None, "downloads and token caches",
            default_text="$GPT2NP_CACHE or ~/.cache/gpt2np", metavar="DIR"),
    Setting("out_dir", str, "out/shakespeare", "log, plot, checkpoint and samples",
            metavar="DIR"),
    Setting("resume", bool, False, "continue from OUT_DIR/ckpt.safetensors"),
    Setting("overwrite", bool, False, "start afresh even if OUT_DIR has a checkpoint"),
    Setting("stop_after", int, None, "stop (with a checkpoint) after N steps of this run",
            default_text="run to --max-steps", metavar="N", **POSITIVE),
    Setting("save_interval", int, None, "steps between checkpoints",
            default_text="every eval", **POSITIVE),
    Setting("hellaswag", str, None, "also score HellaSwag at every eval (this val jsonl): "
            "hellaswag_acc, hellaswag_acc_norm in log.jsonl", default_text="off",
            metavar="PATH"),
    Setting("diagnostics", int, 0, "every N steps: grad and param norms, update ratios and "
            "activation figures in diagnostics.jsonl and diagnostics.png",
            default_text="0: off", metavar="N", **NON_NEGATIVE),
    Setting("device", str, "cpu", "the torch engine's device (numpy runs on the CPU, cupy "
            "on the GPU)", accepts=_is_device, expect="cpu, cuda or cuda:N"),
    Setting("dist_backend", str, None, "torch.distributed backend under torchrun",
            choices=("gloo", "nccl"),
            default_text="gloo for numpy and torch-CPU, nccl for cupy and torch-CUDA"),
    Setting("num_samples", int, 3, "samples printed at the end", **NON_NEGATIVE),
    Setting("sample_tokens", int, 80, "tokens per sample", **NON_NEGATIVE),
    Setting("progress", bool, True, "the progress bar"),  # the flag is --no-progress
)
BY_NAME = {s.name: s for s in SETTINGS}
DEFAULTS = {s.name: s.default for s in SETTINGS if s.stored}
MUST_MATCH = tuple(s.name for s in SETTINGS if s.must_match)


class _Run:
    """The resolved run settings (DEFAULTS' keys), checked; `settings["lr"]` reads too."""

    def __getitem__(self, key):  # read access as the plain dict it is stored as
        return getattr(self, key)

    def to_dict(self) -> dict:
        """What a checkpoint stores as state["run"]."""
        return asdict(self)

    def grad_accum(self, world_size: int) -> int:
        """Micro-steps per optimizer step on each rank."""
        return self.total_batch_size // (self.batch_size * self.block_size * world_size)


def _derive_classes():
    # TrainConfig: None on a stored setting is "not given"; data parallel's rank and
    # world_size come from torchrun's environment (RANK, WORLD_SIZE), never from flags
    config = [(s.name, s.type | None, field(default=None if s.stored else s.default))
              for s in SETTINGS]
    config += [("rank", int, field(default=0)), ("world_size", int, field(default=1))]
    run = [(s.name, s.type if s.default is not None else s.type | None)
           for s in SETTINGS if s.stored]
    classes = (make_dataclass("TrainConfig", config),
               make_dataclass("RunSettings", run, bases=(_Run,), frozen=True))
    for cls in classes:
        cls.__module__ = __name__
    return classes


TrainConfig, RunSettings = _derive_classes()
TrainConfig.__doc__ = "One invocation of `gpt2np train`: a field per Setting (see SETTINGS)."
RunSettings.__doc__ = _Run.__doc__


# ------------------------------------------------------------------ resolving and checking


def check_config(cfg: TrainConfig):
    """Every value cfg gives, against its Setting; and the flags of one invocation that
    contradict each other. Before any work: a bad flag is the first error."""
    for s in SETTINGS:
        value = getattr(cfg, s.name)
        if value is not None:
            s.check(value)
    if cfg.resume and cfg.overwrite:
        raise TrainError("--resume continues the run in --out-dir and --overwrite starts it "
                         "afresh: pass one of them")


def resolve(cfg: TrainConfig, stored: dict | None) -> RunSettings:
    """The run's settings: cfg's (checked by check_config), else the checkpoint's, else
    DEFAULTS; then the defaults that follow from others (min_lr, total_batch_size)."""
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
    _check_together(run)
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
    return RunSettings(**run)


def _check_together(run: dict):
    """Settings that are each fine but contradict one another."""
    if run["precision"] != "fp32" and run["dtype"] != "float32":
        raise TrainError(f"--precision {run['precision']} rounds float32 matmul operands: it "
                         f"needs --dtype float32, not {run['dtype']}")
    if run["precision"] != "fp32" and run["backend"] == "torch":
        raise TrainError("--precision applies to the numpy and cupy engines; the torch "
                         "reference trains with full float32 or float64 matmuls")


def check_device(cfg: TrainConfig, run: RunSettings):
    """--device: the torch engine's, and a GPU that torch can see."""
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
    clash = [f"{flag(k)} {getattr(cfg, k)} (the weights have {getattr(model_cfg, k)})"
             for k in ("n_layer", "n_head", "n_embd")
             if getattr(cfg, k) is not None and getattr(cfg, k) != getattr(model_cfg, k)]
    if clash:
        raise TrainError(f"--init-from {cfg.init_from} fixes the model's shape; it disagrees with "
                         + ", ".join(clash) + ": drop those flags")
