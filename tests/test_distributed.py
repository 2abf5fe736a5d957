"""Data parallelism on torch.distributed (gloo, 2 CPU ranks on 127.0.0.1).

The claim under test: in float64, N ranks that each run B rows and average their gradients
with one all-reduce take exactly the steps one process takes on the combined N*B rows
(losses and params to ~1e-12 relative), including gradient accumulation, and the ranks
agree on the params after every step.

The rank processes are this file run as a script (`python tests/test_distributed.py
--worker ...`) with torchrun's environment variables set, so they go through the same
`distributed.init` as under torchrun.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # when run as a worker script
    sys.path.insert(0, ROOT)

from gpt2np import GPT, AdamW, GPTConfig, clip_grad_norm, cosine_lr  # noqa: E402
from gpt2np import distributed  # noqa: E402
from gpt2np.distributed import DistContext, GradBucket  # noqa: E402
from gpt2np.data.shards import write_shard  # noqa: E402
from gpt2np.data.shards import ShardLoader  # noqa: E402
from testdata import shakespeare_path  # noqa: E402
from tiny_run import tiny_flags  # noqa: E402

CFG = GPTConfig(block_size=8, vocab_size=64, n_layer=2, n_head=2, n_embd=16)
B, T, WORLD, ACCUM, STEPS = 2, 8, 2, 2, 4


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env(rank, world, port):
    """torchrun's variables for a worker, on the loopback interface only."""
    env = dict(os.environ)
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
               WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
               GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return env


def make_shards(data_dir, seed=0):
    rng = np.random.default_rng(seed)
    os.makedirs(data_dir, exist_ok=True)
    write_shard(os.path.join(data_dir, "tok_val_000000.npy"),
                rng.integers(0, CFG.vocab_size, 3 * B * T * WORLD + 1).astype(np.uint16))
    write_shard(os.path.join(data_dir, "tok_train_000001.npy"),
                rng.integers(0, CFG.vocab_size, 3 * B * T * WORLD * ACCUM + 5).astype(np.uint16))
    write_shard(os.path.join(data_dir, "tok_train_000002.npy"),
                rng.integers(0, CFG.vocab_size, 2 * B * T * WORLD * ACCUM + 9).astype(np.uint16))


COLLECTIVES = {"all_reduce": 0, "ddp_buckets": 0}  # calls made by this process


def count_collectives():
    """Count torch.distributed.all_reduce calls (the workers patch it before training)."""
    import torch.distributed as dist

    real = dist.all_reduce

    def counting(*args, **kwargs):
        COLLECTIVES["all_reduce"] += 1
        return real(*args, **kwargs)

    dist.all_reduce = counting


def train(ctx: DistContext, data_dir, batch, accum, steps):
    """The data-parallel loop: accumulate locally, all-reduce once on the last micro-step.

    Returns per-step all-reduced train losses, val losses, and params after each step."""
    model = GPT(CFG, dtype="float64", seed=1)
    ctx.broadcast_params_(model.params)
    opt = AdamW(model.params, lr=1e-2, weight_decay=0.1)
    train_loader = ShardLoader(data_dir, batch, T, ctx.rank, ctx.world_size, "train")
    val_loader = ShardLoader(data_dir, batch, T, ctx.rank, ctx.world_size, "val")
    bucket = GradBucket(model.params)
    losses, val_losses, snapshots = [], [], []
    for step in range(steps):
        bucket.zero()
        loss_accum = 0.0
        before = COLLECTIVES["all_reduce"]
        for _ in range(accum):
            x, y = train_loader.next_batch()
            _, loss = model.forward(x, y)
            loss_accum += float(loss) / accum
            bucket.add(model.backward(), scale=1.0 / accum)
        assert COLLECTIVES["all_reduce"] == before  # micro-steps accumulate locally
        calls = COLLECTIVES["all_reduce"]
        bucket.all_reduce_mean(ctx)
        # ONE collective for the whole gradient, and none during the micro-steps
        assert COLLECTIVES["all_reduce"] - calls == (1 if ctx.distributed else 0)
        clip_grad_norm(bucket.grads, 1.0)
        opt.step(bucket.grads, lr=cosine_lr(step, 1e-2, 1e-3, 2, steps))
        losses.append(ctx.all_reduce_mean(loss_accum))
        val_loader.reset()
        v = np.mean([float(model.forward(*val_loader.next_batch())[1]) for _ in range(2)])
        val_losses.append(ctx.all_reduce_mean(v))
        snapshots.append(model.state_dict())
    return np.array(losses), np.array(val_losses), snapshots


def train_torch(ctx: DistContext, data_dir, batch, accum, steps):
    """The same loop on the torch backend: DistributedDataParallel, no_sync on all but the
    last micro-step, torch's AdamW and clip_grad_norm_."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: threads only contend on a shared machine
    try:
        return _train_torch(ctx, data_dir, batch, accum, steps)
    finally:
        torch.set_num_threads(threads)


def _train_torch(ctx, data_dir, batch, accum, steps):
    import torch

    from gpt2np.backends.torch_reference import TorchGPT

    model = TorchGPT.from_params(CFG, GPT(CFG, dtype="float64", seed=1).state_dict(),
                                 dtype=torch.float64)
    ddp = distributed.wrap_ddp(model, ctx)
    assert (type(ddp).__name__ == "DistributedDataParallel") == ctx.distributed
    if ctx.distributed:  # count DDP's bucket all-reduces to see when it synchronises
        from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

        def hook(state, bucket):
            COLLECTIVES["ddp_buckets"] += 1
            return default_hooks.allreduce_hook(state, bucket)

        ddp.register_comm_hook(None, hook)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                             {"params": no_decay, "weight_decay": 0.0}], lr=1e-2,
                            betas=(0.9, 0.95), eps=1e-8)
    loader = ShardLoader(data_dir, batch, T, ctx.rank, ctx.world_size, "train")
    losses, snapshots = [], []
    for step in range(steps):
        opt.zero_grad(set_to_none=True)
        loss_accum = 0.0
        for micro in range(accum):
            x, y = (torch.from_numpy(a) for a in loader.next_batch())
            before = COLLECTIVES["ddp_buckets"]
            with distributed.no_sync_unless(ddp, micro == accum - 1):
                _, loss = ddp(x, y)
                (loss / accum).backward()
            synced = COLLECTIVES["ddp_buckets"] > before
            assert synced == (ctx.distributed and micro == accum - 1), (micro, synced)
            loss_accum += loss.item() / accum
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        for g in opt.param_groups:
            g["lr"] = cosine_lr(step, 1e-2, 1e-3, 2, steps)
        opt.step()
        losses.append(ctx.all_reduce_mean(loss_accum))
        snapshots.append(model.export_params())
    return np.array(losses), np.zeros(steps), snapshots


def worker_main(argv):
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--data", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    count_collectives()
    # one process group for both engines: each rank process costs seconds to start
    with distributed.init("numpy") as ctx:
        assert ctx.distributed and ctx.backend == "gloo" and ctx.world_size == WORLD
        assert distributed.collective_backend_for("torch", "cpu") == ctx.backend
        for name, fn in (("numpy", train), ("torch", train_torch)):
            losses, val_losses, snaps = fn(ctx, args.data, B, ACCUM, STEPS)
            flat = {f"{s}/{k}": v for s, snap in enumerate(snaps) for k, v in snap.items()}
            np.savez(os.path.join(args.out, f"{name}_rank{ctx.rank}.npz"), losses=losses,
                     val_losses=val_losses, **flat)
        ctx.barrier()


def run_ranks(script_args, world, cwd, timeout=120):
    port = free_port()
    procs = [subprocess.Popen([sys.executable, *script_args], cwd=cwd,
                              env=loopback_env(r, world, port),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in range(world)]
    outs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outs.append(out)
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} failed:\n{out[-4000:]}"
    return outs


def rel(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-300))


# --------------------------------------------------------------------------- the tests


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    """Both engines trained by 2 gloo ranks (one launch); returns (data dir, results dir)."""
    tmp = tmp_path_factory.mktemp("dist")
    data = str(tmp / "data")
    make_shards(data)
    run_ranks([os.path.abspath(__file__), "--worker", "--data", data, "--out", str(tmp)],
              WORLD, cwd=ROOT)
    return data, tmp


def _compare(ranks, losses, val_losses, snaps, what):
    worst = 0.0
    for r, z in enumerate(ranks):
        assert rel(z["losses"], losses) < 1e-12, (r, z["losses"], losses)
        assert rel(z["val_losses"], val_losses) < 1e-12, (r, z["val_losses"], val_losses)
        for s in range(STEPS):
            for k, v in snaps[s].items():
                d = rel(z[f"{s}/{k}"], v)
                worst = max(worst, d)
                assert d < 1e-12, f"{what} rank {r} step {s} {k}: rel diff {d:.2e}"
    print(f"\nmax relative param difference, {what} 2 ranks vs 1 process: {worst:.2e}")
    # the ranks agree on every param after every step, bit for bit
    for key in ranks[0].files:
        np.testing.assert_array_equal(ranks[0][key], ranks[1][key], err_msg=key)


def test_two_gloo_ranks_equal_one_process_on_the_combined_batch(two_rank_run):
    data, tmp = two_rank_run
    ranks = [np.load(tmp / f"numpy_rank{r}.npz") for r in range(WORLD)]
    # one process, the combined batch: B*WORLD rows per micro-step, same accumulation
    losses, val_losses, snaps = train(DistContext(), data, B * WORLD, ACCUM, STEPS)
    _compare(ranks, losses, val_losses, snaps, "numpy")
    # and the steps did something: the params moved and the loss is not constant
    assert rel(snaps[-1]["transformer.h.0.mlp.c_fc.weight"],
               GPT(CFG, dtype="float64", seed=1).state_dict()["transformer.h.0.mlp.c_fc.weight"]) > 1e-3
    assert np.ptp(losses) > 0


def test_torch_backend_ddp_two_ranks_equal_one_process(two_rank_run):
    data, tmp = two_rank_run
    ranks = [np.load(tmp / f"torch_rank{r}.npz") for r in range(WORLD)]
    losses, val_losses, snaps = train_torch(DistContext(), data, B * WORLD, ACCUM, STEPS)
    _compare(ranks, losses, val_losses, snaps, "torch DDP")


def test_single_process_without_torchrun(monkeypatch):
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(v, raising=False)
    ctx = distributed.init("numpy")
    assert not ctx.distributed and ctx.is_main and ctx.world_size == 1
    assert ctx.all_reduce_mean(2.5) == 2.5
    np.testing.assert_array_equal(ctx.all_reduce_mean([1.0, 2.0]), [1.0, 2.0])
    ctx.barrier()
    ctx.destroy()


def test_collective_backend_choice():
    assert distributed.collective_backend_for("numpy") == "gloo"
    assert distributed.collective_backend_for("cupy") == "nccl"
    assert distributed.collective_backend_for("torch", "cpu") == "gloo"
    assert distributed.collective_backend_for("torch", "cuda") == "nccl"
    with pytest.raises(ValueError):
        distributed.collective_backend_for("jax")
    assert distributed.launched_by_torchrun({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0"})
    assert not distributed.launched_by_torchrun({"RANK": "0"})


def test_grad_bucket_is_one_flat_buffer_shared_zero_copy_with_torch():
    model = GPT(CFG, dtype="float32", seed=0)
    bucket = GradBucket(model.params)
    assert bucket.flat.size == model.num_params()
    for k, v in bucket.grads.items():  # every grad is a view into the one flat buffer
        assert v.base is bucket.flat or v.base is bucket.flat.base or np.shares_memory(v, bucket.flat)
        assert v.shape == model.params[k].shape and v.dtype == np.float32
    t = bucket.torch_view()
    assert t.data_ptr() == bucket.flat.ctypes.data and t.numel() == bucket.flat.size
    t.fill_(3.0)  # writes through torch land in the numpy views
    assert all(float(v.min()) == 3.0 for v in bucket.grads.values())

    rng = np.random.default_rng(0)
    g1 = {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in model.params.items()}
    g2 = {k: rng.standard_normal(p.shape).astype(np.float32) for k, p in model.params.items()}
    bucket.zero()
    bucket.add(g1, scale=0.5)
    bucket.add(g2, scale=0.5)
    for k in g1:
        np.testing.assert_allclose(bucket.grads[k], 0.5 * g1[k] + 0.5 * g2[k], rtol=1e-6)
    assert bucket.grads[k].dtype == np.float32
    # not distributed: all_reduce_mean leaves the values alone
    before = bucket.flat.copy()
    bucket.all_reduce_mean(DistContext())
    np.testing.assert_array_equal(bucket.flat, before)
    with pytest.raises(KeyError):
        bucket.add({k: g1[k] for k in list(g1)[1:]})


# --------------------------------------------------------------------------- the training script


SHAKESPEARE = str(shakespeare_path())
SCRIPT = os.path.join(ROOT, "examples", "train_shakespeare.py")


def tiny(cache, batch_size, **kw):
    """The shared tiny run in float64, 3 steps; per rank 2 x 4 tokens per micro-step, 2
    micro-steps per step on 2 ranks (32 tokens per step)."""
    run = dict(block_size=4, batch_size=batch_size, dtype="float64", max_steps=3,
               eval_interval=2, eval_batches=2, total_batch_size=32, num_samples=1,
               sample_tokens=4)
    return tiny_flags(None, cache, **{**run, **kw})


def script_env():
    # one BLAS / OpenMP thread per process: tiny matrices, shared cores
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONPATH=ROOT,
               MPLBACKEND="Agg", HF_HUB_OFFLINE="1")
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(v, None)
    return env


def torchrun(args, tmp, tag, nproc=2, timeout=240):
    """examples/train_shakespeare.py under torchrun (loopback only); returns each rank's
    stdout, captured by torchrun per rank (--redirects)."""
    logs = os.path.join(tmp, f"torchrun-{tag}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "--log-dir", logs, "--redirects", "3",
           SCRIPT, *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=script_env(), capture_output=True, text=True,
                          timeout=timeout)
    outs = {}
    for r in range(nproc):
        found = glob.glob(os.path.join(logs, "*", "attempt_0", str(r), "stdout.log"))
        outs[r] = open(found[0]).read() if found else ""
    assert proc.returncode == 0, (proc.stdout[-3000:], proc.stderr[-3000:], outs)
    return outs


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory):
    """The script on 2 ranks, one process on the combined batch, and 2 ranks stopped after
    2 steps then resumed (launched with no run flags: the checkpoint's); all float64."""
    tmp = tmp_path_factory.mktemp("script")
    cache = tmp / "cache"
    # one process (plain python, no torchrun) on the combined batch, first: it tokenizes
    # tiny Shakespeare into the cache the ranks then share
    one = subprocess.run([sys.executable, SCRIPT, *tiny(cache, 4, out_dir=str(tmp / "one"))],
                         cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, (one.stdout[-3000:], one.stderr[-3000:])
    outs = torchrun(tiny(cache, 2, out_dir=str(tmp / "two")), tmp, "two")
    torchrun(tiny(cache, 2, out_dir=str(tmp / "resumed"), stop_after=2), tmp, "stop")
    torchrun(["--resume", "--out-dir", str(tmp / "resumed"), "--data", SHAKESPEARE,
              "--cache-dir", str(cache), "--no-progress", "--num-samples", "0"],
             tmp, "resume")
    torch_outs = torchrun(tiny(cache, 2, backend="torch", out_dir=str(tmp / "torch")), tmp,
                          "torch")
    return tmp, outs, torch_outs


def _log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_script_two_ranks_equal_one_process(script_runs):
    tmp = script_runs[0]
    from gpt2np.io.checkpoint import load_checkpoint

    one, two = _log(tmp / "one"), _log(tmp / "two")
    assert [r["step"] for r in two] == [0, 1, 2]
    assert [r["step"] for r in two if "val_loss" in r] == [1, 2]
    for key in ("train_loss", "val_loss", "grad_norm"):
        a = [r[key] for r in two if key in r]
        b = [r[key] for r in one if key in r]
        assert rel(a, b) < 1e-12, (key, a, b)
    c1, c2 = load_checkpoint(tmp / "one" / "ckpt.safetensors"), load_checkpoint(tmp / "two" / "ckpt.safetensors")
    worst = max(rel(c2.params[k], c1.params[k]) for k in c1.params)
    print(f"\nscript: max relative param difference, 2 ranks vs 1 process: {worst:.2e}")
    assert worst < 1e-12
    assert max(rel(c2.m[k], c1.m[k]) for k in c1.m) < 1e-11
    assert c2.state["world_size"] == 2 and len(c2.state["data_ranks"]) == 2


def test_script_val_set_does_not_depend_on_the_number_of_ranks(script_runs):
    """--eval-batches counts global batches (total_batch_size tokens), split over the ranks:
    one process with the ranks' own batch size (so twice the micro-steps) evaluates the very
    val batches the 2 ranks did, and trains the same steps."""
    tmp = script_runs[0]
    one = subprocess.run([sys.executable, SCRIPT, *tiny(tmp / "cache", 2, num_samples=0,
                                                         out_dir=str(tmp / "one-b2"))],
                         cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, (one.stdout[-3000:], one.stderr[-3000:])
    one, two = _log(tmp / "one-b2"), _log(tmp / "two")
    for key in ("train_loss", "val_loss", "grad_norm"):
        a = [r[key] for r in two if key in r]
        b = [r[key] for r in one if key in r]
        assert len(a) == len(b) and rel(a, b) < 1e-12, (key, a, b)


def test_script_only_rank0_writes(script_runs):
    tmp, outs, _ = script_runs
    assert sorted(os.listdir(tmp / "two")) == ["ckpt.safetensors", "log.jsonl", "loss.png",
                                               "samples.txt"]
    assert len(_log(tmp / "two")) == 3  # one line per step, not one per rank
    assert "step     2 | train loss" in outs[0] and "2 ranks (gloo)" in outs[0]
    assert "sample 1" in outs[0]
    assert outs[1].strip() == "", outs[1]  # rank 1 prints nothing


def test_script_resume_under_torchrun_is_bit_identical(script_runs):
    tmp = script_runs[0]
    from gpt2np.io.checkpoint import load_checkpoint

    a = load_checkpoint(tmp / "two" / "ckpt.safetensors")
    b = load_checkpoint(tmp / "resumed" / "ckpt.safetensors")
    assert b.state["step"] == 3 and b.t == a.t
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k], err_msg=k)
        np.testing.assert_array_equal(a.m[k], b.m[k], err_msg=k)
    assert _log(tmp / "resumed") == [dict(r, tokens_per_s=s["tokens_per_s"])
                                     for r, s in zip(_log(tmp / "two"), _log(tmp / "resumed"))]


def test_script_torch_backend_ddp_matches_numpy(script_runs):
    """--backend torch under torchrun: DistributedDataParallel, the same steps as gpt2np's
    hand-written backward on 2 ranks (float64, to the numpy == torch tolerance)."""
    tmp, _, outs = script_runs
    from gpt2np.io.checkpoint import load_checkpoint

    assert "torch float64" in outs[0] and "2 ranks (gloo)" in outs[0]
    assert outs[1].strip() == ""
    ln, lt = _log(tmp / "two"), _log(tmp / "torch")
    for a, b in zip(ln, lt, strict=True):
        for key in ("train_loss", "grad_norm", "val_loss"):
            if key in a or key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-10, abs=0), (a["step"], key)
    cn, ct = load_checkpoint(tmp / "two" / "ckpt.safetensors"), load_checkpoint(tmp / "torch" / "ckpt.safetensors")
    assert ct.t == cn.t == 3
    for k in cn.params:
        np.testing.assert_allclose(ct.params[k], cn.params[k], rtol=0, atol=1e-10, err_msg=k)


if __name__ == "__main__" and "--worker" in sys.argv:
    worker_main(sys.argv[1:])
