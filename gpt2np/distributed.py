"""Data-parallel plumbing on torch.distributed: process group, one-bucket gradient all-reduce.

gpt2np does not ship its own communication engine. Collectives are torch.distributed's
(gloo on the CPU, NCCL on NVIDIA GPUs); what lives here is the glue between them and the
NumPy / CuPy arrays the model trains on:

- `init(array_backend)` reads torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
  MASTER_ADDR, MASTER_PORT) and joins the process group; without torchrun it returns a
  single-process context whose collectives are no-ops, so the training loop has one shape.
- `GradBucket` owns ONE contiguous flat buffer and a dict of views into it, one per
  parameter. Micro-step gradients are accumulated into the views (the model's own grads may
  be reused buffers, valid only until its next backward), and the whole bucket is averaged
  across ranks with a single all-reduce over a zero-copy torch view of the buffer:
  `torch.from_numpy` for NumPy, DLPack (`torch.from_dlpack`) for CuPy. One collective per
  optimizer step, on the last micro-step only, rather than one per tensor per micro-step.

Typical loop (gradient accumulation over `accum` micro-steps):

    ctx = distributed.init("numpy")
    bucket = GradBucket(model.params)
    for step in ...:
        bucket.zero()
        for micro in range(accum):
            _, loss = model.forward(x, y)
            bucket.add(model.backward(), scale=1 / accum)
        bucket.all_reduce_mean(ctx)          # the one collective of the step
        clip_grad_norm(bucket.grads, 1.0)
        opt.step(bucket.grads, lr=lr)
        loss_mean = ctx.all_reduce_mean(loss_accum)
    ctx.destroy()
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

from gpt2np.backends import backend_of

# torchrun exports these for every worker it starts
_TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched_by_torchrun(env=None) -> bool:
    """True when this process was started by torchrun (or anything that sets its variables)."""
    env = os.environ if env is None else env
    return all(v in env for v in _TORCHRUN_VARS)


def collective_backend_for(array_backend: str, torch_device: str | None = None) -> str:
    """The torch.distributed backend for an array backend: NCCL for GPU arrays, gloo for CPU.

    array_backend is "numpy", "cupy" or "torch"; for "torch", torch_device ("cpu"/"cuda")
    decides.
    """
    if array_backend == "cupy":
        return "nccl"
    if array_backend == "numpy":
        return "gloo"
    if array_backend == "torch":
        return "nccl" if (torch_device or "cpu").startswith("cuda") else "gloo"
    raise ValueError(f"unknown backend {array_backend!r}; expected numpy, cupy or torch")


@dataclass
class DistContext:
    """Where this process stands: its rank, the world's size, and the collectives.

    rank, world_size, local_rank: as torchrun numbers them (0, 1, 0 without torchrun).
    backend: "gloo", "nccl", or None when not distributed.
    device: the torch device the collectives' tensors live on ("cpu" or "cuda:<local_rank>").
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: str = "cpu"
    _group_owner: bool = field(default=False, repr=False)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1 or self.backend is not None

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that logs, plots, samples and writes checkpoints."""
        return self.rank == 0

    # ------------------------------------------------------------------ collectives

    def all_reduce_mean(self, value):
        """Mean over ranks of a float (or a 1-D sequence of floats); returns the same kind."""
        scalar = np.ndim(value) == 0
        host = np.atleast_1d(np.asarray(_to_host_float(value), dtype=np.float64))
        if not self.distributed:
            return float(host[0]) if scalar else host.copy()
        import torch
        import torch.distributed as dist

        t = torch.from_numpy(host.copy()).to(self.device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        out = (t / self.world_size).cpu().numpy()
        return float(out[0]) if scalar else out

    def all_reduce_sum(self, value):
        """Sum over ranks of a float or 1-D sequence of floats."""
        return self.all_reduce_mean(value) * self.world_size

    def barrier(self):
        if self.distributed:
            import torch.distributed as dist

            if self.backend == "nccl":
                import torch

                dist.barrier(device_ids=[torch.device(self.device).index])
            else:
                dist.barrier()

    def all_gather_object(self, obj) -> list:
        """Every rank's picklable object, in rank order (e.g. per-rank data-loader states)."""
        if not self.distributed:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_params_(self, params: dict, src: int = 0):
        """Overwrite params (name -> numpy/cupy array) in place with rank src's, in one
        collective. Used at start-up and after resuming so every rank surely starts equal."""
        if not self.distributed:
            return params
        bucket = GradBucket(params)
        bucket.copy_from(params)
        bucket._collective(self, "broadcast", src=src)
        bucket.copy_to(params)
        return params

    def destroy(self):
        """Leave the process group (only if this context created it)."""
        if self._group_owner:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self._group_owner = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()
        return False


def init(array_backend: str = "numpy", torch_device: str | None = None,
         backend: str | None = None, timeout_s: float | None = None) -> DistContext:
    """Join torchrun's process group, or return a single-process context without torchrun.

    array_backend: "numpy" (gloo), "cupy" (NCCL) or "torch" (NCCL when torch_device is
    CUDA, else gloo). backend overrides the choice. For NCCL each process takes the GPU
    LOCAL_RANK of its node (both for torch and for CuPy).
    """
    if not launched_by_torchrun():
        device = "cpu"
        if array_backend == "cupy" or (torch_device or "").startswith("cuda"):
            device = "cuda:0"
        return DistContext(device=device)

    import datetime

    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    world_size = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = backend or collective_backend_for(array_backend, torch_device)
    wants_gpu = array_backend == "cupy" or (array_backend == "torch"
                                            and (torch_device or "").startswith("cuda"))
    if backend == "nccl" and not wants_gpu:
        raise ValueError("NCCL all-reduces GPU tensors only: use gloo for NumPy and torch-CPU ranks")
    device = "cpu"
    if wants_gpu:
        if not torch.cuda.is_available():
            raise RuntimeError("GPU ranks need CUDA, but torch sees no GPU (use --backend "
                               "numpy for CPU training with gloo)")
        n = torch.cuda.device_count()
        if local_rank >= n and backend == "nccl":
            raise RuntimeError(
                f"LOCAL_RANK {local_rank} but this node has {n} GPU(s): NCCL needs one GPU per "
                f"process (it refuses two ranks on one device), so start at most {n} processes "
                f"per node (--nproc_per_node); to try several processes on one GPU, use gloo "
                f"(--dist-backend gloo), which stages the all-reduce through host memory")
        gpu = local_rank % n  # several ranks per GPU only with gloo
        torch.cuda.set_device(gpu)
        if array_backend == "cupy":
            import cupy

            cupy.cuda.Device(gpu).use()
        device = f"cuda:{gpu}"
    kwargs = {}
    if timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=timeout_s)
    if dist.is_initialized():  # someone (a test, a notebook) already joined: reuse it
        return DistContext(rank, world_size, local_rank, dist.get_backend(), device, False)
    dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistContext(rank, world_size, local_rank, backend, device, True)


def wrap_ddp(module, ctx: DistContext):
    """The torch backend's data parallelism: torch's own DistributedDataParallel (bucketed,
    overlapped all-reduce). Returns the module unchanged when not distributed."""
    if not ctx.distributed:
        return module
    from torch.nn.parallel import DistributedDataParallel as DDP

    import torch

    device_ids = [torch.device(ctx.device).index] if ctx.device.startswith("cuda") else None
    return DDP(module, device_ids=device_ids)


def no_sync_unless(module, sync: bool):
    """DDP's no_sync() on the micro-steps that must not all-reduce (all but the last of a
    gradient-accumulation step); a null context for a plain module or when sync is True."""
    import contextlib

    if sync or not hasattr(module, "no_sync"):
        return contextlib.nullcontext()
    return module.no_sync()


def _to_host_float(value):
    """A float or sequence of floats from python / numpy / cupy / torch scalars."""
    if hasattr(value, "detach"):  # torch tensor
        return value.detach().cpu().double().numpy()
    if type(value).__module__.startswith("cupy"):
        return backend_of(value).to_host(value)
    return value


class GradBucket:
    """One contiguous flat buffer with a view per parameter: accumulate, then all-reduce once.

    bucket = GradBucket(model.params)   # same names, shapes, dtype and device as the params
    bucket.zero()                       # a new step: the next add() overwrites
    bucket.add(grads, scale=1/accum)    # views += scale * grads, once per micro-step
    bucket.all_reduce_mean(ctx)         # ONE collective over the flat buffer
    bucket.grads                        # name -> view, ready for clip_grad_norm / AdamW

    The flat buffer is wrapped once as a torch tensor that shares its memory
    (`torch.from_numpy` / `torch.from_dlpack`), so no gradient is ever copied for the
    collective.
    """

    def __init__(self, params: dict):
        if not params:
            raise ValueError("GradBucket needs at least one parameter")
        first = next(iter(params.values()))
        self.backend = backend_of(first)
        xp = self.backend.xp
        dtypes = {np.dtype(p.dtype) for p in params.values()}
        if len(dtypes) != 1:
            raise ValueError(f"all params must share one dtype for a flat bucket, got {dtypes}")
        self.dtype = dtypes.pop()
        self.numel = sum(int(np.prod(p.shape)) for p in params.values())
        self.flat = xp.zeros(self.numel, dtype=self.dtype)
        self.grads = {}
        offset = 0
        for name, p in params.items():
            n = int(np.prod(p.shape))
            self.grads[name] = self.flat[offset:offset + n].reshape(p.shape)  # a view
            offset += n
        self._torch_view = None
        self._zero = True  # the views hold nothing yet (whatever their bytes)

    def zero(self):
        """Start a new sum. Lazily: the first add() writes scale * grads over the views,
        which saves a pass over the whole buffer every step (until then the views still
        hold the previous sum)."""
        self._zero = True

    def add(self, grads: dict, scale: float = 1.0):
        """views += scale * grads (the micro-step's gradients, which may be reused buffers)."""
        missing = set(self.grads) - set(grads)
        if missing:
            raise KeyError(f"grads lack {sorted(missing)[:5]}")
        xp = self.backend.xp
        for name, view in self.grads.items():
            g = grads[name]
            if self._zero:
                xp.multiply(g, scale, out=view)  # (a Python float keeps the dtype)
            elif scale == 1.0:
                view += g
            else:
                view += g * scale
        self._zero = False

    def copy_from(self, arrays: dict):
        for name, view in self.grads.items():
            view[...] = arrays[name]
        self._zero = False

    def copy_to(self, arrays: dict):
        for name, view in self.grads.items():
            arrays[name][...] = view

    def torch_view(self):
        """The flat buffer as a torch tensor sharing its memory (made once, then reused)."""
        if self._torch_view is None:
            import torch

            if self.backend.name == "numpy":
                self._torch_view = torch.from_numpy(self.flat)
            else:  # cupy: DLPack hands torch the device pointer, no copy
                self._torch_view = torch.from_dlpack(self.flat)
            if self._torch_view.data_ptr() != _data_ptr(self.flat):
                raise RuntimeError("the torch view of the gradient bucket is not zero-copy")
        return self._torch_view

    def all_reduce_mean(self, ctx: DistContext):
        """Average the bucket over all ranks, in place, with one collective."""
        if not ctx.distributed or ctx.world_size == 1:
            return self.grads
        self._collective(ctx, "all_reduce")
        self.flat *= 1.0 / ctx.world_size  # gloo has no AVG; SUM then scale, same for NCCL
        return self.grads

    def _collective(self, ctx: DistContext, kind: str, src: int = 0):
        import torch.distributed as dist

        t = self.torch_view()
        on_gpu = self.backend.name == "cupy"
        if on_gpu:
            # CuPy and torch each have their own notion of "current stream". Wait for CuPy's
            # writes before NCCL reads, and for NCCL's result before CuPy reads: two host
            # syncs per optimizer step (not per micro-step), correct whatever streams are used.
            self.backend.xp.cuda.get_current_stream().synchronize()
        if kind == "all_reduce":
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        elif kind == "broadcast":
            dist.broadcast(t, src=src)
        else:
            raise ValueError(kind)
        if on_gpu:
            import torch

            torch.cuda.current_stream(t.device).synchronize()


def _data_ptr(a) -> int:
    if isinstance(a, np.ndarray):
        return a.ctypes.data
    return int(a.data.ptr)  # cupy
