"""Training-step benchmark: gpt2np (NumPy or CuPy) against PyTorch on the same model.

One step = forward with targets, backward, AdamW. Prints ms/step, tokens/s, MFU and peak
memory. Examples:

  # the CPU comparison: NumPy and torch eager timed alternately in one process
  python examples/bench.py --compare --config all
  # one backend, any size
  python examples/bench.py --backend numpy --n-layer 6 --n-head 6 --n-embd 384 --seq-len 256 -B 4
  # GPU: CuPy against torch in its best form (bf16 autocast, SDPA flash, compile, fused AdamW)
  python examples/bench.py --backend cupy --compare --preset gpt2 --seq-len 1024 -B 16 --precision bf16
  # the backend's kernels against the reference layers (gpt2np.layers, optim's update)
  python examples/bench.py --config all --reference --no-memory
  # evaluation beside training, same model, in turns: `gpt2np eval --task loss`'s path
  # (tokens/s, and its ratio to training's) and HellaSwag-shaped items (s/item)
  python examples/bench.py --config c --eval --no-memory

On the CPU, benchmark with the BLAS's own choice of kernel: OPENBLAS_CORETYPE and
OPENBLAS_L2_SIZE force older ones, so unset them for this command alone,
  env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python examples/bench.py ...
(the first lines say which kernel ran, and warn when either variable is set).

Timing: after --warmup steps, the backends take turns step by step (A, B, A, B, ...) so that
machine noise (shared cores, turbo, other jobs) hits both alike; the median step is reported.
Memory on the CPU: each backend is measured again in a fresh child process, as its peak
resident set while stepping (VmHWM, reset after the model is built) above the process's RSS
after imports, so params, grads, optimizer state, activations and temporaries all count and
the other backend's memory does not. On a GPU: the pool's (CuPy) or the caching allocator's
(torch) peak. MFU counts 6*N + 12*L*T*C FLOPs per token (N = parameters without wpe),
against --peak-tflops, else a GPU's dense peak by name, else on the CPU the fastest of
2048^3 SGEMMs timed in turns with the steps (see CpuPeak); over 100% it prints n/a.
--eval adds runners that score with the same model in the same turns (see EvalRunner).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from gpt2np import GPT, AdamW, GPTConfig  # noqa: E402
from gpt2np.layers import REFERENCE_OPS  # noqa: E402

# The CPU configurations (vocab 50304): name -> (model sizes, seq_len, batch)
CPU_CONFIGS = {
    "a": (dict(n_layer=4, n_head=4, n_embd=128), 128, 8),
    "b": (dict(n_layer=6, n_head=6, n_embd=384), 256, 4),
    "c": (dict(n_layer=12, n_head=12, n_embd=768), 1024, 1),  # GPT-2 124M
}

THREADS = None  # --threads, for the torch runners made later

# dense peak TFLOP/s by (device substring, precision), for MFU when --peak-tflops is not given
GPU_PEAKS = {("H100", "bf16"): 989.0, ("H100", "tf32"): 494.0, ("H100", "fp32"): 67.0,
             ("H200", "bf16"): 989.0, ("H200", "tf32"): 494.0, ("H200", "fp32"): 67.0,
             ("A100", "bf16"): 312.0, ("A100", "tf32"): 156.0, ("A100", "fp32"): 19.5}


def flops_per_token(cfg: GPTConfig, T: int) -> float:
    n = sum(math.prod(s) for k, s in _shapes(cfg).items() if k != "transformer.wpe.weight")
    return 6 * n + 12 * cfg.n_layer * T * cfg.n_embd


def _shapes(cfg):
    from gpt2np import param_shapes

    return param_shapes(cfg)


# ------------------------------------------------------------------------------ runners
# A runner builds one model + optimizer and offers step() (one full training step, finished:
# synchronised on a GPU), peak_bytes() and a label.


class GptRunner:
    """gpt2np on the numpy or cupy backend; reference=True: with the reference layers of
    gpt2np.layers and gpt2np.optim's own AdamW update instead of the backend's kernels."""

    def __init__(self, backend, cfg, B, T, precision, seed=0, reference=False):
        # float32 master weights always; precision is that of the matmuls (emulated on the CPU)
        self.model = GPT(cfg, backend=backend, dtype="float32", precision=precision, seed=seed)
        self.be = self.model.backend
        self.opt = AdamW(self.model.params, lr=6e-4, weight_decay=0.1)
        if reference:
            self.model.ops, self.opt.fused_update = REFERENCE_OPS, None
        rng = np.random.default_rng(seed)
        self.idx = self.be.asarray(rng.integers(0, cfg.vocab_size, (B, T)))
        self.targets = self.be.asarray(rng.integers(0, cfg.vocab_size, (B, T)))
        self.label = f"gpt2np-{backend} {precision}" + (" reference layers" if reference else "")

    def step(self):
        _, loss = self.model.forward(self.idx, self.targets)
        grads = self.model.backward()
        self.opt.step(grads)
        self.be.synchronize()
        return float(loss)

    def peak_bytes(self):
        if self.be.name == "cupy":  # the pool keeps what it ever held: its size is the peak
            return self.be.xp.get_default_memory_pool().total_bytes()
        return None


class EvalRunner:
    """Scoring without a backward, by the code that `gpt2np eval` runs, on a GptRunner's
    model. task "loss": gpt2np.evals.loss.token_loss over windows of T tokens, as many as
    two of its batches hold; task "hellaswag": gpt2np.evals.hellaswag.ending_losses over
    HELLASWAG_ITEMS items shaped like HellaSwag's (a context of 50 random tokens shared by
    four endings of 20 to 35; shorter in a block under 85). path: "model" scores as the
    model itself does (GPT.token_losses; for HellaSwag each context once, by
    gpt2np.evals.shared_prefix), "rows" (HellaSwag) a row per ending by token_losses, the
    path before shared contexts; "logits" as for a plain logits function (whole (B,T,V)
    logits under the CPU logits budget, a float64 log-softmax), the path before
    GPT.token_losses: the same run gives each "before" beside the "after"."""

    def __init__(self, model, task, T, path, seed=0):
        from gpt2np.evals import hellaswag as H
        from gpt2np.evals import loss as E

        self.model, self.task, self.path = model, task, path
        rng = np.random.default_rng(seed)
        V = model.config.vocab_size
        fn = (lambda idx: model.forward(idx)[0])  # a plain function: the logits path
        fast = path != "logits"
        if task == "loss":
            n = 2 * max(1, H.FORWARD_TOKENS // T)  # windows: two batches of the fast path
            tokens = rng.integers(0, V, n * T + 1)
            self.units = n * T
            self.run = lambda: E.token_loss(model if fast else fn, tokens, block_size=T,
                                            progress=False, backend=model.backend).sum_loss
        else:
            bs = model.config.block_size  # (a small block: shorter rows, of the same shape)
            ctx, longest = min(50, bs // 2), min(35, bs - min(50, bs // 2))
            items = []
            for _ in range(HELLASWAG_ITEMS):
                context = rng.integers(0, V, ctx)  # shared by the 4 rows, as in HellaSwag
                rows = [np.concatenate([context, rng.integers(0, V, int(rng.integers(
                    longest * 4 // 7, longest + 1)))]) for _ in range(4)]
                items.append(H.Rendered(rows, [ctx] * 4, 0, False))
            self.units = len(items)
            budget = H.DEFAULT_LOGITS_BUDGET // (4 * V)  # the CPU budget's tokens per forward
            score = H.losses_function(model) if fast else None
            shared = H.shared_function(model) if path == "model" else None
            max_tokens = max(budget, H.FORWARD_TOKENS) if fast else budget
            self.run = lambda: float(H.ending_losses(H.logits_function(model), items, max_tokens,
                                                     backend=model.backend, score=score,
                                                     shared=shared)[0].sum())
        what = {"model": "token_losses" if task == "loss" else "shared contexts",
                "rows": "a row per ending", "logits": "logits path"}[path]
        self.label = f"eval {task}, {what}"

    def step(self):
        out = self.run()
        self.model.backend.synchronize()
        return out

    def peak_bytes(self):
        return None


HELLASWAG_ITEMS = 16


class TorchRunner:
    """gpt2np.backends.torch_reference.TorchGPT: eager on the CPU; on a GPU in its best form."""

    def __init__(self, cfg, B, T, precision, device, seed=0, flash=True, compile=False):
        import torch

        from gpt2np.backends.torch_reference import TorchGPT
        from gpt2np import init_params

        self.torch = torch
        self.device = device
        if THREADS:
            torch.set_num_threads(THREADS)
        if precision == "tf32":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        self.autocast = precision == "bf16"
        # the same init as gpt2np (GPT-2's 0.02 normal), so both see the same numbers
        self.model = TorchGPT.from_params(cfg, init_params(cfg, seed), device=device, flash=flash)
        # torch's AdamW decays every tensor here; gpt2np's only the matrices: the same work
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=6e-4, betas=(0.9, 0.95),
                                     weight_decay=0.1, fused=True)
        self.fwd = torch.compile(self.model) if compile else self.model
        rng = np.random.default_rng(seed)
        self.idx = torch.from_numpy(rng.integers(0, cfg.vocab_size, (B, T))).to(device)
        self.targets = torch.from_numpy(rng.integers(0, cfg.vocab_size, (B, T))).to(device)
        parts = ["torch", "compile" if compile else "eager", "SDPA" if flash else "explicit-attn",
                 "bf16-autocast" if self.autocast else precision, "fused-AdamW"]
        self.label = " ".join(parts)

    def step(self):
        torch = self.torch
        with torch.autocast(device_type=self.device.split(":")[0], dtype=torch.bfloat16,
                            enabled=self.autocast):
            _, loss = self.fwd(self.idx, self.targets)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.device != "cpu":
            torch.cuda.synchronize()
        return loss.item()

    def peak_bytes(self):
        if self.device != "cpu":
            return self.torch.cuda.max_memory_allocated()
        return None


def make_runner(kind, cfg, args):
    B, T, prec = args.batch_size, args.seq_len, args.precision
    if kind in ("numpy", "cupy"):
        return GptRunner(kind, cfg, B, T, prec, seed=args.seed)
    if kind in ("numpy-reference", "cupy-reference"):
        return GptRunner(kind.split("-")[0], cfg, B, T, prec, seed=args.seed, reference=True)
    device = "cuda" if args.backend == "cupy" or args.device == "cuda" else "cpu"
    if device == "cpu" and prec != "fp32":
        raise SystemExit("on the CPU only --precision fp32 is benchmarked")
    compile_ = args.torch_compile if args.torch_compile is not None else device != "cpu"
    return TorchRunner(cfg, B, T, prec, device, seed=args.seed, flash=not args.torch_explicit_attn,
                       compile=compile_)


# ------------------------------------------------------------------------------ CPU memory


def _rss_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _reset_peak_rss():
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_probe(kind, cfg, args):
    """Run in a child process: peak RSS while stepping, above the RSS after imports."""
    import gc
    import tracemalloc

    if kind == "torch":
        import torch  # noqa: F401  (its import is baseline, not the model's memory)
    gc.collect()
    base = _rss_bytes("VmRSS")
    runner = make_runner(kind, cfg, args)
    gc.collect()
    exact = _reset_peak_rss()  # forget the host-side init's float64 temporaries
    if kind == "numpy":
        tracemalloc.start()  # numpy reports its array buffers to tracemalloc
    for _ in range(args.memory_steps):
        runner.step()
    traced = tracemalloc.get_traced_memory()[1] if kind == "numpy" else None
    peak = _rss_bytes("VmHWM")
    return {"peak_rss": peak - base, "exact": exact, "traced_peak": traced}


def child_memory(kind, cfg, args):
    cmd = [sys.executable, os.path.abspath(__file__), "--memory-probe", kind,
           "--n-layer", str(cfg.n_layer), "--n-head", str(cfg.n_head), "--n-embd", str(cfg.n_embd),
           "--vocab-size", str(cfg.vocab_size), "--block-size", str(cfg.block_size),
           "-B", str(args.batch_size), "-T", str(args.seq_len), "--precision", args.precision,
           "--memory-steps", str(args.memory_steps), "--seed", str(args.seed)]
    if args.torch_explicit_attn:
        cmd.append("--torch-explicit-attn")
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode != 0:
        print(out.stderr[-2000:], file=sys.stderr)
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------ timing


def time_alternately(runners, steps, warmup, between=None):
    """Median seconds per step of each runner, the runners taking turns step by step;
    between() runs before the first round and after each (the CPU peak's GEMM samples)."""
    for r in runners:
        for _ in range(warmup):
            r.step()
    times = [[] for _ in runners]
    losses = [None] * len(runners)
    if between:
        between()
    for _ in range(steps):
        for i, r in enumerate(runners):
            t0 = time.perf_counter()
            losses[i] = r.step()
            times[i].append(time.perf_counter() - t0)
        if between:
            between()
    return [float(np.median(t)) for t in times], losses, times


class CpuPeak:
    """The fp32 matmul ceiling of this CPU as BLAS sees it, for MFU: the fastest of many
    2048^3 SGEMMs (same BLAS threads as the steps), sampled in turns with the steps.

    One timing at start-up under whatever load there is underestimates the peak (a busy
    moment) and can put MFU over 100%; the best of samples spread over the run catches the
    quiet moments the steps also get. Each sample times single SGEMMs (~0.1 s each on 2 cores).
    """

    N = 2048

    def __init__(self):
        self.a = np.random.default_rng(0).standard_normal((self.N, self.N), dtype=np.float32)
        self.c = np.empty_like(self.a)
        np.matmul(self.a, self.a, out=self.c)  # first call: page faults, BLAS thread start-up
        self.best, self.count = math.inf, 0

    def sample(self, reps=2):
        for _ in range(reps):
            t0 = time.perf_counter()
            np.matmul(self.a, self.a, out=self.c)
            self.best = min(self.best, time.perf_counter() - t0)
            self.count += 1

    @property
    def tflops(self):
        return 2 * self.N ** 3 / self.best / 1e12

    def describe(self):
        return (f"{self.tflops:.3f} TFLOP/s, the fastest of {self.count} {self.N}^3 SGEMMs "
                f"timed in turns with the steps")


def gpu_peak_tflops(precision):
    try:
        import cupy

        name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
    except Exception:
        return None
    for (dev, prec), peak in GPU_PEAKS.items():
        if dev in name and prec == precision:
            return peak
    return None


def set_threads(n):
    """The same thread count for numpy's BLAS and for torch (intra-op)."""
    from threadpoolctl import threadpool_limits

    global _THREAD_LIMIT
    _THREAD_LIMIT = threadpool_limits(limits=n, user_api="blas")  # held for the whole run
    if "torch" in sys.modules:  # imported only where torch runs
        sys.modules["torch"].set_num_threads(n)


def fmt_bytes(n):
    return "-" if n is None else f"{n / 2**20:,.0f} MiB"


def blas_info():
    """The BLAS libraries loaded, each with its kernel (threadpoolctl's "architecture": the
    CPU family whose kernels run) and threads."""
    try:
        from threadpoolctl import threadpool_info

        return "; ".join(f"{i['internal_api']} {i.get('version')} kernels {i.get('architecture')} "
                         f"{i['num_threads']} threads" for i in threadpool_info()
                         if i["user_api"] == "blas")
    except ImportError:
        return "threadpoolctl not installed"


# OpenBLAS reads these at start-up; either one makes it run older or smaller-cache kernels
# than it would pick for this CPU, so a benchmark run with them set is not of this machine
KERNEL_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


def kernel_warning():
    """A line saying which of KERNEL_VARIABLES are set, or None."""
    set_ = [f"{k}={os.environ[k]}" for k in KERNEL_VARIABLES if k in os.environ]
    if not set_:
        return None
    return (f"# WARNING: {' '.join(set_)} is set: OpenBLAS runs the kernels it names, not its "
            f"own choice for this CPU; for figures of this machine run "
            f"env -u {' -u '.join(KERNEL_VARIABLES)} python examples/bench.py ...")


def run_config(name, cfg, args, kinds, peak):
    """peak: TFLOP/s, a CpuPeak (sampled between the steps), or None. Returns the training
    rows and (with --eval) the evaluation rows."""
    runners = [make_runner(k, cfg, args) for k in kinds]
    evals = []
    if args.eval and isinstance(runners[0], GptRunner):
        evals = [EvalRunner(runners[0].model, task, args.seq_len, path, seed=args.seed)
                 for task, paths in (("loss", ("model", "logits")),
                                     ("hellaswag", ("model", "rows", "logits")))
                 for path in paths]
    between = peak.sample if isinstance(peak, CpuPeak) else None
    med, losses, _ = time_alternately(runners + evals, args.steps, args.warmup, between)
    eval_rows = [dict(config=name, label=e.label, task=e.task, path=e.path, ms=1000 * s,
                      per_s=e.units / s) for e, s in zip(evals, med[len(runners):])]
    med, losses = med[:len(runners)], losses[:len(runners)]
    peak_tflops = peak.tflops if isinstance(peak, CpuPeak) else peak
    labels = [r.label for r in runners]
    peaks = [r.peak_bytes() for r in runners]
    del runners, evals  # free the parent's models before the memory children run
    tokens = args.batch_size * args.seq_len
    fpt = flops_per_token(cfg, args.seq_len)
    rows = []
    for k, label, s, loss, peak in zip(kinds, labels, med, losses, peaks):
        traced = None
        if peak is None and not args.no_memory:
            m = child_memory(k, cfg, args)
            if m is not None:
                peak, traced = m["peak_rss"], m["traced_peak"]
        mfu = (fpt * tokens / s / 1e12 / peak_tflops) if peak_tflops else None
        over = mfu is not None and mfu > 1  # the peak was underestimated: no figure at all
        rows.append(dict(config=name, backend=k, label=label, ms=1000 * s, tok_s=tokens / s,
                         mfu=None if over else mfu, mfu_over_peak=over, peak_tflops=peak_tflops,
                         peak=peak, traced=traced, loss=loss))
    return rows, eval_rows


def print_eval_rows(name, train_row, eval_rows):
    """Evaluation speed: loss tokens/s (and its ratio to the training tokens/s of the same
    model, same run), HellaSwag-shaped s/item; each path beside the logits path."""
    for r in eval_rows:
        if r["task"] == "loss":
            ratio = r["per_s"] / train_row["tok_s"]
            print(f"{name:6s} {r['label']:44s} {r['ms']:9.1f} ms {r['per_s']:9.0f} tok/s  "
                  f"= {ratio:.2f}x training's tok/s")
        else:
            print(f"{name:6s} {r['label']:44s} {r['ms']:9.1f} ms {1 / r['per_s']:9.3f} s/item "
                  f"({HELLASWAG_ITEMS} items)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=["numpy", "cupy", "torch"], default="numpy")
    ap.add_argument("--compare", action="store_true",
                    help="also time torch on the same config, alternately (CPU: eager; GPU: best form)")
    ap.add_argument("--config", choices=["a", "b", "c", "all"],
                    help="the CPU configs a/b/c (vocab 50304); sets sizes, T and B")
    ap.add_argument("--preset", help="gpt2, gpt2-medium, ... (sizes; vocab from --vocab-size)")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--vocab-size", type=int, default=50304)
    ap.add_argument("--block-size", type=int, default=1024)
    ap.add_argument("-B", "--batch-size", type=int, default=8)
    ap.add_argument("-T", "--seq-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5, help="timed steps per backend")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--precision", choices=["fp32", "tf32", "bf16"], default="fp32")
    ap.add_argument("--peak-tflops", type=float, help="for MFU; default: H100 table on a GPU, "
                    "on the CPU the fastest of 2048^3 SGEMMs timed in turns with the steps")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None, help="for --backend torch")
    ap.add_argument("--torch-compile", action="store_true", default=None,
                    help="torch.compile the torch model (default on a GPU, off on the CPU)")
    ap.add_argument("--torch-explicit-attn", action="store_true",
                    help="torch with the explicit masked softmax instead of SDPA")
    ap.add_argument("--threads", type=int, help="CPU threads for both sides: torch.set_num_threads "
                    "and the BLAS under numpy (threadpoolctl); default: the libraries' own")
    ap.add_argument("--no-memory", action="store_true", help="skip the CPU memory children")
    ap.add_argument("--memory-steps", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--reference", action="store_true",
                    help="also time gpt2np with the reference layers and AdamW update instead "
                    "of the backend's kernels, in the same turns")
    ap.add_argument("--eval", action="store_true",
                    help="also time evaluation with the same model, in the same turns: the "
                    "loss over windows of T tokens and HellaSwag-shaped items, each also by "
                    "the logits path (see EvalRunner)")
    ap.add_argument("--json", help="also write the rows here")
    ap.add_argument("--memory-probe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    def config_of(sizes):
        return GPTConfig(block_size=args.block_size, vocab_size=args.vocab_size, **sizes)

    if args.threads:
        global THREADS
        THREADS = args.threads
        set_threads(args.threads)
    if args.memory_probe:  # child mode
        cfg = config_of(dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd))
        print(json.dumps(memory_probe(args.memory_probe, cfg, args)))
        return

    if args.config:
        names = ["a", "b", "c"] if args.config == "all" else [args.config]
        jobs = []
        for n in names:
            sizes, T, B = CPU_CONFIGS[n]
            jobs.append((n, config_of(sizes), T, B))
    else:
        sizes = (GPTConfig.from_preset(args.preset).to_dict() if args.preset else
                 dict(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd))
        sizes = {k: sizes[k] for k in ("n_layer", "n_head", "n_embd")}
        jobs = [("custom", config_of(sizes), args.seq_len, args.batch_size)]

    kinds = [args.backend]
    if args.reference and args.backend != "torch":
        kinds.append(f"{args.backend}-reference")
    if args.compare and args.backend != "torch":
        kinds.append("torch")
    on_gpu = args.backend == "cupy" or args.device == "cuda"
    if args.backend == "cupy":
        from gpt2np.backends import get_backend

        try:
            get_backend("cupy")
        except RuntimeError as e:  # no CuPy, no driver, no GPU: say so and stop
            raise SystemExit(f"--backend cupy: {e}")
    peak = args.peak_tflops
    if peak is None:
        peak = gpu_peak_tflops(args.precision) if on_gpu else CpuPeak()

    print(f"# gpt2np bench  python {sys.version.split()[0]}  numpy {np.__version__}  "
          f"BLAS: {blas_info()}  cores: {os.cpu_count()}")
    warning = kernel_warning()
    if warning and not on_gpu:
        print(warning)
    if "torch" in kinds:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads")
    if isinstance(peak, CpuPeak):
        print(f"# peak for MFU: the fastest of {CpuPeak.N}^3 SGEMMs timed in turns with the "
              f"steps (printed per config)")
    elif peak:
        print(f"# peak for MFU: {peak:.3f} TFLOP/s ("
              f"{'--peak-tflops' if args.peak_tflops else 'the dense peak of this GPU by name'})")
    else:
        print("# peak for MFU: unknown (pass --peak-tflops)")
    print(f"# load average before: {os.getloadavg()[0]:.1f} (other jobs share these cores)")
    print(f"# {args.steps} timed steps per backend after {args.warmup} warmup, taken in turns; medians")
    all_rows = []
    for name, cfg, T, B in jobs:
        args.seq_len, args.batch_size = T, B
        rows, eval_rows = run_config(name, cfg, args, kinds, peak)
        all_rows += rows + eval_rows
        desc = f"L{cfg.n_layer} H{cfg.n_head} C{cfg.n_embd} V{cfg.vocab_size} T{T} B{B}"
        if isinstance(peak, CpuPeak):
            print(f"{name:6s} peak {peak.describe()}")
        for r in rows:
            mfu = f"{100 * r['mfu']:5.1f}%" if r["mfu"] is not None else "    -"
            if r["mfu_over_peak"]:
                mfu = "  n/a"
                print(f"{name:6s} MFU n/a for {r['label']}: its steps beat the peak for MFU "
                      f"({r['peak_tflops']:.3f} TFLOP/s), so that peak is too low (a measured "
                      f"one was taken at busier moments than the steps): rerun, or pass a "
                      f"correct --peak-tflops")
            print(f"{name:6s} {desc:34s} {r['label']:44s} {r['ms']:9.1f} ms {r['tok_s']:9.0f} tok/s "
                  f"MFU {mfu}  peak {fmt_bytes(r['peak']):>10s}  loss {r['loss']:.4f}")
        for b in rows[1:]:
            a = rows[0]
            mem = (f"{a['peak'] / b['peak']:.2f}" if a["peak"] and b["peak"] else "-")
            print(f"{name:6s} ratio {a['backend']}/{b['backend']}: tokens/s {a['tok_s'] / b['tok_s']:.2f}, "
                  f"peak memory {mem}")
        print_eval_rows(name, rows[0], eval_rows)
    print(f"# load average after: {os.getloadavg()[0]:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(all_rows, f, indent=1)


if __name__ == "__main__":
    main()
