"""The whole model against the PyTorch oracle, its init, and its input checks."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gpt2np.backends.torch_reference import TorchGPT
from gpt2np import GPT, GPTConfig, param_shapes
from gradcheck import assert_close, assert_fd_close, assert_grads_close
from rounding import assert_within_rounding, model_sensitivity

configs = st.builds(
    lambda n_layer, n_head, hs, vocab, block: GPTConfig(block_size=block, vocab_size=vocab,
                                                       n_layer=n_layer, n_head=n_head, n_embd=n_head * hs),
    n_layer=st.integers(1, 3), n_head=st.integers(1, 3), hs=st.integers(3, 6),
    vocab=st.integers(5, 40), block=st.integers(4, 12))


def _random_model(cfg, seed, dtype):
    """A GPT with larger-than-init weights, so that every path carries signal, not just the
    residual stream, and a batch (idx, targets) from the same seed."""
    rng = np.random.default_rng(seed)
    model = GPT(cfg, dtype=dtype, seed=seed)
    for k, p in model.params.items():
        if p.ndim == 2:
            p[...] = rng.standard_normal(p.shape) * 0.3
        elif k.endswith("bias"):
            p[...] = rng.standard_normal(p.shape) * 0.1
    return model, rng


def _torch_results(cfg, params, idx, targets):
    """{"logits", "loss", every gradient} of the float64 torch oracle."""
    ref = TorchGPT.from_params(cfg, params, dtype=torch.float64)
    rlogits, rloss = ref(torch.from_numpy(idx), torch.from_numpy(targets))
    rloss.backward()
    return {"logits": rlogits.detach().numpy(), "loss": np.array(rloss.item()), **ref.grads()}


def _run(cfg, B, T, seed, dtype):
    """(our results, the oracle's, params, idx, targets) on a random model and batch."""
    model, rng = _random_model(cfg, seed, dtype)
    idx = rng.integers(0, cfg.vocab_size, (B, T))
    targets = rng.integers(0, cfg.vocab_size, (B, T))
    logits, loss = model.forward(idx, targets)
    grads = model.backward()
    assert logits.dtype == np.dtype(dtype) and grads["transformer.wte.weight"].dtype == np.dtype(dtype)
    ours = {k: np.array(v, dtype=np.float64) for k, v in {"logits": logits, "loss": loss, **grads}.items()}
    params = model.state_dict()
    return ours, _torch_results(cfg, params, idx, targets), params, idx, targets


def _compare_with_torch(cfg, B, T, seed, rtol):
    """float64 against the float64 oracle: the same math in another order, near eps."""
    ours, expected, _, _, _ = _run(cfg, B, T, seed, "float64")
    grads = {k: v for k, v in ours.items() if k not in ("logits", "loss")}
    return {"logits": assert_close(ours["logits"], expected["logits"], rtol, "logits"),
            "loss": assert_close(ours["loss"], expected["loss"], rtol, "loss"),
            "grads": assert_grads_close(grads, {k: expected[k] for k in grads}, rtol, "model")}


@given(configs, st.integers(1, 3), st.integers(0, 2**31 - 1), st.data())
def test_model_float64_matches_torch(cfg, B, seed, data):
    T = data.draw(st.integers(1, cfg.block_size))
    _compare_with_torch(cfg, B, T, seed, 1e-10)


def _compare_float32_with_torch(cfg, B, T, seed):
    """float32 against the float64 oracle, every tensor within the spread that float32-sized
    rounding causes in the float64 model on this very example (tests/rounding.py derives
    the tolerance). A fixed bound fails the badly conditioned examples, whose float64
    results themselves move by more than it under float32's rounding."""
    ours, expected, params, idx, targets = _run(cfg, B, T, seed, "float32")
    _, spread = model_sensitivity(cfg, params, idx, targets)
    return assert_within_rounding(ours, expected, spread, "float32 model vs float64")


@given(configs, st.integers(1, 3), st.integers(0, 2**31 - 1), st.data())
def test_model_float32_matches_torch_float64(cfg, B, seed, data):
    T = data.draw(st.integers(1, cfg.block_size))
    _compare_float32_with_torch(cfg, B, T, seed)


def test_model_float32_where_float32_itself_errs_past_1e5():
    # its logits are 1.7e-5 off, and the float64 model's move by as much under float32-sized
    # moves of its parameters alone: a fixed 1e-5 failed it, float32's own tolerance passes
    cfg = GPTConfig(block_size=6, vocab_size=38, n_layer=3, n_head=1, n_embd=4)
    assert _compare_float32_with_torch(cfg, 3, 3, 1769056995) <= 1.0


def test_gpt2_shaped_model_float64_matches_torch():
    """A deeper, wider model at GPT-2's head size with the full 50257 vocab."""
    cfg = GPTConfig(block_size=32, vocab_size=50257, n_layer=2, n_head=2, n_embd=128)
    errs = _compare_with_torch(cfg, 2, 32, 7, 1e-10)
    assert errs["grads"] < 1e-10


def test_model_gradient_matches_finite_differences():
    """Oracle 2 for the whole model: central differences on probed entries of every tensor,
    each within the tolerance its own error model gives (tests/gradcheck.py::assert_fd_close)."""
    cfg = GPTConfig(block_size=6, vocab_size=11, n_layer=2, n_head=2, n_embd=6)
    model = GPT(cfg, dtype="float64", seed=1)
    rng = np.random.default_rng(0)
    for k, p in model.params.items():
        p[...] = p + rng.standard_normal(p.shape) * 0.2
    idx = rng.integers(0, 11, (2, 6))
    targets = rng.integers(0, 11, (2, 6))
    logits, _ = model.forward(idx, targets)
    grads = {k: g.copy() for k, g in model.backward().items()}
    # a perturbed entry moves everything downstream of it: the loss is computed from every
    # parameter and from logits that cancel in it (lse - logit), so its rounding scales with
    # all of them, not only with the tensor probed (as gpt2np gradcheck's finite differences)
    scale = float(np.max(np.abs(logits))) + sum(float(np.sum(np.abs(p * grads[k])))
                                                for k, p in model.params.items())
    for name, p in model.params.items():
        original = p.copy()

        def loss_of(x, p=p):
            p[...] = x
            return np.asarray(model.forward(idx, targets)[1])

        try:
            assert_fd_close(loss_of, original, np.ones(()), grads[name], n_probe=6, rng=rng,
                            scale=scale, name=name)
        finally:
            p[...] = original


def test_tied_wte_gradient_sums_both_uses():
    cfg = GPTConfig(block_size=8, vocab_size=13, n_layer=1, n_head=2, n_embd=8)
    model = GPT(cfg, dtype="float64")
    idx = np.array([[1, 2, 3, 1]])
    model.forward(idx, idx)
    g = model.backward()["transformer.wte.weight"]
    # rows of tokens never fed in get only the lm_head share, which is nonzero
    assert np.abs(g[7]).sum() > 0
    ref = TorchGPT.from_params(cfg, model.state_dict(), dtype=torch.float64)
    _, loss = ref(torch.from_numpy(idx), torch.from_numpy(idx))
    loss.backward()
    assert_close(g, ref.grads()["transformer.wte.weight"], 1e-10, "tied wte")


def test_loss_at_init_is_ln_vocab():
    cfg = GPTConfig(block_size=64, vocab_size=1000, n_layer=2, n_head=4, n_embd=64)
    model = GPT(cfg, seed=3)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, 1000, (4, 64))
    targets = rng.integers(0, 1000, (4, 64))
    _, loss = model.forward(idx, targets)
    assert abs(float(loss) - math.log(1000)) < 0.05


def test_params_named_and_shaped_like_hf():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPTConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=8)
    hf = GPT2LMHeadModel(GPT2Config(n_positions=16, n_embd=8, n_layer=2, n_head=2, vocab_size=50))
    sd = {k: tuple(v.shape) for k, v in hf.state_dict().items()
          if k != "lm_head.weight" and not k.endswith((".attn.bias", ".attn.masked_bias"))}
    model = GPT(cfg)
    assert {k: tuple(v.shape) for k, v in model.params.items()} == sd
    assert list(model.params) == list(param_shapes(cfg))


def test_init_statistics_and_reproducibility():
    cfg = GPTConfig(block_size=64, vocab_size=500, n_layer=4, n_head=4, n_embd=128)
    a, b, c = GPT(cfg, seed=5), GPT(cfg, seed=5), GPT(cfg, seed=6)
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    assert not np.array_equal(a.params["transformer.wte.weight"], c.params["transformer.wte.weight"])
    p = a.params
    assert abs(p["transformer.wte.weight"].std() - 0.02) < 1e-3
    assert abs(p["transformer.h.0.mlp.c_fc.weight"].std() - 0.02) < 1e-3
    assert abs(p["transformer.h.0.attn.c_proj.weight"].std() - 0.02 / math.sqrt(8)) < 1e-3
    assert np.all(p["transformer.h.0.ln_1.weight"] == 1) and np.all(p["transformer.h.0.ln_1.bias"] == 0)
    assert np.all(p["transformer.h.1.attn.c_attn.bias"] == 0)
    assert all(v.dtype == np.float32 for v in p.values())


def test_params_are_written_in_place():
    cfg = GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=4)
    model = GPT(cfg)
    idx = np.array([[1, 2, 3]])
    before, _ = model.forward(idx)
    model.params["transformer.wte.weight"][...] *= 2
    after, _ = model.forward(idx)
    assert not np.allclose(before, after)


# ------------------------------------------------------------------------ input errors

CFG = GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=2, n_embd=4)


@pytest.mark.parametrize("idx, err, match", [
    (np.array([[1.0, 2.0]]), TypeError, "integer"),
    (np.array([[1, 10]]), ValueError, "token id 10 outside"),
    (np.array([[-1, 2]]), ValueError, "token id -1 outside"),
    (np.zeros((1, 9), dtype=np.int64), ValueError, "longer than the block size 8"),
    (np.array([1, 2]), ValueError, r"shape \(B, T\)"),
    (np.zeros((1, 2, 3), dtype=np.int64), ValueError, r"shape \(B, T\)"),
    (np.zeros((1, 0), dtype=np.int64), ValueError, "empty"),
    ("hello", TypeError, "integer array"),
])
def test_bad_idx(idx, err, match):
    with pytest.raises(err, match=match):
        GPT(CFG).forward(idx)


def test_bad_targets():
    model = GPT(CFG)
    idx = np.array([[1, 2, 3]])
    with pytest.raises(ValueError, match="targets shape"):
        model.forward(idx, np.array([[1, 2]]))
    with pytest.raises(ValueError, match="targets holds token id 10"):
        model.forward(idx, np.array([[1, 2, 10]]))
    _, loss = model.forward(idx, np.array([[1, -1, 2]]))  # -1 is ignored, not an error
    assert np.isfinite(loss)


def test_targets_as_a_list_like_idx():
    """Targets take array-likes as idx does: lists give the same loss as arrays."""
    model = GPT(CFG)
    _, want = model.forward(np.array([[1, 2, 3]]), np.array([[2, 3, 4]]))
    _, got = model.forward([[1, 2, 3]], [[2, 3, 4]])
    assert float(got) == float(want)
    with pytest.raises(ValueError, match="targets shape"):
        model.forward([[1, 2, 3]], [[2, 3]])
    with pytest.raises(TypeError, match="targets must be an integer array"):
        model.forward([[1, 2, 3]], "abc")


def test_out_of_range_id_names_vocab_size():
    with pytest.raises(ValueError, match="vocab_size"):
        GPT(CFG).forward(np.array([[1, 10]]))


def test_backward_needs_a_forward_with_targets():
    model = GPT(CFG)
    with pytest.raises(RuntimeError, match="forward"):
        model.backward()
    model.forward(np.array([[1, 2]]))
    with pytest.raises(RuntimeError, match="targets"):
        model.backward()
    model.forward(np.array([[1, 2]]), np.array([[2, 3]]))
    model.backward()
    with pytest.raises(RuntimeError):  # the activations are gone after one backward
        model.backward()


def test_unknown_backend_lists_known_ones():
    with pytest.raises(ValueError, match="numpy, cupy"):
        GPT(CFG, backend="jax")


def test_bad_dtype_and_config():
    with pytest.raises(ValueError, match="dtype"):
        GPT(CFG, dtype="float16")
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="positive"):
        GPTConfig(n_layer=0)
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.from_preset("gpt3")
    assert GPTConfig.from_preset("gpt2-xl").n_embd == 1600


def test_load_params_checks_names_and_shapes():
    model = GPT(CFG)
    sd = model.state_dict()
    bad = dict(sd)
    bad["transformer.wte.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="transformer.wte.weight"):
        model.load_params(bad)
    bad = dict(sd)
    del bad["transformer.ln_f.bias"]
    with pytest.raises(ValueError, match="missing"):
        model.load_params(bad)


def test_gpt2np_imports_without_torch():
    import subprocess
    import sys

    code = ("import sys; sys.modules['torch'] = None\n"
            "import numpy as np, gpt2np\n"
            "m = gpt2np.GPT(gpt2np.GPTConfig(block_size=8, vocab_size=10, n_layer=1, n_head=1, n_embd=4))\n"
            "m.forward(np.array([[1, 2]]), np.array([[2, 3]])); m.backward()\n"
            "opt = gpt2np.AdamW(m.params); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


def test_the_numpy_backend_implements_the_whole_interface():
    from gpt2np import layers as L
    from gpt2np.backends import Backend, get_backend

    be = get_backend("numpy")
    assert isinstance(be, Backend)  # every member of the Protocol, none missing
    # float64 runs the reference itself (float32's kernels: tests/test_speed_paths.py)
    assert be.layer_ops("float64") is L.REFERENCE_OPS
    assert be.adamw_update("float64") is None  # gpt2np.optim's own update
    model = GPT(CFG, dtype="float64")
    assert model.ops is L.REFERENCE_OPS  # the layer functions, chosen when it was made


def _imports(path, modules):
    """The gpt2np modules a source file imports, at the top or inside functions."""
    import ast

    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            found |= subs or {node.module}
    return found & modules


def test_no_import_cycles_lazy_imports_included():
    """Dependencies point down: following the imports of gpt2np's modules (function-level
    ones too) never leads back to where it started. And layers.py, the math, imports
    nothing of gpt2np at all."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    files = {".".join(f.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): f
             for f in (root / "gpt2np").rglob("*.py")}
    graph = {m: _imports(f, set(files)) - {m} for m, f in files.items()}
    assert graph["gpt2np.layers"] == set()
    done, path = set(), []

    def visit(m):
        assert m not in path, "import cycle: " + " -> ".join(path[path.index(m):] + [m])
        if m in done:
            return
        path.append(m)
        for dep in sorted(graph[m]):
            visit(dep)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)
