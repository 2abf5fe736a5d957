"""The CuPy backend run on the CPU: its Python code, its fused kernels (built as C++ by the
CUDA simulator in tests/cuda_sim) and its cuBLAS calls (a NumPy model of cuBLAS over raw
memory), against the reference layers in float64. What only a GPU can show (NVRTC's build,
real cuBLAS, races, speed) is in tests/test_cupy.py; tests/test_cuda_compile.py builds every
kernel with NVRTC on the CPU."""
import numpy as np
import pytest

import cuda_sim
from cuda_sim import fake_cupy
from gpt2np import GPT, AdamW, GPTConfig
from gpt2np import layers as L
from gradcheck import assert_close, assert_grads_close
from rounding import (EPS32, assert_matmul_close, assert_within_rounding, gamma, layer_sensitivity,
                      model_sensitivity, sensitivity)

pytestmark = pytest.mark.skipif(not cuda_sim.available(), reason="the CUDA simulator needs g++")


@pytest.fixture
def cp(monkeypatch):
    cp = fake_cupy.install(monkeypatch)
    yield cp
    fake_cupy.clear_caches()


def dev(cp, a):
    return cp.asarray(np.asarray(a, dtype=np.float32))


def host(a):
    return np.array(a, dtype=np.float64)


def _check_layer(cp, name, inputs, rng, **kw):
    """The cupy backend's float32 op `name` (forward and backward) against the reference
    layer in float64, run as a model runs it (on the backend's GEMMs), within float32's
    rounding of this example (tests/rounding.py)."""
    from gpt2np.backends import get_backend

    be = get_backend("cupy")
    ops = be.layer_ops("float32")
    dout = rng.standard_normal(getattr(L, f"{name}_forward")(*inputs, **kw)[0].shape)
    expected, spread = layer_sensitivity(name, inputs, dout, **kw)
    with L.matmul_precision("fp32", be):
        args = [dev(cp, a) if isinstance(a, np.ndarray) else a for a in inputs]
        out32, cache32 = getattr(ops, f"{name}_forward")(*args, **kw)
        assert type(out32).__module__ == "cupy" and out32.dtype == np.float32, name
        g32 = getattr(ops, f"{name}_backward")(dev(cp, dout), cache32)
    g32 = g32 if isinstance(g32, tuple) else (g32,)
    ours = {"out": host(out32), **{f"grad {i}": host(g) for i, g in enumerate(g32)}}
    assert_within_rounding(ours, expected, spread, name)
    return ops


def test_fused_layers_match_the_reference(cp):
    from gpt2np.backends import cupy_kernels as K
    from gpt2np.backends.cupy_attention import attention_forward

    rng = np.random.default_rng(0)
    B, T, C = 2, 9, 37  # C odd and not a multiple of a warp
    x = rng.standard_normal((B, T, C))
    ops = _check_layer(cp, "layernorm",
                       [x * 3 + 1, 1 + 0.1 * rng.standard_normal(C), 0.1 * rng.standard_normal(C)], rng)
    assert ops.layernorm_forward is K.layernorm_forward  # the fused kernel ran, not the reference
    _check_layer(cp, "gelu", [3 * x], rng)
    _check_layer(cp, "gelu", [3 * x, rng.standard_normal(C)], rng)  # c_fc's bias fused in
    assert ops.gelu_forward is K.gelu_forward
    qkv = rng.standard_normal((B, T, 3 * 32))
    _check_layer(cp, "attention", [qkv, 4], rng)
    _check_layer(cp, "attention", [qkv, 4, rng.standard_normal(3 * 32)], rng)  # with c_attn's bias
    assert ops.attention_forward is attention_forward
    _check_layer(cp, "linear",
                 [x, 0.2 * rng.standard_normal((C, 3 * C)), 0.1 * rng.standard_normal(3 * C)], rng)
    _check_layer(cp, "lm_head", [x, 0.2 * rng.standard_normal((53, C))], rng)


def _ops():
    from gpt2np.backends import get_backend

    return get_backend("cupy").layer_ops("float32")


def test_fused_cross_entropy(cp):
    rng = np.random.default_rng(1)
    V = 1001
    logits = rng.standard_normal((2, 5, V)) * 4
    targets = rng.integers(0, V, (2, 5))
    targets[0, 1] = targets[1, 4] = -1  # ignored
    expected, spread = layer_sensitivity("cross_entropy", [logits, targets], 0.7)
    ops = _ops()
    buf = cp.empty((2, 5, V), dtype=np.float32)
    loss32, c32 = ops.cross_entropy_forward(dev(cp, logits), cp.asarray(targets), out=buf)
    d32 = ops.cross_entropy_backward(0.7, c32)
    assert d32.ctypes.data == buf.ctypes.data  # written into the buffer handed in
    assert_within_rounding({"out": host(loss32), "grad 0": host(d32)}, expected, spread,
                           "cross-entropy")
    assert not host(d32)[0, 1].any()  # ignored rows get no gradient
    none = cp.asarray(np.full((1, 3), -1))
    with np.errstate(divide="ignore", invalid="ignore"):  # NumPy warns where CuPy does not
        loss, _ = ops.cross_entropy_forward(dev(cp, logits[:1, :3]), none)
    assert np.isnan(float(loss))  # the mean over no tokens, as torch


def test_fused_embedding_backward_accumulates_deterministically(cp):
    rng = np.random.default_rng(2)
    V, C, B, T = 7, 19, 3, 11
    idx = rng.integers(0, V, (B, T))
    idx[0, :5] = 3  # repeats
    wte, wpe = rng.standard_normal((V, C)), rng.standard_normal((16, C))
    dx = rng.standard_normal((B, T, C))
    prior = rng.standard_normal((V, C))
    _, c64 = L.embedding_forward(idx, wte, wpe)

    def backward(r):  # dx and the prior are rounded to float32 on their way in
        ops = L.REFERENCE_OPS if r is None else r.ops()
        into = prior.copy() if r is None else r(prior)
        return dict(zip(("dwte", "dwpe"), ops.embedding_backward(dx, c64, dwte=into)))

    expected, spread = sensitivity(backward)
    ops = _ops()
    _, c32 = ops.embedding_forward(cp.asarray(idx), dev(cp, wte), dev(cp, wpe))
    runs = []
    for _ in range(2):
        buf = dev(cp, prior)
        dwte, dwpe = ops.embedding_backward(dev(cp, dx), c32, dwte=buf)
        assert dwte.ctypes.data == buf.ctypes.data  # accumulated into the given array
        runs.append((host(dwte), host(dwpe)))
    assert_within_rounding(dict(zip(("dwte", "dwpe"), runs[0])), expected, spread, "embedding")
    np.testing.assert_array_equal(runs[0][0], runs[1][0])


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16"])
def test_cublas_matmul_layouts(cp, precision):
    # the backend's cuBLAS calls on the cuBLAS model: every layout the layers make, every
    # precision, against float64 math on the operands rounded as the tensor cores see them,
    # within float32's rounding of the sums (tests/rounding.py::assert_matmul_close)
    from gpt2np.backends import get_backend
    from gpt2np.layers import round_mantissa

    be = get_backend("cupy")
    rng = np.random.default_rng(3)
    f = lambda *s: dev(cp, rng.standard_normal(s))  # noqa: E731
    qkv = f(2, 6, 3 * 2 * 4)
    q, k, v = qkv.reshape(2, 6, 3, 2, 4).transpose(2, 0, 3, 1, 4)
    cases = {"contiguous": (f(5, 7), f(7, 3)), "x @ W.T": (f(5, 7), f(3, 7).T),
             "x.T @ dout": (f(7, 5).T, f(7, 3)), "wide rows": (f(5, 14)[:, 2:9], f(7, 3)),
             "batched": (f(2, 3, 5, 7), f(2, 3, 7, 4)),
             "att^T @ dy": (f(2, 3, 7, 5).transpose(0, 1, 3, 2), f(2, 3, 7, 4)),
             "q @ k^T": (q, k.transpose(0, 1, 3, 2)), "P @ v": (f(2, 2, 6, 6), v)}
    bits = {"fp32": None, "tf32": 10, "bf16": 7}[precision]
    for name, (a, b) in cases.items():
        ra, rb = host(a), host(b)
        if bits:
            ra = round_mantissa(ra.astype(np.float32), bits).astype(np.float64)
            rb = round_mantissa(rb.astype(np.float32), bits).astype(np.float64)
        c = be.matmul(a, b, precision=precision)
        assert_matmul_close(host(c), ra, rb, name=f"{name} {precision}")
        out = cp.zeros(c.shape[:-1] + (c.shape[-1] + 2,), dtype=np.float32)[..., 1:-1]
        be.matmul(a, b, out=out, precision=precision)
        assert_matmul_close(host(out), ra, rb, name=f"{name} {precision} strided out=")


def _tiny_batch():
    rng = np.random.default_rng(4)
    return rng.integers(0, 40, (2, 8)), rng.integers(0, 40, (2, 8))


def _tiny_model_run(backend, precision, params, steps=1):
    cfg = GPTConfig(block_size=8, vocab_size=40, n_layer=2, n_head=2, n_embd=16)
    model = GPT(cfg, backend=backend, dtype="float32" if backend == "cupy" or precision != "fp32"
                else "float64", precision=precision, params=params)
    idx, targets = _tiny_batch()
    logits, loss = model.forward(idx, targets)
    grads = {k: np.array(model.backend.to_host(v), dtype=np.float64)
             for k, v in model.backward().items()}
    return np.array(model.backend.to_host(logits), dtype=np.float64), float(loss), grads


def test_whole_model_on_the_simulated_gpu(cp):
    cfg = GPTConfig(block_size=8, vocab_size=40, n_layer=2, n_head=2, n_embd=16)
    params = GPT(cfg, dtype="float64", seed=5).state_dict()
    expected, spread = model_sensitivity(cfg, params, *_tiny_batch())
    logits, loss, g = _tiny_model_run("cupy", "fp32", params)
    assert_within_rounding({"logits": logits, "loss": np.array(loss), **g}, expected, spread,
                           "simulated cupy model")
    # bf16: the same rounding as the CPU's emulation (float32 against float32 in another
    # order of sums, a rare bf16 rounding falling the other way: not float32 vs float64)
    logits_e, loss_e, g_e = _tiny_model_run("numpy", "bf16", params)
    logits_b, loss_b, g_b = _tiny_model_run("cupy", "bf16", params)
    assert_close(logits_b, logits_e, 1e-4, "bf16 logits vs CPU emulation")
    assert_grads_close(g_b, g_e, 1e-3, "bf16 grads vs CPU emulation")


def test_fused_adamw_matches_the_reference(cp, monkeypatch):
    rng = np.random.default_rng(6)
    shapes = {"w": (33, 17), "b": (17,), "e": (5, 3)}
    host_params = {k: rng.standard_normal(s) for k, s in shapes.items()}
    ref = {k: v.astype(np.float32) for k, v in host_params.items()}
    gpu = {k: dev(cp, v) for k, v in host_params.items()}
    opt_ref, opt_gpu = AdamW(ref, lr=1e-2), AdamW(gpu, lr=1e-2)
    per_tensor = AdamW._update

    def refuse_on_gpu(self, xp, p, *args):
        assert type(p).__module__ != "cupy", "the GPU update must be the fused kernel"
        return per_tensor(self, xp, p, *args)

    monkeypatch.setattr(AdamW, "_update", refuse_on_gpu)
    for step in range(3):
        grads = {k: rng.standard_normal(s) for k, s in shapes.items()}
        opt_ref.step({k: g.astype(np.float32) for k, g in grads.items()})
        opt_gpu.step({k: dev(cp, g) for k, g in grads.items()})
    for k in shapes:
        assert_close(host(gpu[k]), ref[k], 1e-6, f"param {k}")
        assert_close(host(opt_gpu.m[k]), opt_ref.m[k], 1e-6, f"m {k}")
        assert_close(host(opt_gpu.v[k]), opt_ref.v[k], 1e-6, f"v {k}")


def test_grad_norm_and_clipping_on_the_device(cp):
    from gpt2np.optim import clip_grad_norm, global_grad_norm

    rng = np.random.default_rng(7)
    host_grads = {k: rng.standard_normal(s).astype(np.float32)
                  for k, s in {"a": (30, 7), "b": (7,), "c": (3, 3, 3)}.items()}
    gpu = {k: cp.asarray(v) for k, v in host_grads.items()}
    expected = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in host_grads.values()))
    # each tensor's sum of squares is a float32 dot product of n positive terms, within
    # gamma(n) of it; the norm, a square root, within half that (the float64 sum adds ~0)
    rel = gamma(max(v.size for v in host_grads.values())) / 2 + EPS32
    assert global_grad_norm(gpu) == pytest.approx(expected, rel=rel)
    norm = clip_grad_norm(gpu, 1.0)
    assert norm == pytest.approx(expected, rel=rel)
    # scaled by 1 / (norm + 1e-6) in float32, then measured again
    assert global_grad_norm(gpu) == pytest.approx(1.0, rel=2 * rel + 1e-6 / expected)
    assert type(gpu["a"]).__module__ == "cupy"  # scaled in place on the device


def test_training_script_on_the_simulated_gpu(cp, tmp_path):
    # the cupy engine end to end: host batches to the device, accumulation, clipping, the
    # fused AdamW, evaluation, a checkpoint of device arrays, resume, sampling
    from testdata import shakespeare_path

    from gpt2np.io.checkpoint import load_checkpoint
    from gpt2np.train.loop import TrainConfig, train

    if not shakespeare_path().is_file():
        pytest.skip(f"no tiny Shakespeare at {shakespeare_path()}")
    kw = dict(data=str(shakespeare_path()), cache_dir=str(tmp_path / "cache"), backend="cupy",
              n_layer=1, n_head=2, n_embd=16, block_size=8, batch_size=2, max_steps=4,
              total_batch_size=2 * 2 * 8, lr=1e-2, warmup_steps=1, eval_interval=2,
              eval_batches=1, vocab_size=50304, precision="bf16", progress=False)
    first = train(TrainConfig(out_dir=str(tmp_path / "run"), num_samples=1, sample_tokens=3,
                              stop_after=2, **kw))
    assert first.status == "stopped" and first.step == 2
    ckpt = load_checkpoint(tmp_path / "run" / "ckpt.safetensors")
    assert type(ckpt.params["transformer.wte.weight"]) is np.ndarray  # saved from the host
    rest = train(TrainConfig(out_dir=str(tmp_path / "run"), resume=True, num_samples=1,
                             sample_tokens=3, **kw))
    assert rest.status == "done" and rest.step == 4 and len(rest.samples) == 1
    assert all(np.isfinite(r["train_loss"]) for r in rest.records)


def test_bench_runner_on_the_simulated_gpu(cp):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "bench.py"
    spec = importlib.util.spec_from_file_location("bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    cfg = GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=2, n_embd=16)
    runner = bench.GptRunner("cupy", cfg, 2, 8, "bf16")
    losses = [runner.step() for _ in range(3)]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert runner.label == "gpt2np-cupy bf16" and runner.model.precision == "bf16"


def test_float64_on_the_device_uses_the_reference_layers(cp):
    # the fused kernels and cuBLAS paths are float32; a float64 model on the device runs the
    # reference layer code (and CuPy's own DGEMM) and must equal NumPy float64
    cfg = GPTConfig(block_size=8, vocab_size=40, n_layer=2, n_head=2, n_embd=16)
    params = GPT(cfg, dtype="float64", seed=8).state_dict()
    logits64, loss64, g64 = _tiny_model_run("numpy", "fp32", params)
    model = GPT(cfg, backend="cupy", dtype="float64", params=params)
    rng = np.random.default_rng(4)
    idx, targets = rng.integers(0, 40, (2, 8)), rng.integers(0, 40, (2, 8))
    logits, loss = model.forward(idx, targets)
    assert logits.dtype == np.float64 and type(logits).__module__ == "cupy"
    g = {k: host(v) for k, v in model.backward().items()}
    assert_close(host(logits), logits64, 1e-12, "logits")
    assert_grads_close(g, g64, 1e-10, "float64 on the device")


def test_matmul_reads_alpha_and_beta_from_the_host_whatever_the_handle_says(cp):
    # CuPy shares one cuBLAS handle; if something left it in device pointer mode, our host
    # alpha/beta would be read as device addresses. The backend sets host mode and restores.
    import sys

    from gpt2np.backends import get_backend

    cublas = sys.modules["cupy_backends.cuda.libs.cublas"]
    cublas.setPointerMode(0, 1)
    try:
        a, b = dev(cp, np.eye(3)), dev(cp, np.arange(9.0).reshape(3, 3))
        np.testing.assert_array_equal(host(get_backend("cupy").matmul(a, b)), host(b))
        assert cublas.getPointerMode(0) == 1  # restored
    finally:
        cublas.setPointerMode(0, 0)


def test_matmul_takes_operands_already_cast_to_bf16(cp):
    from gpt2np.backends import get_backend

    be = get_backend("cupy")
    rng = np.random.default_rng(9)
    a, b = dev(cp, rng.standard_normal((2, 5, 7))), dev(cp, rng.standard_normal((2, 7, 3)))
    ref = host(be.matmul(a, b, precision="bf16"))
    a16 = be.to_bf16(a)
    assert a16.dtype == np.uint16 and a16.shape == a.shape
    np.testing.assert_array_equal(host(be.matmul(a16, b, precision="bf16")), ref)
    bt16 = be.to_bf16(dev(cp, host(b).transpose(0, 2, 1).copy()).transpose(0, 2, 1))
    np.testing.assert_array_equal(host(be.matmul(a16, bt16, precision="bf16")), ref)
    with pytest.raises(TypeError, match="bfloat16 bits"):
        be.matmul(a16, b, precision="fp32")


def test_mlp_with_the_bias_fused_into_gelu(cp):
    from gpt2np.backends import get_backend
    from gpt2np.model import mlp_backward, mlp_forward

    rng = np.random.default_rng(10)
    C = 12
    x = rng.standard_normal((2, 5, C))
    p = {"c_fc.weight": 0.3 * rng.standard_normal((C, 4 * C)), "c_fc.bias": rng.standard_normal(4 * C),
         "c_proj.weight": 0.3 * rng.standard_normal((4 * C, C)), "c_proj.bias": rng.standard_normal(C)}
    dout = rng.standard_normal(x.shape)

    def mlp(r):  # float64, or moved as float32 would round it (tests/rounding.py)
        ops, move = (L.REFERENCE_OPS, np.copy) if r is None else (r.ops(), r)
        with L.matmul_precision("fp32", r):
            out, cache = mlp_forward(ops, move(x), {k: move(v) for k, v in p.items()})
            dx, g = mlp_backward(ops, dout, cache)
        return {"out": out, "dx": dx, **g}

    expected, spread = sensitivity(mlp)
    be = get_backend("cupy")
    ops = be.layer_ops("float32")
    with L.matmul_precision("fp32", be):
        out, cache = mlp_forward(ops, dev(cp, x), {k: dev(cp, v) for k, v in p.items()})
        assert len(cache[1]) == 1  # the GELU cache: the fused kernel's (x + bias alone)
        dx, g = mlp_backward(ops, dev(cp, dout), cache)
    ours = {"out": host(out), "dx": host(dx), **{k: host(v) for k, v in g.items()}}
    assert_within_rounding(ours, expected, spread, "mlp")


def test_bf16_step_casts_each_operand_once(cp, monkeypatch):
    # every float32 array that a bf16 training step hands to the GEMMs is cast to bf16 at
    # most once (weights, activations, dlogits, attention's operands): a second cast of the
    # same data is a wasted pass over memory
    from gpt2np.backends import get_backend

    be = get_backend("cupy")
    cast, seen = be.to_bf16, []
    monkeypatch.setattr(be, "to_bf16", lambda x: (seen.append(x), cast(x))[1])  # keeps x alive
    for n_head in (2, 1):  # head size 8: the block attention; 16: flash attention
        seen.clear()
        cfg = GPTConfig(block_size=8, vocab_size=40, n_layer=2, n_head=n_head, n_embd=16)
        model = GPT(cfg, backend="cupy", precision="bf16", seed=0)
        rng = np.random.default_rng(0)
        model.forward(rng.integers(0, 40, (3, 8)), rng.integers(0, 40, (3, 8)))
        model.backward()
        keys = [(x.__array_interface__["data"][0], x.shape, x.strides) for x in seen]
        twice = {k for k in keys if keys.count(k) > 1}
        assert seen and not twice, f"n_head {n_head}: cast more than once: {sorted(twice)}"
        # the cross-entropy kernel writes dlogits (3*8, 40) in bf16: never a float32 to cast
        assert (3 * 8, 40) not in [x.shape for x in seen]


def _example(name):
    """examples/<name>.py as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_under_test", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_attention_benchmark_on_the_simulated_gpu(cp, capsys):
    # examples/bench_attention.py: every implementation timed on the same data, and all
    # agree (flash and the blocks in bf16 to bf16 tolerance, tf32, fp32)
    mod = _example("bench_attention")
    assert mod.main(["--backend", "cupy", "-B", "1", "--n-head", "2", "-T", "70",
                     "--head-size", "16", "--steps", "1", "--warmup", "0"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line[:24].strip(): line[24:].split() for line in lines[2:]}
    assert set(rows) >= {"flash bf16", "blocks bf16", "blocks tf32", "blocks fp32"}, rows
    for name, (f_ms, b_ms, tf_f, tf_b, err) in rows.items():
        assert 0 < float(f_ms) <= float(b_ms) and float(tf_f) > 0, name
        assert float(err) < 2e-2, name


def test_profile_step_on_the_simulated_gpu(cp, capsys):
    # examples/profile_step.py's GPU path (CUDA events): every leaf layer of a bf16 step
    mod = _example("profile_step")
    assert mod.main(["--backend", "cupy", "--n-layer", "1", "--n-embd", "32", "--n-head", "2",
                     "--vocab-size", "64", "-T", "8", "-B", "2", "--steps", "1",
                     "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0] for line in out.splitlines()[2:] if line and not line.startswith("(")}
    for leaf in mod.LEAVES:
        assert f"{leaf}_forward" in rows and f"{leaf}_backward" in rows, (leaf, out)


def test_the_cupy_backend_implements_the_whole_interface(cp, monkeypatch):
    from gpt2np.backends import Backend, cupy_kernels as K, get_backend
    from gpt2np.backends.cupy_backend import FUSED_OPS

    be = get_backend("cupy")
    assert isinstance(be, Backend)  # every member of the Protocol, none missing
    assert be.layer_ops("float32") is FUSED_OPS and be.adamw_update("float32") is K.adamw_update
    assert be.layer_ops("float64") is L.REFERENCE_OPS and be.adamw_update("float64") is None
    cfg = GPTConfig(block_size=8, vocab_size=40, n_layer=1, n_head=2, n_embd=16)
    assert GPT(cfg, backend="cupy").ops is FUSED_OPS  # chosen when the model is made
    monkeypatch.setattr(be, "fused", False)  # GPT2NP_FUSED=0
    assert GPT(cfg, backend="cupy").ops is L.REFERENCE_OPS
    assert AdamW(GPT(cfg, backend="cupy").params).fused_update is None
