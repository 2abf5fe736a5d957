"""The training loop: tiny Shakespeare, AdamW, cosine LR, gradient accumulation, checkpoints.

python examples/train_shakespeare.py --help    (or python -m gpt2np.train)

One loop drives three engines with the same data order and the same initial params:
  numpy / cupy   gpt2np.GPT (hand-written backward) + gpt2np.AdamW
  torch          backends.torch_backend.TorchGPT (autograd) + torch.optim.AdamW, to compare

A run writes to --out-dir: log.jsonl (one JSON object per optimizer step), loss.png,
ckpt.safetensors (see gpt2np.checkpoint) and samples.txt. --resume continues from
ckpt.safetensors and ends bit-identical to a run that was never interrupted: the
checkpoint holds the params, AdamW's moments and step count, the data position and RNG,
and the run's settings (which a resumed run inherits unless a flag overrides them).

Data parallel: launched by torchrun (`torchrun --nproc_per_node=N
examples/train_shakespeare.py ...`), every rank reads its own slice of the data (rank r at
offset B*T*r, striding B*T*N), accumulates its micro-steps' gradients locally and averages
them over the ranks once, on the last micro-step (gpt2np.distributed: one flat-bucket
all-reduce over torch.distributed, gloo on CPUs and NCCL on GPUs; DistributedDataParallel
for the torch engine). --total-batch-size counts the tokens of all ranks. The logged
losses are the ranks' means; rank 0 alone prints, logs, plots, samples and checkpoints.
--data-shards DIR trains on token shards written by `python -m gpt2np.prepare` instead of
tiny Shakespeare.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np

from . import distributed
from .checkpoint import Checkpoint, CheckpointError, load_checkpoint, save_checkpoint
from .config import GPTConfig
from .data import BatchLoader, DataNotFoundError, find_data, load_tokens, split
from .model import init_params, param_shapes
from .optim import AdamW, clip_grad_norm, cosine_lr
from .shards import ShardLoader

CKPT_NAME = "ckpt.safetensors"
LOG_NAME = "log.jsonl"
BETAS, EPS = (0.9, 0.95), 1e-8

# Settings that define a run. None in a TrainConfig means "not given": a fresh run takes
# DEFAULTS, a resumed run takes the checkpoint's value. Chosen so the NumPy backend trains
# on a 2-core CPU in under 10 minutes: measured 7 min 44 s to val loss 5.19 (torch: 5.20).
# lr 2e-3 beat 1e-3 and 4e-3 on val loss at step 60 of this model.
DEFAULTS = dict(
    backend="numpy", dtype="float32", precision="fp32",
    n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=50257, batch_size=16,
    total_batch_size=None,
    max_steps=600, lr=2e-3, min_lr=None, warmup_steps=30, weight_decay=0.1, grad_clip=1.0,
    eval_interval=100, eval_batches=None, random_batches=False, seed=0, init_from=None,
)
# Changing these on resume would change what the checkpointed state means: refuse.
MUST_MATCH = ("dtype", "n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size",
              "total_batch_size", "random_batches", "seed", "init_from")


class TrainError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to do."""


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
    eval_batches: int | None = None  # None: as many as fit in the val split (at most 16)
    random_batches: bool | None = None
    seed: int | None = None
    init_from: str | None = None
    # this invocation only
    data: str | None = None
    data_shards: str | None = None  # a gpt2np.prepare shard folder instead of tiny Shakespeare
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


@dataclass
class TrainResult:
    status: str  # "done", "stopped" (--stop-after or a signal) or "diverged"
    step: int  # optimizer steps completed
    val_loss: float | None  # the last evaluated validation loss
    records: list  # this run's log records, earlier runs' included when resumed
    wall_s: float
    samples: list


# ------------------------------------------------------------------------------- engines


class ArrayEngine:
    """gpt2np.GPT on numpy or cupy with gpt2np.AdamW; grads accumulate in our own buffers
    (the model may reuse its gradient arrays from one backward to the next): views into one
    flat bucket, which data parallelism all-reduces with a single collective."""

    def __init__(self, model, lr, weight_decay):
        self.model = model
        self.backend = model.backend
        self.xp = model.xp
        self.opt = AdamW(model.params, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay)
        self.bucket = distributed.GradBucket(model.params)
        self.grads = self.bucket.grads  # name -> view into bucket.flat
        self._fresh = True
        self.ctx = distributed.DistContext()

    def distribute(self, ctx):
        """Join the ranks: start from rank 0's params (they are equal already, from the seed or
        the checkpoint; this makes sure)."""
        self.ctx = ctx
        ctx.broadcast_params_(self.model.params)

    @classmethod
    def create(cls, backend, model_cfg, params, dtype, lr, weight_decay, precision="fp32"):
        from .model import GPT

        return cls(GPT(model_cfg, backend=backend, dtype=dtype, precision=precision,
                       params=params), lr, weight_decay)

    def zero_grad(self):
        self._fresh = True

    def forward_backward(self, x, y, scale):
        _, loss = self.model.forward(self.backend.asarray(x), self.backend.asarray(y))
        grads = self.model.backward()
        for k, g in grads.items():
            if self._fresh:
                self.xp.multiply(g, scale, out=self.grads[k])
            else:
                self.grads[k] += g * scale
        self._fresh = False
        return float(loss)

    def sync_grads(self):
        """After the last micro-step: average the accumulated gradient over the ranks, with
        one collective over the flat bucket (nothing to do in a single process)."""
        self.bucket.all_reduce_mean(self.ctx)

    def clip_and_step(self, max_norm, lr):
        norm = clip_grad_norm(self.grads, max_norm) if max_norm > 0 else _norm(self.grads)
        self.opt.step(self.grads, lr=lr)
        return norm

    def loss(self, x, y):
        # forward without targets keeps no activations for a backward: cheaper for evals
        logits, _ = self.model.forward(self.backend.asarray(x))
        xp, V = self.xp, logits.shape[-1]
        logits = logits.reshape(-1, V)
        y = self.backend.asarray(y).reshape(-1)
        top = logits.max(axis=-1)
        lse = xp.log(xp.exp(logits - top[:, None]).sum(axis=-1)) + top
        return float((lse - logits[xp.arange(y.shape[0]), y]).mean())

    def last_logits(self, idx):
        logits, _ = self.model.forward(self.backend.asarray(idx))
        return self.backend.to_host(logits[:, -1, :]).astype(np.float64)

    def state(self):
        to_host = lambda d: {k: np.array(self.backend.to_host(a)) for k, a in d.items()}  # noqa: E731
        return self.model.state_dict(), to_host(self.opt.m), to_host(self.opt.v), self.opt.t

    def load_state(self, m, v, t):
        self.opt.load_state_dict({"m": m, "v": v, "t": t})


def _norm(grads):
    from .optim import global_grad_norm

    return global_grad_norm(grads)


class TorchEngine:
    """The PyTorch reference model with torch.optim.AdamW (same decay groups), for comparison."""

    def __init__(self, model_cfg, params, dtype, lr, weight_decay, device="cpu"):
        import torch

        from backends.torch_backend import TorchGPT

        self.torch = torch
        self.device = torch.device(device)
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
        self.model = TorchGPT.from_params(model_cfg, params, dtype=self.dtype, device=self.device)
        self.ddp = self.model  # DistributedDataParallel around it once distribute() runs
        self.last_micro = True  # DDP all-reduces in the backward of the last micro-step only
        self.named = dict(self.model.named_parameters())
        decay = [p for p in self.named.values() if p.dim() >= 2]  # as gpt2np.AdamW.decays
        no_decay = [p for p in self.named.values() if p.dim() < 2]
        # foreach=False: the per-tensor loop whose arithmetic gpt2np.AdamW mirrors
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=lr, betas=BETAS, eps=EPS, foreach=False)

    def distribute(self, ctx):
        """torch's own data parallelism: DDP (it broadcasts rank 0's params on creation)."""
        self.ddp = distributed.wrap_ddp(self.model, ctx)

    def _t(self, a):
        return self.torch.from_numpy(a).to(self.device)

    def zero_grad(self):
        self.opt.zero_grad(set_to_none=True)

    def forward_backward(self, x, y, scale):
        # DDP all-reduces during the backward; no_sync on all but the last micro-step
        with distributed.no_sync_unless(self.ddp, self.last_micro):
            _, loss = self.ddp(self._t(x), self._t(y))
            (loss * scale).backward()  # .grad accumulates over micro-steps
        return loss.item()

    def sync_grads(self):
        pass  # DDP averaged the gradients during the last micro-step's backward

    def clip_and_step(self, max_norm, lr):
        params = list(self.named.values())
        if max_norm > 0:
            norm = self.torch.nn.utils.clip_grad_norm_(params, max_norm).item()
        else:
            norm = self.torch.linalg.vector_norm(
                self.torch.stack([p.grad.norm() for p in params])).item()
        for group in self.opt.param_groups:
            group["lr"] = lr
        self.opt.step()
        return norm

    def loss(self, x, y):
        with self.torch.no_grad():
            return self.model(self._t(x), self._t(y))[1].item()

    def last_logits(self, idx):
        with self.torch.no_grad():
            logits, _ = self.model(self._t(idx))
        return logits[:, -1, :].double().cpu().numpy()

    def state(self):
        m, v, t = {}, {}, 0
        for k, p in self.named.items():
            s = self.opt.state.get(p, {})
            if s:
                m[k], v[k] = s["exp_avg"].cpu().numpy().copy(), s["exp_avg_sq"].cpu().numpy().copy()
                t = int(s["step"].item())
            else:
                m[k] = v[k] = np.zeros(tuple(p.shape), dtype=str(p.dtype).split(".")[-1])
        return self.model.export_params(), m, v, t

    def load_state(self, m, v, t):
        if t == 0:
            return
        for k, p in self.named.items():
            self.opt.state[p] = {
                "step": self.torch.tensor(float(t), dtype=self.torch.float32),
                "exp_avg": self._t(np.array(m[k])).to(self.dtype),
                "exp_avg_sq": self._t(np.array(v[k])).to(self.dtype)}


def _set_torch_threads():
    import torch

    if "OMP_NUM_THREADS" not in os.environ:  # match numpy's BLAS: every core we may use
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        torch.set_num_threads(max(1, cores or 1))


# ------------------------------------------------------------------------------- settings


def resolve(cfg: TrainConfig, stored: dict | None) -> dict:
    """The run's settings: explicit flags, else the checkpoint's, else DEFAULTS."""
    run = {}
    for key, default in DEFAULTS.items():
        given = getattr(cfg, key)
        if given is not None:
            run[key] = given
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
    if run["backend"] not in ("numpy", "cupy", "torch"):
        raise TrainError(f"--backend must be numpy, cupy or torch, got {run['backend']!r}")
    if run["dtype"] not in ("float32", "float64"):
        raise TrainError(f"--dtype must be float32 or float64, got {run['dtype']!r}")
    if run["vocab_size"] < 50257:
        raise TrainError(f"--vocab-size {run['vocab_size']} is smaller than GPT-2's 50257 "
                         "tokens; pad it up (50304 is a multiple of 128), never down")
    if run["precision"] not in ("fp32", "tf32", "bf16"):
        raise TrainError(f"--precision must be fp32, tf32 or bf16, got {run['precision']!r}")
    if run["precision"] != "fp32" and run["dtype"] != "float32":
        raise TrainError(f"--precision {run['precision']} rounds float32 matmul operands: it "
                         f"needs --dtype float32, not {run['dtype']}")
    if run["precision"] != "fp32" and run["backend"] == "torch":
        raise TrainError("--precision applies to the numpy and cupy engines; the torch "
                         "reference trains with full float32 or float64 matmuls")
    tokens_per_micro = run["batch_size"] * run["block_size"] * cfg.world_size
    if run["total_batch_size"] is None:
        run["total_batch_size"] = tokens_per_micro
    if run["total_batch_size"] % tokens_per_micro:
        raise TrainError(f"--total-batch-size {run['total_batch_size']} must be a multiple of "
                         f"batch_size * block_size * world_size = {tokens_per_micro}")
    if run["min_lr"] is None:
        run["min_lr"] = run["lr"] / 10
    for key in ("max_steps", "eval_interval", "batch_size", "block_size"):
        if run[key] <= 0:
            raise TrainError(f"--{key.replace('_', '-')} must be positive, got {run[key]}")
    return run


# ------------------------------------------------------------------------------- the loop


class _StopFlag:
    """SIGINT/SIGTERM ask the loop to stop after the current step (and checkpoint); a second
    signal falls through to the default handler, so a stuck run can still be killed."""

    def __init__(self):
        self.signal = None
        self._old = {}

    def _handler(self, signum, frame):
        self.signal = signal.Signals(signum).name
        for s, h in self._old.items():
            signal.signal(s, h)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)
        self._old = {}


def _log(msg, master=True):
    if master:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stdout)


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) a training run; under torchrun, this rank's part of a data-parallel run."""
    if distributed.launched_by_torchrun():
        cfg = replace(cfg, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    elif cfg.world_size != 1 or cfg.rank != 0:
        raise TrainError(f"rank {cfg.rank} of world_size {cfg.world_size} without torchrun: "
                         "data-parallel runs are started by torchrun, which sets RANK and WORLD_SIZE")
    held = {}  # the process group, once joined, left in any case
    try:
        return _train(cfg, held)
    finally:
        if "ctx" in held:
            held["ctx"].destroy()


def _train(cfg: TrainConfig, held: dict) -> TrainResult:
    t_start = time.perf_counter()
    master = cfg.rank == 0  # the one process that prints, logs and checkpoints
    out = Path(cfg.out_dir)
    ckpt_path, log_path = out / CKPT_NAME, out / LOG_NAME

    ckpt = None
    if cfg.resume:
        if not ckpt_path.exists():
            raise TrainError(f"--resume: no checkpoint {ckpt_path} to resume from")
        ckpt = load_checkpoint(ckpt_path)
        if "run" not in ckpt.state or "step" not in ckpt.state:
            raise CheckpointError(f"checkpoint {ckpt_path} lacks the training state "
                                  "(was it written by gpt2np.train?)")
    elif ckpt_path.exists() and not cfg.overwrite:  # every rank refuses, not only rank 0
        raise TrainError(f"{ckpt_path} already exists: pass --resume to continue that run, "
                         "--overwrite to start again, or choose another --out-dir")
    run = resolve(cfg, ckpt.state["run"] if ckpt else None)
    if cfg.device not in ("cpu", "cuda") and not cfg.device.startswith("cuda:"):
        raise TrainError(f"--device must be cpu or cuda, got {cfg.device!r}")
    if cfg.device != "cpu" and run["backend"] != "torch":
        raise TrainError("--device is for --backend torch (numpy runs on the CPU, cupy on the GPU)")

    # data parallel: join the process group (a no-op single process without torchrun)
    try:
        ctx = held["ctx"] = distributed.init(run["backend"], torch_device=cfg.device,
                                             backend=cfg.dist_backend)
    except (RuntimeError, ValueError) as e:
        raise TrainError(f"cannot start data-parallel training: {e}") from e
    if ctx.device.startswith("cuda") and run["backend"] == "torch":
        cfg = replace(cfg, device=ctx.device)  # this rank's GPU (LOCAL_RANK)

    B, T, W = run["batch_size"], run["block_size"], cfg.world_size
    grad_accum = run["total_batch_size"] // (B * T * W)
    if cfg.data_shards:
        # token shards (python -m gpt2np.prepare): shard 0 is val, the rest train
        if run["random_batches"]:
            raise TrainError("--random-batches is for tiny Shakespeare; shards are read in order")
        try:
            train_loader = ShardLoader(cfg.data_shards, B, T, cfg.rank, W, "train")
            val_loader = ShardLoader(cfg.data_shards, B, T, cfg.rank, W, "val")
        except FileNotFoundError as e:
            raise TrainError(f"--data-shards: {e}") from e
        except ValueError as e:
            raise TrainError(f"the shards are too small for these batches: {e}") from e
        n_train, n_val = sum(train_loader.lengths), sum(val_loader.lengths)
        source = cfg.data_shards
        data_id = hashlib.sha256(json.dumps(
            [(os.path.basename(p), n) for loader in (val_loader, train_loader)
             for p, n in zip(loader.shards, loader.lengths)]).encode()).hexdigest()[:16]
    else:
        # tiny Shakespeare: one tokenization, cached; 90/10 split
        source = find_data(cfg.data, cache=cfg.cache_dir)
        tokens = load_tokens(source, cache=cfg.cache_dir)
        data_id = hashlib.sha256(tokens.tobytes()).hexdigest()[:16]
        train_tokens, val_tokens = split(tokens)
        n_train, n_val = len(train_tokens), len(val_tokens)
        try:
            train_loader = BatchLoader(train_tokens, B, T, rank=cfg.rank, world_size=W,
                                       random=run["random_batches"], seed=run["seed"])
            val_loader = BatchLoader(val_tokens, B, T, rank=cfg.rank, world_size=W)
        except ValueError as e:
            raise TrainError(f"the data are too small for these batches: {e}") from e
    if ckpt and ckpt.state.get("data_id") != data_id:
        raise TrainError(f"the checkpoint was trained on other data (tokens {ckpt.state.get('data_id')}"
                         f", now {data_id} from {source}); resume with the same "
                         f"{'--data-shards' if cfg.data_shards else '--data'}")
    eval_batches = run["eval_batches"] or max(1, min(16, (n_val - 1) // (B * T * W)))

    # model and optimizer: checkpoint, else pretrained (--init-from), else GPT-2's init
    model_cfg, params, pretrained_model = _initial_model(run, ckpt)
    if pretrained_model is not None:  # record the shape the weights brought, not the flags'
        run.update(n_layer=model_cfg.n_layer, n_head=model_cfg.n_head, n_embd=model_cfg.n_embd)
    if T > model_cfg.block_size:
        raise TrainError(f"--block-size {T} exceeds the model's block size {model_cfg.block_size}")
    engine = _make_engine(run, model_cfg, params, pretrained_model, cfg.device)
    del params, pretrained_model
    step = 0
    if ckpt:
        engine.load_state(ckpt.m, ckpt.v, ckpt.t)
        step = int(ckpt.state["step"])
        train_loader.load_state_dict(_data_state(ckpt.state, train_loader, cfg.rank, W, run, step))
    engine.distribute(ctx)
    last_saved = step if ckpt else None

    records = _read_log(log_path, before=step) if ckpt else []
    if master:
        out.mkdir(parents=True, exist_ok=True)
        _write_log(log_path, records)  # drops steps a crashed run logged after its checkpoint

    def save(at_step):
        nonlocal last_saved
        if last_saved == at_step:
            return
        # every rank's data position (a collective: all ranks come here), rank 0 writes
        data_ranks = ctx.all_gather_object(train_loader.state_dict())
        last_saved = at_step
        if not master:
            return
        p, m, v, t = engine.state()
        state = {"step": at_step, "run": run, "model_config": model_cfg.to_dict(),
                 "data": data_ranks[0], "data_ranks": data_ranks, "world_size": W,
                 "data_id": data_id, "backend": run["backend"]}
        save_checkpoint(ckpt_path, Checkpoint(params=p, m=m, v=v, t=t, state=state))

    def evaluate():
        val_loader.reset()  # the same val batches every time
        # data parallel: each rank evaluates its share; the logged loss is the ranks' mean
        local = sum(engine.loss(*val_loader.next_batch()) for _ in range(eval_batches)) / eval_batches
        return ctx.all_reduce_mean(local)

    if master:
        n_params = sum(int(np.prod(shape)) for shape in param_shapes(model_cfg).values())
        _log(f"{run['backend']} {run['dtype']}"
             + (f" ({run['precision']} matmuls)" if run["precision"] != "fp32" else "")
             + f": {model_cfg.n_layer} layers, {model_cfg.n_head} heads, "
             f"{model_cfg.n_embd} dims, {n_params / 1e6:.2f}M params | {n_train:,} train / "
             f"{n_val:,} val tokens | batch {B}x{T}, {grad_accum} micro-step(s)"
             + (f" x {W} ranks ({ctx.backend})" if W > 1 else "")
             + f", {run['total_batch_size']:,} tokens/step | steps {step} -> {run['max_steps']}")

    from tqdm import tqdm

    status, steps_this_run = "done", 0
    pbar = tqdm(total=run["max_steps"], initial=step, disable=not (master and cfg.progress),
                dynamic_ncols=True, unit="step")
    with _StopFlag() as stop:
        while step < run["max_steps"]:
            t0 = time.perf_counter()
            engine.zero_grad()
            loss = 0.0
            for micro in range(grad_accum):
                x, y = train_loader.next_batch()
                engine.last_micro = micro == grad_accum - 1  # (DDP syncs in its backward)
                micro_loss = engine.forward_backward(x, y, 1.0 / grad_accum)
                if not math.isfinite(micro_loss) and W == 1:
                    return _diverged(cfg, run, step, micro_loss, last_saved, ckpt_path, records,
                                     out, t_start, pbar)
                loss += micro_loss / grad_accum
            engine.sync_grads()  # average the accumulated gradient over the ranks, once
            stopping = bool(stop.signal)
            if W > 1:
                # the logged loss is the ranks' mean; a signal on any rank stops them all at
                # the same step; a non-finite loss on any rank stops all (NaN survives the sum)
                loss, votes = ctx.all_reduce_mean([loss, float(stopping)])
                stopping = votes > 0
                if not math.isfinite(loss):
                    return _diverged(cfg, run, step, loss, last_saved, ckpt_path, records,
                                     out, t_start, pbar)
            lr = cosine_lr(step, run["lr"], run["min_lr"], run["warmup_steps"], run["max_steps"])
            norm = engine.clip_and_step(run["grad_clip"], lr)
            if not math.isfinite(norm):
                return _diverged(cfg, run, step, norm, last_saved, ckpt_path, records, out,
                                 t_start, pbar, what="gradient norm")
            dt = time.perf_counter() - t0
            rec = {"step": step, "train_loss": loss, "lr": lr, "grad_norm": norm,
                   "tokens_per_s": run["total_batch_size"] / dt}
            step += 1
            steps_this_run += 1
            if step % run["eval_interval"] == 0 or step == run["max_steps"]:
                rec["val_loss"] = evaluate()  # of the params after this step's update
                _log(f"step {step:5d} | train loss {loss:.4f} | val loss {rec['val_loss']:.4f}",
                     master)
            records.append(rec)
            if master:
                with open(log_path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
                if "val_loss" in rec:
                    _plot(records, out / "loss.png")  # watchable while it trains
            pbar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                             tok_s=f"{rec['tokens_per_s']:.0f}", refresh=False)
            pbar.update(1)

            if W == 1:
                stopping = bool(stop.signal)  # a signal during this step stops after it
            if stopping or (cfg.stop_after is not None and steps_this_run >= cfg.stop_after):
                if step < run["max_steps"]:
                    status = "stopped"
                    break
            save_every = cfg.save_interval or run["eval_interval"]
            if step % save_every == 0:
                save(step)
    pbar.close()
    save(step)
    if master:
        _plot(records, out / "loss.png")
    val = next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None)
    if status == "stopped":
        why = (f"--stop-after {cfg.stop_after}" if not stopping
               else f"signal {stop.signal}" if stop.signal else "a signal on another rank")
        _log(f"stopped ({why}) after step {step}; checkpoint {ckpt_path}. "
             f"Continue with --resume --out-dir {out}", master)
        return TrainResult("stopped", step, val, records, time.perf_counter() - t_start, [])
    samples = _samples(engine, run, model_cfg, cfg) if master and cfg.num_samples > 0 else []
    if master and samples:
        (out / "samples.txt").write_text("\n\n".join(samples) + "\n")
        for i, s in enumerate(samples):
            _log(f"--- sample {i + 1} ---\n{s}")
    wall = time.perf_counter() - t_start
    val_msg = f"val loss {val:.4f}" if val is not None else "no val loss"
    _log(f"done: {step} steps, {val_msg}, {wall:.0f} s; outputs in {out}/", master)
    return TrainResult("done", step, val, records, wall, samples)


def _diverged(cfg, run, step, value, last_saved, ckpt_path, records, out, t_start, pbar,
              what="loss"):
    pbar.close()
    kept = (f"the last good checkpoint (step {last_saved}) is kept in {ckpt_path}"
            if last_saved is not None else "no checkpoint was written yet")
    msg = (f"non-finite {what} ({value}) at step {step}: training diverged; stopping. {kept}. "
           f"Try a lower --lr (now {run['lr']}) or --grad-clip.")
    if cfg.rank == 0:
        print(msg, file=sys.stderr)
        _plot(records, out / "loss.png")
    val = next((r["val_loss"] for r in reversed(records) if "val_loss" in r), None)
    return TrainResult("diverged", step, val, records, time.perf_counter() - t_start, [])


def _initial_model(run, ckpt):
    """(GPTConfig, host params or None, a pretrained GPT or None)."""
    if ckpt:
        try:
            model_cfg = GPTConfig.from_dict(ckpt.state["model_config"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"the checkpoint's model config is unusable: {e}") from e
        want = {"dtype": run["dtype"]}
        got = {"dtype": next(iter(ckpt.params.values())).dtype.name}
        if want != got:
            raise CheckpointError(f"checkpoint params are {got['dtype']}, the run is {want['dtype']}")
        return model_cfg, ckpt.params, None
    if run["init_from"]:
        model = _from_pretrained(run["init_from"], run)
        if model.config.vocab_size != run["vocab_size"]:
            raise TrainError(f"--init-from {run['init_from']} has a vocabulary of "
                             f"{model.config.vocab_size}, not --vocab-size {run['vocab_size']}")
        return model.config, None, model
    # rows past 50257 are padding (as llm.c, nanoGPT's 50304): no token ever has those ids,
    # so the softmax only learns to give them no mass
    model_cfg = GPTConfig(block_size=run["block_size"], vocab_size=run["vocab_size"],
                          n_layer=run["n_layer"], n_head=run["n_head"], n_embd=run["n_embd"])
    return model_cfg, init_params(model_cfg, run["seed"], run["dtype"]), None


def _from_pretrained(name, run):
    try:
        from .pretrained import from_pretrained
    except ModuleNotFoundError as e:
        if e.name and e.name.endswith("pretrained"):
            raise TrainError("--init-from needs gpt2np.pretrained (Hugging Face loading), which "
                             "this version of gpt2np does not have yet") from e
        raise
    backend = "numpy" if run["backend"] == "torch" else run["backend"]
    return from_pretrained(name, backend=backend, dtype=run["dtype"])


def _data_state(state, loader, rank, world_size, run, step):
    """This rank's data-loader state from a checkpoint: its own when the world size is the
    one saved, else rank 0's moved to this rank's offset (so a run can resume on another
    number of processes)."""
    ranks = state.get("data_ranks")
    if ranks and len(ranks) == world_size:
        return ranks[rank]
    data = dict(state["data"])
    if isinstance(loader, ShardLoader) or rank == 0:
        return data  # ShardLoader states do not depend on the rank
    if run["random_batches"]:  # a fresh stream per rank, not rank 0's again
        data["rng"] = np.random.default_rng([run["seed"], rank, step]).bit_generator.state
    else:
        data["position"] = int(data["position"]) + loader.B * loader.T * rank
    return data


def _make_engine(run, model_cfg, params, pretrained_model, device="cpu"):
    if run["backend"] == "torch":
        _set_torch_threads()
        if pretrained_model is not None:
            params = pretrained_model.state_dict()
        return TorchEngine(model_cfg, params, run["dtype"], run["lr"], run["weight_decay"],
                           device=device)
    if pretrained_model is not None:
        pretrained_model.precision = run["precision"]
        return ArrayEngine(pretrained_model, run["lr"], run["weight_decay"])
    try:
        return ArrayEngine.create(run["backend"], model_cfg, params, run["dtype"], run["lr"],
                                  run["weight_decay"], run["precision"])
    except RuntimeError as e:  # get_backend("cupy") without CuPy or a GPU: an install hint
        raise TrainError(f"--backend {run['backend']}: {e}") from e


# ------------------------------------------------------------------------------- outputs


def _read_log(path: Path, before: int) -> list:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if rec.get("step", before) < before:
            records.append(rec)
    return records


def _write_log(path: Path, records: list):
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, path)


def _plot(records, path: Path):
    if not records:
        return
    # the object API with the Agg canvas: no pyplot, no global backend switch
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([r["step"] + 1 for r in records], [r["train_loss"] for r in records],
            lw=0.8, alpha=0.7, label="train")
    val = [(r["step"] + 1, r["val_loss"]) for r in records if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def _samples(engine, run, model_cfg, cfg, prompt="\n", temperature=1.0, top_k=50):
    """A few continuations of `prompt`, top-k sampled (a fixed seed: the same every time)."""
    from .tokenizer import get_encoding

    enc = get_encoding()
    rng = np.random.default_rng(run["seed"])
    idx = np.array([enc.encode_ordinary(prompt)] * cfg.num_samples, dtype=np.int64)
    ctx = min(run["block_size"], model_cfg.block_size)
    for _ in range(cfg.sample_tokens):
        logits = engine.last_logits(idx[:, -ctx:])[:, :enc.n_vocab] / temperature  # (N, V)
        # (a padded vocabulary's extra rows are no tokens: never sample them)
        kth = np.partition(logits, -top_k, axis=-1)[:, -top_k][:, None]
        logits = np.where(logits < kth, -np.inf, logits)
        probs = np.exp(logits - logits.max(axis=-1, keepdims=True))
        probs /= probs.sum(axis=-1, keepdims=True)
        nxt = [rng.choice(probs.shape[1], p=p) for p in probs]
        idx = np.concatenate([idx, np.array(nxt, dtype=np.int64)[:, None]], axis=1)
    return [enc.decode(row.tolist()).strip() for row in idx]


# ------------------------------------------------------------------------------- the CLI


def build_parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(
        description="Train GPT-2 on tiny Shakespeare with gpt2np (or its PyTorch reference).",
        epilog="Run settings left unset take the defaults shown, or the checkpoint's values "
               "with --resume.")
    a = p.add_argument
    a("--backend", choices=["numpy", "cupy", "torch"], help=f"engine (default {d['backend']})")
    a("--data", help="tiny Shakespeare text (else $GPT2NP_DATA, the cache, a download)")
    a("--data-shards", metavar="DIR",
      help="train on token shards from `python -m gpt2np.prepare` (shard 0 = val) instead")
    a("--device", default="cpu", help="the torch engine's device: cpu or cuda")
    a("--dist-backend", choices=["gloo", "nccl"],
      help="torch.distributed backend under torchrun (default: gloo for numpy and torch-CPU, "
           "nccl for cupy and torch-CUDA)")
    a("--cache-dir", help="downloads and token caches (else $GPT2NP_CACHE or ~/.cache/gpt2np)")
    a("--out-dir", default="out/shakespeare", help="log, plot, checkpoint and samples (default out/shakespeare)")
    a("--max-steps", type=int, help=f"optimizer steps (default {d['max_steps']})")
    a("--batch-size", type=int, help=f"sequences per micro-batch (default {d['batch_size']})")
    a("--block-size", type=int, help=f"tokens per sequence (default {d['block_size']})")
    a("--vocab-size", type=int,
      help=f"embedding rows, >= 50257; 50304 pads to a multiple of 128 for GPU speed "
           f"(default {d['vocab_size']})")
    a("--n-layer", type=int, help=f"default {d['n_layer']}")
    a("--n-head", type=int, help=f"default {d['n_head']}")
    a("--n-embd", type=int, help=f"default {d['n_embd']}")
    a("--dtype", choices=["float32", "float64"], help=f"default {d['dtype']}")
    a("--precision", choices=["fp32", "tf32", "bf16"],
      help="of the matmuls (float32 weights and statistics either way; bf16/tf32 run on the "
           f"GPU's tensor cores with cupy, emulated on the CPU) (default {d['precision']})")
    a("--lr", type=float, help=f"peak learning rate (default {d['lr']})")
    a("--min-lr", type=float, help="final learning rate of the cosine (default lr/10)")
    a("--warmup-steps", type=int, help=f"linear warmup steps (default {d['warmup_steps']})")
    a("--weight-decay", type=float, help=f"AdamW decay of matrices (default {d['weight_decay']})")
    a("--grad-clip", type=float, help=f"max global grad norm, 0 = off (default {d['grad_clip']})")
    a("--total-batch-size", type=int,
      help="tokens per optimizer step over all ranks, a multiple of batch*block*ranks: "
           "gradient accumulation (default one micro-batch per rank)")
    a("--eval-interval", type=int, help=f"steps between val evals (default {d['eval_interval']})")
    a("--eval-batches", type=int, help="val batches per eval (default: the val split, at most 16)")
    a("--random-batches", action="store_true", default=None,
      help="random offsets instead of the sequential order")
    a("--seed", type=int, help=f"init and data seed (default {d['seed']})")
    a("--init-from", help="start from pretrained weights: a Hugging Face name or folder")
    a("--resume", action="store_true", help="continue from OUT/ckpt.safetensors")
    a("--overwrite", action="store_true", help="start afresh even if OUT has a checkpoint")
    a("--stop-after", type=int, help="stop (with a checkpoint) after N steps of this run")
    a("--save-interval", type=int, help="steps between checkpoints (default: every eval)")
    a("--num-samples", type=int, default=3, help="samples printed at the end (default 3)")
    a("--sample-tokens", type=int, default=80, help="tokens per sample (default 80)")
    a("--no-progress", dest="progress", action="store_false", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)
                         if hasattr(args, f.name)})
    try:
        result = train(cfg)
    except (TrainError, CheckpointError, DataNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 1 if result.status == "diverged" else 0


if __name__ == "__main__":
    sys.exit(main())
