"""The training loop: tiny Shakespeare or token shards, AdamW, cosine LR, gradient
accumulation, data parallelism, checkpoints that resume bit-identically.

    gpt2np train --help    (or python examples/train_shakespeare.py --help)

The loop (`_loop`, below) reads as nanoGPT's: per optimizer step, the micro-steps (forward
and backward, gradients accumulated), the all-reduce, the clip and the AdamW step, the log,
the evaluation (every --eval-interval steps and at the end), the checkpoint. Each is a call
into a small part beside this file:

  gpt2np.train.settings    every setting declared once; TrainConfig (one invocation),
                           RunSettings (the resolved run, frozen, stored in checkpoints)
  gpt2np.train.engines     ArrayEngine (gpt2np.GPT on numpy/cupy + gpt2np.AdamW) and
                           TorchEngine (the PyTorch autograd oracle) behind one interface
  gpt2np.train.data        load_data: tiny Shakespeare or shards -> train/val loaders, data_id
  gpt2np.train.evaluators  evaluators (val loss, ...) and step probes, built from the settings
  gpt2np.train.outputs     RunOutputs (log.jsonl, loss.png and its panels, samples.txt, the
                           endings) and Checkpointer (ckpt.safetensors)

Extension points (new features plug in there; this file need not change):
  - an evaluator: `evaluate(step, engine) -> dict` of log fields, run at every eval step
    after the update (data parallel: on every rank); it may bring loss.png panels;
  - a step probe: start_step / before_update (grads all-reduced, before clipping) /
    after_update (after the AdamW step, may add fields to the record); an engine's
    forward_hook sees each micro-step's forward;
  - a flag: see gpt2np.train.settings.
See gpt2np.train.evaluators and gpt2np.train.engines for the exact contracts.

A run writes to --out-dir: log.jsonl (one JSON object per optimizer step), loss.png,
ckpt.safetensors (see gpt2np.io.checkpoint) and samples.txt. --resume continues from
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
Divergence (a non-finite loss, val loss or grad norm) stops the run before anything is saved.
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from gpt2np import distributed
from gpt2np.model import param_shapes
from gpt2np.optim import cosine_lr
from gpt2np.train.data import TrainData, load_data, resume_position
from gpt2np.train.engines import ArrayEngine, TorchEngine, initial_model, make_engine
from gpt2np.train.evaluators import StepProbe, ValLoss, build_evaluators, build_probes
from gpt2np.train.diagnostics import DIAG_NAME, PLOT_NAME
from gpt2np.train.outputs import (RUN_FILES, Checkpointer, RunOutputs, TrainResult, hold_out_dir,
                                  open_checkpoint, sample_texts)
from gpt2np.train.settings import (RunSettings, TrainConfig, TrainError, check_config,
                                   check_device, check_init_shape, resolve)


def train(cfg: TrainConfig) -> TrainResult:
    """Run (or resume) a training run; under torchrun, this rank's part of a data-parallel run."""
    if distributed.launched_by_torchrun():
        cfg = replace(cfg, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
    elif cfg.world_size != 1 or cfg.rank != 0:
        raise TrainError(f"rank {cfg.rank} of world_size {cfg.world_size} without torchrun: "
                         "data-parallel runs are started by torchrun, which sets RANK and WORLD_SIZE")
    held = {}  # the process group and the out-dir's lock, once taken, left in any case
    try:
        run = _setup(cfg, held)
        try:
            run.out.start(run.step, resumed=run.ckpts.last_saved is not None,
                          max_steps=run.settings.max_steps)
            _banner(run)
            return _loop(run)
        except _Diverged as d:  # nothing was saved since the value went non-finite
            return run.diverged(*d.args)
        finally:
            run.out.close()  # the progress bar, before any error line
    finally:
        if "ctx" in held:
            held["ctx"].destroy()
        if "out_dir" in held:
            held["out_dir"].release()


@dataclass
class _Run:
    """Everything the loop uses, built once by _setup."""

    cfg: TrainConfig
    settings: RunSettings
    ctx: distributed.DistContext
    engine: ArrayEngine | TorchEngine
    data: TrainData
    evaluators: list
    probes: list[StepProbe]
    out: RunOutputs
    ckpts: Checkpointer
    model_cfg: object  # GPTConfig
    step: int  # optimizer steps done before this invocation (a resumed run's)
    check: ValLoss  # one val batch: are params about to be saved still finite?

    def diverged(self, step, what, value) -> TrainResult:
        return self.out.diverged(step, what, value, self.ckpts.kept(), self.settings.lr)

    def save(self, step, evaluated: dict):
        """The checkpoint after `step` steps, only of params whose loss is finite (this
        step's val loss, else one val batch): the checkpoint on disk is always a good one."""
        if self.ckpts.last_saved == step:
            return
        loss = evaluated.get("val_loss")
        if loss is None:
            loss = self.check.evaluate(step - 1, self.engine)["val_loss"]
        _finite(loss, "val loss", step - 1)
        self.ckpts.save(step, self.engine, self.data.train)

    def evaluate(self, record) -> dict:
        fields = {}
        for evaluator in self.evaluators:
            fields.update(evaluator.evaluate(record["step"], self.engine))
        record.update(fields)
        return fields


# ------------------------------------------------------------------------------- the loop


def _loop(r: _Run) -> TrainResult:
    cfg, run, engine, ctx, out = r.cfg, r.settings, r.engine, r.ctx, r.out
    accum = run.grad_accum(cfg.world_size)
    step, steps_this_run, evaluated = r.step, 0, {}
    with _StopFlag() as stop:
        while step < run.max_steps:
            t0 = time.perf_counter()
            for probe in r.probes:
                probe.start_step(step, engine)
            engine.zero_grad()
            loss = 0.0
            for micro in range(accum):
                x, y = r.data.train.next_batch()
                engine.last_micro = micro == accum - 1  # (DDP syncs in its backward)
                micro_loss = engine.forward_backward(x, y, 1.0 / accum)  # the micro-step
                if ctx.world_size == 1:  # (ranks stop together, after the mean below)
                    _finite(micro_loss, "loss", step)
                loss += micro_loss / accum
            engine.sync_grads()  # the all-reduce: the accumulated gradient's mean over ranks
            loss, stopping = _agree(ctx, loss, stop)
            _finite(loss, "loss", step)
            for probe in r.probes:
                probe.before_update(step, engine)
            lr = cosine_lr(step, run.lr, run.min_lr, run.warmup_steps, run.max_steps)
            norm = engine.clip_and_step(run.grad_clip, lr)  # clip the global norm, AdamW step
            _finite(norm, "gradient norm", step)
            rec = {"step": step, "train_loss": loss, "lr": lr, "grad_norm": norm,
                   "tokens_per_s": run.total_batch_size / (time.perf_counter() - t0)}
            for probe in r.probes:
                probe.after_update(step, engine, rec)
            step += 1
            steps_this_run += 1
            evaluated = {}
            if step % run.eval_interval == 0 or step == run.max_steps:
                evaluated = r.evaluate(rec)  # the eval, of the params after this update
            out.log_step(rec, evaluated)
            _finite(evaluated.get("val_loss", 0.0), "val loss", rec["step"])

            if ctx.world_size == 1:
                stopping = bool(stop.signal)  # a signal during this step stops after it
            asked = cfg.stop_after is not None and steps_this_run >= cfg.stop_after
            if (stopping or asked) and step < run.max_steps:
                r.save(step, evaluated)
                why = (f"--stop-after {cfg.stop_after}" if not stopping
                       else f"signal {stop.signal}" if stop.signal else "a signal on another rank")
                return out.stopped(step, why)
            if step % (cfg.save_interval or run.eval_interval) == 0:
                r.save(step, evaluated)  # the checkpoint
    r.save(step, evaluated)
    samples = []
    if ctx.is_main and cfg.num_samples > 0:
        samples = sample_texts(engine, min(run.block_size, r.model_cfg.block_size), run.seed,
                               cfg.num_samples, cfg.sample_tokens)
    return out.done(step, samples)


class _Diverged(Exception):
    """(step, what, value): a non-finite loss, val loss or gradient norm."""


def _finite(value, what, step):
    """Divergence stops the run here, before anything is saved."""
    if not math.isfinite(value):
        raise _Diverged(step, what, value)


def _agree(ctx, loss, stop):
    """The ranks' mean loss (a NaN on any rank survives the sum), and whether any rank was
    signalled, so that all stop at the same step: one small collective."""
    stopping = bool(stop.signal)
    if ctx.world_size > 1:
        loss, votes = ctx.all_reduce_mean([loss, float(stopping)])
        stopping = votes > 0
    return loss, stopping


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


# ------------------------------------------------------------------------------- set-up

# every file a run writes in --out-dir (--diagnostics' too, on or off: a fresh run replaces
# an earlier run's whole)
OUT_FILES = (*RUN_FILES, DIAG_NAME, PLOT_NAME)


def _setup(cfg: TrainConfig, held: dict) -> _Run:
    t_start = time.perf_counter()
    check_config(cfg)  # every flag, before any work
    out_dir = Path(cfg.out_dir)
    if cfg.rank == 0:  # the rank that writes holds the out-dir before reading anything there
        held["out_dir"] = hold_out_dir(cfg, out_dir, OUT_FILES)
    ckpt = open_checkpoint(cfg, out_dir, OUT_FILES)
    run = resolve(cfg, ckpt.state["run"] if ckpt else None)
    check_device(cfg, run)
    # data parallel: join the process group (a no-op single process without torchrun)
    try:
        ctx = held["ctx"] = distributed.init(run.backend, torch_device=cfg.device,
                                             backend=cfg.dist_backend)
    except (RuntimeError, ValueError) as e:
        raise TrainError(f"cannot start data-parallel training: {e}") from e
    if ctx.device.startswith("cuda") and run.backend == "torch":
        cfg = replace(cfg, device=ctx.device)  # this rank's GPU (LOCAL_RANK)

    data = load_data(cfg, run)
    if ckpt and ckpt.state.get("data_id") != data.data_id:
        raise TrainError(f"the checkpoint was trained on other data (tokens {ckpt.state.get('data_id')}"
                         f", now {data.data_id} from {data.source}); resume with the same {data.flag}")
    # model and optimizer: checkpoint, else pretrained (--init-from), else GPT-2's init
    model_cfg, params, pretrained = initial_model(run, ckpt)
    if pretrained is not None:  # record the shape the weights brought, not the flags'
        check_init_shape(cfg, model_cfg)
        run = replace(run, n_layer=model_cfg.n_layer, n_head=model_cfg.n_head, n_embd=model_cfg.n_embd)
    if run.block_size > model_cfg.block_size:
        raise TrainError(f"--block-size {run.block_size} exceeds the model's block size "
                         f"{model_cfg.block_size}")
    engine = make_engine(run, model_cfg, params, pretrained, cfg.device)
    del params, pretrained
    step = 0
    if ckpt:
        engine.load_state(ckpt.m, ckpt.v, ckpt.t)
        step = int(ckpt.state["step"])
        data.train.load_state_dict(resume_position(ckpt.state, data.train, cfg.rank,
                                                   cfg.world_size, run, step))
    engine.distribute(ctx)

    evaluators = build_evaluators(cfg, run, data, ctx)
    out = RunOutputs(out_dir, ctx.is_main, cfg.progress,
                     panels=[p for e in evaluators for p in getattr(e, "panels", ())],
                     run_files=OUT_FILES)
    out.t_start = t_start
    ckpts = Checkpointer(out.ckpt_path, ctx, {
        "run": run.to_dict(), "model_config": model_cfg.to_dict(), "world_size": cfg.world_size,
        "data_id": data.data_id, "backend": run.backend}, last_saved=step if ckpt else None)
    return _Run(cfg, run, ctx, engine, data, evaluators, build_probes(cfg, run, ctx), out,
                ckpts, model_cfg, step, ValLoss(data.val, 1, ctx))


def _banner(r: _Run):
    run, W, m = r.settings, r.cfg.world_size, r.model_cfg
    n_params = sum(int(np.prod(shape)) for shape in param_shapes(m).values())
    r.out.say(f"{run.backend} {run.dtype}"
              + (f" ({run.precision} matmuls)" if run.precision != "fp32" else "")
              + f": {m.n_layer} layers, {m.n_head} heads, {m.n_embd} dims, "
              f"{n_params / 1e6:.2f}M params | {r.data.n_train:,} train / {r.data.n_val:,} val "
              f"tokens | batch {run.batch_size}x{run.block_size}, {run.grad_accum(W)} micro-step(s)"
              + (f" x {W} ranks ({r.ctx.backend})" if W > 1 else "")
              + f", {run.total_batch_size:,} tokens/step | steps {r.step} -> {run.max_steps}")
