"""Training engines: one small interface over gpt2np's model and over the PyTorch oracle.

  ArrayEngine   gpt2np.GPT on numpy or cupy (hand-written backward) + gpt2np.AdamW
  TorchEngine   gpt2np.backends.torch_reference.TorchGPT (autograd) + torch.optim.AdamW, to compare

What the training loop calls, in the order of a step:
  zero_grad()                       forget the previous step's gradient
  forward_backward(x, y, scale)     one micro-step: loss of (x, y), grads += scale * dloss;
                                    returns the loss (a float)
  sync_grads()                      average the accumulated gradient over the ranks (once)
  clip_and_step(max_norm, lr)       clip to the global norm max_norm (0: off), then the
                                    AdamW step; returns the norm before clipping
  loss(x, y)                        the model's mean cross-entropy of (x, y), a float
  last_logits(idx)                  host float64 (B, V) logits of the last position (sampling)
  state(), load_state(m, v, t)      (params, m, v, t) for a checkpoint, and back
  distribute(ctx)                   join the data-parallel ranks (gpt2np.distributed)

What evaluators use to score text (gpt2np.train.evaluators; none of these keeps a gradient):
  logits(idx)   idx (B, T) int numpy -> logits (B, T, V) where the engine computes them:
                a numpy or cupy array (ArrayEngine), a torch tensor (TorchEngine). Reduce
                them there and bring the few numbers home (gpt2np.evals.hellaswag.token_losses
                takes all three kinds): (B, T, V) logits are big to copy off a GPU.
  backend       the array backend that reads logits()' arrays (gpt2np.backends), or None for
                torch tensors (TorchEngine)
  config        the model's GPTConfig (vocab_size, block_size, ...)
  on_gpu        whether logits() computes on a GPU (to size the batches)
  continuation_losses(prefixes, endings)
                endings scored after their shared prefix without logits, each item one
                packed row (gpt2np.evals.shared_prefix): (sums, counts) host arrays
                (ArrayEngine); None where the engine has no such path (TorchEngine)

For evaluators and step probes, every engine also has
  params        name -> array, names as model.params (TorchEngine: host numpy copies)
  grads         name -> array, the accumulated gradient (after sync_grads: all-reduced;
                TorchEngine: host numpy copies)
  forward_hook  None, or f(engine) called after each micro-step's forward and before its
                backward (ArrayEngine: engine.model.observer sees the forward's activations;
                TorchEngine: f may register torch hooks on engine.model itself)
  last_micro    set by the loop: whether this micro-step is the step's last (DDP syncs then)

May touch: the model, its optimizer and gradient buffers; never files or data loaders.
"""
from __future__ import annotations

import os

import numpy as np

from gpt2np import distributed
from gpt2np import layers as L
from gpt2np.config import GPTConfig
from gpt2np.evals import shared_prefix
from gpt2np.io.checkpoint import CheckpointError
from gpt2np.io.pretrained import from_pretrained
from gpt2np.model import GPT, init_params
from gpt2np.optim import AdamW, clip_grad_norm, global_grad_norm
from gpt2np.train.settings import RunSettings, TrainError

BETAS, EPS = (0.9, 0.95), 1e-8


class ArrayEngine:
    """gpt2np.GPT on numpy or cupy with gpt2np.AdamW; grads accumulate in a
    gpt2np.distributed.GradBucket (the model may reuse its gradient arrays from one backward
    to the next): views into one flat buffer, which data parallelism all-reduces with a
    single collective."""

    forward_hook = None
    last_micro = True

    def __init__(self, model, lr, weight_decay):
        self.model = model
        self.backend = model.backend
        self.config: GPTConfig = model.config
        self.on_gpu = self.backend.name == "cupy"
        self.xp = model.xp
        self.opt = AdamW(model.params, lr=lr, betas=BETAS, eps=EPS, weight_decay=weight_decay)
        self.bucket = distributed.GradBucket(model.params)
        self.grads = self.bucket.grads  # name -> view into bucket.flat
        self.ctx = distributed.DistContext()

    @property
    def params(self) -> dict:
        return self.model.params

    def distribute(self, ctx):
        """Join the ranks: start from rank 0's params (they are equal already, from the seed or
        the checkpoint; this makes sure)."""
        self.ctx = ctx
        ctx.broadcast_params_(self.model.params)

    @classmethod
    def create(cls, backend, model_cfg, params, dtype, lr, weight_decay, precision="fp32"):
        return cls(GPT(model_cfg, backend=backend, dtype=dtype, precision=precision,
                       params=params), lr, weight_decay)

    def zero_grad(self):
        self.bucket.zero()

    def forward_backward(self, x, y, scale):
        _, loss = self.model.forward(self.backend.asarray(x), self.backend.asarray(y))
        if self.forward_hook is not None:
            self.forward_hook(self)
        self.bucket.add(self.model.backward(), scale)
        return float(loss)

    def sync_grads(self):
        """After the last micro-step: average the accumulated gradient over the ranks, with
        one collective over the flat bucket (nothing to do in a single process)."""
        self.bucket.all_reduce_mean(self.ctx)

    def clip_and_step(self, max_norm, lr):
        norm = clip_grad_norm(self.grads, max_norm) if max_norm > 0 else global_grad_norm(self.grads)
        self.opt.step(self.grads, lr=lr)
        return norm

    def logits(self, idx):
        # forward without targets: no activations kept for a backward, a fresh array
        logits, _ = self.model.forward(self.backend.asarray(idx))
        return logits

    def continuation_losses(self, prefixes, endings):
        return shared_prefix.continuation_losses(self.model, prefixes, endings)

    def loss(self, x, y):
        # the model's own cross-entropy, on logits that keep no activations (cheaper for evals)
        loss, _ = L.cross_entropy_forward(self.logits(x), self.backend.asarray(y, dtype=np.int64))
        return float(loss)

    def last_logits(self, idx):
        return self.backend.to_host(self.logits(idx)[:, -1, :]).astype(np.float64)

    def state(self):
        to_host = lambda d: {k: np.array(self.backend.to_host(a)) for k, a in d.items()}  # noqa: E731
        return self.model.state_dict(), to_host(self.opt.m), to_host(self.opt.v), self.opt.t

    def load_state(self, m, v, t):
        self.opt.load_state_dict({"m": m, "v": v, "t": t})


class TorchEngine:
    """The PyTorch reference model with torch.optim.AdamW (same decay groups), for comparison."""

    forward_hook = None
    continuation_losses = None  # HellaSwag scores through logits()

    def __init__(self, model_cfg, params, dtype, lr, weight_decay, device="cpu"):
        import torch

        from gpt2np.backends.torch_reference import TorchGPT

        self.torch = torch
        self.backend = None  # no array backend: logits() are torch tensors
        self.device = torch.device(device)
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
        self.model = TorchGPT.from_params(model_cfg, params, dtype=self.dtype, device=self.device)
        self.config: GPTConfig = model_cfg
        self.on_gpu = self.device.type == "cuda"
        self.ddp = self.model  # DistributedDataParallel around it once distribute() runs
        self.last_micro = True  # DDP all-reduces in the backward of the last micro-step only
        self.named = dict(self.model.named_parameters())
        decay = [p for p in self.named.values() if p.dim() >= 2]  # as gpt2np.AdamW.decays
        no_decay = [p for p in self.named.values() if p.dim() < 2]
        # foreach=False: the per-tensor loop whose arithmetic gpt2np.AdamW mirrors
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=lr, betas=BETAS, eps=EPS, foreach=False)

    @property
    def params(self) -> dict:
        return self.model.export_params()  # host copies

    @property
    def grads(self) -> dict:
        return {k: p.grad.detach().cpu().numpy().copy() for k, p in self.named.items()
                if p.grad is not None}

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
            if self.forward_hook is not None:
                self.forward_hook(self)
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

    def logits(self, idx):
        with self.torch.no_grad():
            return self.model(self._t(idx))[0]

    def loss(self, x, y):
        with self.torch.no_grad():
            return self.model(self._t(x), self._t(y))[1].item()

    def last_logits(self, idx):
        return self.logits(idx)[:, -1, :].double().cpu().numpy()

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


# ------------------------------------------------------------------ building one for a run


def initial_model(run: RunSettings, ckpt):
    """Where the weights come from: (GPTConfig, host params or None, a pretrained GPT or None).
    A checkpoint, else pretrained weights (--init-from), else GPT-2's init from the seed."""
    if ckpt:
        try:
            model_cfg = GPTConfig.from_dict(ckpt.state["model_config"])
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"the checkpoint's model config is unusable: {e}") from e
        got = next(iter(ckpt.params.values())).dtype.name
        if got != run.dtype:
            raise CheckpointError(f"checkpoint params are {got}, the run is {run.dtype}")
        return model_cfg, ckpt.params, None
    if run.init_from:
        model = _from_pretrained(run.init_from, run)
        if model.config.vocab_size != run.vocab_size:
            raise TrainError(f"--init-from {run.init_from} has a vocabulary of "
                             f"{model.config.vocab_size}, not --vocab-size {run.vocab_size}")
        return model.config, None, model
    # rows past 50257 are padding (as llm.c, nanoGPT's 50304): no token ever has those ids,
    # so the softmax only learns to give them no mass
    model_cfg = GPTConfig(block_size=run.block_size, vocab_size=run.vocab_size,
                          n_layer=run.n_layer, n_head=run.n_head, n_embd=run.n_embd)
    return model_cfg, init_params(model_cfg, run.seed, run.dtype), None


def _from_pretrained(name, run: RunSettings):
    backend = "numpy" if run.backend == "torch" else run.backend
    return from_pretrained(name, backend=backend, dtype=run.dtype)


def make_engine(run: RunSettings, model_cfg, params, pretrained_model, device="cpu"):
    """The engine for run.backend, holding `params` (or the pretrained model's)."""
    if run.backend == "torch":
        _set_torch_threads()
        if pretrained_model is not None:
            params = pretrained_model.state_dict()
        return TorchEngine(model_cfg, params, run.dtype, run.lr, run.weight_decay, device=device)
    if pretrained_model is not None:
        pretrained_model.precision = run.precision
        return ArrayEngine(pretrained_model, run.lr, run.weight_decay)
    try:
        return ArrayEngine.create(run.backend, model_cfg, params, run.dtype, run.lr,
                                  run.weight_decay, run.precision)
    except RuntimeError as e:  # get_backend("cupy") without CuPy or a GPU: an install hint
        raise TrainError(f"--backend {run.backend}: {e}") from e
