"""Training diagnostics (gpt2np.train.diagnostics): the logged gradient norms are torch autograd's,
the update ratios are the params' measured change, the activation figures are those of a
direct computation, for the array engine (the model's observer) and the torch engine (hooks)."""
import json
import math

import numpy as np
import pytest
import torch

from gpt2np.backends.torch_reference import TorchGPT
from gpt2np import GPT, GPTConfig
from gpt2np.train import diagnostics as D
from gpt2np.train.diagnostics_plot import plot_diagnostics
from gpt2np.train.engines import ArrayEngine, TorchEngine

CFG = GPTConfig(block_size=12, vocab_size=97, n_layer=2, n_head=2, n_embd=16)
LR = 1e-2


def batches(n=2, B=3, T=12, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.integers(0, CFG.vocab_size, (B, T)), rng.integers(0, CFG.vocab_size, (B, T)))
            for _ in range(n)]


def params64(seed=1):
    # larger than GPT-2's init: attention that is not uniform, some GELU inputs below -3
    rng = np.random.default_rng(seed)
    p = GPT(CFG, dtype="float64", seed=seed).state_dict()
    return {k: v + 0.3 * rng.standard_normal(v.shape) for k, v in p.items()}


def one_step(engine, probe, data, max_norm=0.05, step=0):
    """One optimizer step with two micro-steps, as gpt2np.train.loop's loop drives a probe."""
    rec = {"step": step}
    probe.start_step(step, engine)
    engine.zero_grad()
    for x, y in data:
        engine.forward_backward(x, y, 1.0 / len(data))
    engine.sync_grads()
    probe.before_update(step, engine)
    before = {k: np.array(v) for k, v in engine.params.items()}
    engine.clip_and_step(max_norm, LR)  # a small max_norm: the logged norms are pre-clipping
    after = {k: np.array(v) for k, v in engine.params.items()}
    probe.after_update(step, engine, rec)
    return probe.records[-1], before, after


def torch_grads(params, data):
    ref = TorchGPT.from_params(CFG, params, dtype=torch.float64)
    for x, y in data:
        (ref(torch.from_numpy(x), torch.from_numpy(y))[1] / len(data)).backward()
    return ref.grads()


def make_engine(kind, params):
    if kind == "torch":
        return TorchEngine(CFG, params, "float64", LR, 0.1)
    return ArrayEngine(GPT(CFG, dtype="float64", params=params), LR, 0.1)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_grad_norms_are_autograds_and_update_ratios_the_change(kind, tmp_path):
    params, data = params64(), batches()
    engine = make_engine(kind, params)
    rec, before, after = one_step(engine, D.DiagnosticsProbe(1, tmp_path), data)
    expected = torch_grads(params, data)
    assert list(rec["grad_norm"]) == list(params)
    for k, g in expected.items():
        assert rec["grad_norm"][k] == pytest.approx(np.linalg.norm(g), rel=1e-9, abs=0)
        assert rec["param_norm"][k] == pytest.approx(np.linalg.norm(before[k]), rel=1e-12)
        change = np.linalg.norm(after[k] - before[k]) / np.linalg.norm(before[k])
        assert change > 0 and rec["update_ratio"][k] == pytest.approx(change, rel=1e-9)
    total = math.sqrt(sum(v * v for v in rec["grad_norm"].values()))
    assert total > 0.05 * 10  # so the step clipped: the logged norms are from before it
    # AdamW's first step moves every entry by about lr (lr * g / (|g| + eps)): a LayerNorm
    # gain, undecayed, has update ratio ~ lr * sqrt(C) / ||gain|| (the lr is in the ratio)
    gain = "transformer.h.1.ln_2.weight"
    assert rec["update_ratio"][gain] == pytest.approx(
        LR * math.sqrt(CFG.n_embd) / np.linalg.norm(before[gain]), rel=1e-2)


def direct_activations(params, x):
    """The figures computed directly from the float64 forward's tensors (torch hooks keep
    them whole; nothing of gpt2np.train.diagnostics' arithmetic is used)."""
    ref = TorchGPT.from_params(CFG, params, dtype=torch.float64)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, (i[0], o)))
             for n, m in ref.named_modules()
             if n.endswith(("ln_1", "ln_2", "ln_f", "c_fc", "c_attn"))]
    with torch.no_grad():
        ref(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    out = {}
    resid = lambda t: t.var(dim=-1, unbiased=False).mean().sqrt().item()  # noqa: E731
    for i in range(CFG.n_layer):
        h = f"transformer.h.{i}."
        qkv = seen[h + "attn.c_attn"][1]
        B, T, _ = qkv.shape
        q, k, _ = (t.view(B, T, CFG.n_head, -1).transpose(1, 2) for t in qkv.split(CFG.n_embd, 2))
        att = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
        att = att.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
        ent = -(att * torch.where(att > 0, att.log(), torch.zeros_like(att))).sum(-1).mean().item()
        out[h[:-1]] = {"resid_std": resid(seen[h + "ln_1"][0]),
                       "ln_1_std": seen[h + "ln_1"][1].std(unbiased=False).item(),
                       "attn_entropy": ent,
                       "ln_2_std": seen[h + "ln_2"][1].std(unbiased=False).item(),
                       "gelu_tail": (seen[h + "mlp.c_fc"][1] < -3).double().mean().item()}
    x_f, y_f = seen["transformer.ln_f"]
    out["transformer.ln_f"] = {"resid_std": resid(x_f), "ln_f_std": y_f.std(unbiased=False).item()}
    return out


def assert_figures_equal(got, expected, rel=1e-9):
    assert list(got) == list(expected)
    for name, figures in expected.items():
        assert set(got[name]) == set(figures), name
        for key, value in figures.items():
            assert got[name][key] == pytest.approx(value, rel=rel, abs=1e-12), (name, key)


@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_activation_figures_equal_a_direct_computation(kind, tmp_path):
    params, data = params64(), batches()
    rec, _, _ = one_step(make_engine(kind, params), D.DiagnosticsProbe(1, tmp_path), data)
    # the logged figures are the mean over the step's two micro-steps
    per_batch = [direct_activations(params, x) for x, _ in data]
    expected = {n: {k: (per_batch[0][n][k] + per_batch[1][n][k]) / 2 for k in f}
                for n, f in per_batch[0].items()}
    assert_figures_equal(rec["activations"], expected)
    tails = [f["gelu_tail"] for f in expected.values() if "gelu_tail" in f]
    assert 0 < min(tails) and max(tails) < 0.5  # the test means something
    assert all(0.1 < f["attn_entropy"] < math.log(CFG.block_size) for f in expected.values()
               if "attn_entropy" in f)


def observed(model, x, y=None):
    """[(name, input, output)] the model shows its observer in one forward (copies)."""
    seen = []
    model.observer = lambda name, a, b: seen.append((name, np.array(a), np.array(b)))
    try:
        model.forward(x, y)
    finally:
        model.observer = None
    return seen


def test_the_observer_sees_torchs_module_inputs_and_outputs():
    """GPT.observer: at each named point, the input and output a torch forward hook on the
    GPT2LMHeadModel module of that name sees (float64, to rounding), in forward order; and
    watching changes nothing the model computes."""
    params, (x, y) = params64(), batches(1)[0]
    model = GPT(CFG, dtype="float64", params=params)
    _, loss = model.forward(x, y)
    grads = {k: v.copy() for k, v in model.backward().items()}
    seen = observed(model, x, y)
    assert [name for name, _, _ in seen] == D.points(CFG.n_layer)
    _, loss2 = model.forward(x, y)  # the observed forward's backward: the same bits
    assert float(loss2) == float(loss)
    for k, g in model.backward().items():
        np.testing.assert_array_equal(g, grads[k], err_msg=k)
    ref = TorchGPT.from_params(CFG, params, dtype=torch.float64)
    hooked = {}
    hooks = [ref.get_submodule(n).register_forward_hook(
        lambda mod, i, o, n=n: hooked.__setitem__(n, (i[0].detach().numpy(), o.detach().numpy())))
        for n in D.points(CFG.n_layer)]
    with torch.no_grad():
        ref(torch.from_numpy(x))
    for h in hooks:
        h.remove()
    for name, a, b in seen:
        np.testing.assert_allclose(a, hooked[name][0], rtol=1e-12, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(b, hooked[name][1], rtol=1e-12, atol=1e-12, err_msg=name)


def test_entropy_from_lse_equals_entropy_without_it():
    rng = np.random.default_rng(3)
    qs, k = rng.standard_normal((2, 3, 300, 8)), rng.standard_normal((2, 3, 300, 8))
    s = qs @ k.swapaxes(-1, -2)
    s[..., ~np.tri(300, dtype=bool)] = -np.inf
    m = s.max(-1, keepdims=True)
    lse = np.log(np.exp(s - m).sum(-1, keepdims=True)) + m
    p = np.exp(s - lse)
    direct = -(p * np.where(p > 0, np.log(np.where(p > 0, p, 1)), 0)).sum(-1).mean()
    assert D.attention_entropy(qs, k, lse) == pytest.approx(direct, rel=1e-12)
    assert D.attention_entropy(qs, k) == pytest.approx(direct, rel=1e-12)  # > one block of 256


def test_probe_logs_every_n_steps_and_keeps_a_resumed_runs_records(tmp_path):
    params, data = params64(), batches()
    engine = make_engine("numpy", params)
    probe = D.DiagnosticsProbe(2, tmp_path, eval_interval=0, max_steps=5)  # drawn once
    for step in range(5):
        rec = {"step": step}
        probe.start_step(step, engine)
        engine.zero_grad()
        engine.forward_backward(*data[0], 1.0)
        probe.before_update(step, engine)
        engine.clip_and_step(1.0, LR)
        probe.after_update(step, engine, rec)
        assert engine.forward_hook is None  # off between diagnostic steps
    lines = D.read_diagnostics(tmp_path)
    assert [r["step"] for r in lines] == [0, 2, 4]
    assert all(set(r) >= {"grad_norm", "param_norm", "update_ratio", "activations", "cost_s"}
               for r in lines)
    assert (tmp_path / D.PLOT_NAME).stat().st_size > 10_000
    # a run resumed at step 3 keeps steps 0 and 2 and logs on from there
    resumed = D.DiagnosticsProbe(2, tmp_path)
    resumed.start_step(3, engine)
    assert [r["step"] for r in D.read_diagnostics(tmp_path)] == [0, 2]
    # a fresh run (step 0) starts the file anew
    D.DiagnosticsProbe(2, tmp_path).start_step(0, engine)
    assert D.read_diagnostics(tmp_path) == []


def test_plot_draws_partial_records(tmp_path):
    rec = {"step": 0,
           "grad_norm": {"transformer.wte.weight": 1.0, "transformer.h.0.ln_1.weight": 0.5},
           "update_ratio": {"transformer.wte.weight": 1e-3, "transformer.h.0.ln_1.weight": None},
           "activations": {"transformer.h.0": {"resid_std": 1.0, "attn_entropy": 0.5,
                                               "gelu_tail": 0.1}}}
    plot_diagnostics([rec], tmp_path / "d.png")
    assert (tmp_path / "d.png").stat().st_size > 10_000
    with pytest.raises(ValueError, match="--diagnostics"):
        D.DiagnosticsProbe(0, tmp_path)


def test_the_training_flag_logs_every_n_steps_and_resumes(tmp_path):
    from gpt2np.commands.train import main as train_main
    from testdata import shakespeare_path

    if not shakespeare_path().is_file():
        pytest.skip(f"tiny Shakespeare not at {shakespeare_path()} (set GPT2NP_DATA)")
    out = tmp_path / "run"
    flags = ["--data", str(shakespeare_path()), "--cache-dir", str(tmp_path / "cache"),
             "--out-dir", str(out), "--n-layer", "1", "--n-head", "2", "--n-embd", "16",
             "--block-size", "16", "--batch-size", "2", "--total-batch-size", "64",
             "--max-steps", "6", "--eval-interval", "3", "--eval-batches", "1",
             "--num-samples", "0", "--no-progress", "--diagnostics", "2"]
    assert train_main(flags + ["--stop-after", "3"]) == 0
    assert [r["step"] for r in D.read_diagnostics(out)] == [0, 2]
    assert train_main(flags + ["--resume"]) == 0
    records = D.read_diagnostics(out)
    assert [r["step"] for r in records] == [0, 2, 4]  # nothing lost or doubled by the resume
    assert (out / D.PLOT_NAME).stat().st_size > 10_000
    # the per-tensor norms make up the global norm that log.jsonl's clipping saw (float32)
    log = {r["step"]: r for r in map(json.loads, (out / "log.jsonl").open())}
    for r in records:
        total = math.sqrt(sum(v * v for v in r["grad_norm"].values()))
        assert total == pytest.approx(log[r["step"]]["grad_norm"], rel=1e-5)
        assert len(r["activations"]) == 2 and r["cost_s"] > 0


@pytest.mark.parametrize("n_embd, precision, attention", [
    (16, "fp32", "query blocks"), (16, "bf16", "query blocks"), (128, "bf16", "flash")])
def test_cupy_figures_on_the_simulated_gpu(n_embd, precision, attention, monkeypatch):
    """CuPy's fused layers (on the CUDA simulator; flash attention at head size 64) show the
    observer what the numpy model shows it, without changing a bit of the step; and the
    norms of device arrays are summed on the device."""
    import cuda_sim
    from cuda_sim import fake_cupy

    if not cuda_sim.available():
        pytest.skip("the CUDA simulator needs g++")
    cfg = GPTConfig(block_size=8, vocab_size=40, n_layer=1, n_head=2, n_embd=n_embd)
    params = {k: v.astype(np.float32)
              for k, v in GPT(cfg, dtype="float64", seed=5).state_dict().items()}
    x, y = (np.random.default_rng(1).integers(0, 40, (2, 8)) for _ in range(2))
    figures = {}
    for backend in ("numpy", "cupy"):
        if backend == "cupy":
            fake_cupy.install(monkeypatch)
            from gpt2np.backends import cupy_attention

            flash_calls = []
            flash = cupy_attention.flash_attention_forward
            monkeypatch.setattr(cupy_attention, "flash_attention_forward",
                                lambda *a: (flash_calls.append(1), flash(*a))[1])
        model = GPT(cfg, backend=backend, precision=precision, params=params)
        recorder = D.ActivationRecorder(cfg.n_head)
        model.observer = recorder
        _, loss = model.forward(x, y)
        recorder.end_forward()
        grads = {k: np.array(model.backend.to_host(g)) for k, g in model.backward().items()}
        figures[backend] = recorder.forwards[0]
        model.observer = None  # the same step unobserved: the same bits
        _, loss2 = model.forward(x, y)
        assert float(loss2) == float(loss)
        for k, g in model.backward().items():
            np.testing.assert_array_equal(model.backend.to_host(g), grads[k], err_msg=k)
        if backend == "cupy":
            assert bool(flash_calls) == (attention == "flash")
            norms = D.tensor_norms(model.params)
            assert type(model.params["transformer.wte.weight"]).__module__ == "cupy"
            fake_cupy.clear_caches()
    assert_figures_equal(figures["cupy"], figures["numpy"],
                         rel=1e-2 if precision == "bf16" else 1e-5)
    for k, p in params.items():
        assert norms[k] == pytest.approx(np.linalg.norm(p.astype(np.float64)), rel=1e-12)
