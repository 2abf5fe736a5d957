"""The comparison helper must be able to fail: a suite that cannot fail proves nothing."""
import numpy as np
import pytest
import torch

from gpt2np.backends.torch_reference import TorchGPT
from gpt2np import GPT, GPTConfig
from gradcheck import assert_close, assert_grads_close, rel_error


def test_helper_catches_a_1e6_relative_perturbation_of_a_real_gradient():
    cfg = GPTConfig(block_size=8, vocab_size=20, n_layer=2, n_head=2, n_embd=8)
    model = GPT(cfg, dtype="float64", seed=0)
    rng = np.random.default_rng(0)
    idx, targets = rng.integers(0, 20, (2, 8)), rng.integers(0, 20, (2, 8))
    model.forward(idx, targets)
    grads = model.backward()
    ref = TorchGPT.from_params(cfg, model.state_dict(), dtype=torch.float64)
    ref(torch.from_numpy(idx), torch.from_numpy(targets))[1].backward()
    expected = ref.grads()
    assert_grads_close(grads, expected, 1e-10)  # the unperturbed gradients pass...
    for name in grads:  # ...and each tensor, nudged by 1e-6 relative in one entry, fails
        bad = dict(grads)
        g = grads[name].copy()
        i = np.argmax(np.abs(g))
        g.reshape(-1)[i] *= 1 + 1e-6
        bad[name] = g
        with pytest.raises(AssertionError, match=name):
            assert_grads_close(bad, expected, 1e-10)


def test_helper_fails_on_nan_shape_and_missing_keys():
    with pytest.raises(AssertionError):
        assert_close(np.array([np.nan]), np.array([1.0]), 1e-3)
    with pytest.raises(ValueError, match="shape"):
        rel_error(np.zeros(3), np.zeros(4))
    with pytest.raises(AssertionError, match="keys"):
        assert_grads_close({"a": np.zeros(1)}, {"b": np.zeros(1)}, 1.0)
    assert rel_error(np.array([1.0, 2.0]), np.array([1.0, 2.0])) == 0.0


def test_gradcheck_report_runs_and_shows_float64_agreement():
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "..", "examples", "gradcheck_report.py")
    out = subprocess.run([sys.executable, script, "--seeds", "1"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = [line.split() for line in out.stdout.splitlines()[2:]]
    assert len(rows) == 8
    for row in rows:
        f64, f32 = float(row[-2]), float(row[-1])
        assert f64 < 1e-10 and f32 < 1e-4, row
