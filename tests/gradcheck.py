"""The tools the gradient tests share: a strict comparison, finite differences, torch glue."""
from __future__ import annotations

import numpy as np
import torch

from gpt2np.evals.gradcheck import rel_error  # noqa: F401 (the tests' one comparison)


def assert_close(actual, expected, rtol, name=""):
    err = rel_error(actual, expected)
    if not err <= rtol:  # `not <=` so that nan fails too
        raise AssertionError(f"{name}: relative error {err:.3e} > {rtol:.1e}")
    return err


def assert_grads_close(actual: dict, expected: dict, rtol, what=""):
    """Every key present on both sides, every tensor within rtol. Returns the worst error."""
    if set(actual) != set(expected):
        raise AssertionError(f"{what} gradient keys differ: only ours {sorted(set(actual) - set(expected))[:5]}, "
                             f"only expected {sorted(set(expected) - set(actual))[:5]}")
    return max(assert_close(actual[k], expected[k], rtol, f"{what} {k}") for k in expected)


def finite_diff(f, x: np.ndarray, dout: np.ndarray, h=1e-5, n_probe=None, rng=None):
    """Central differences of L(x) = sum(f(x) * dout) w.r.t. x (float64).

    With n_probe, only that many randomly chosen entries are probed (the rest left nan);
    returns (grad estimate, probed flat indices).
    """
    x = x.astype(np.float64)
    flat = x.reshape(-1)
    idx = np.arange(flat.size)
    if n_probe is not None and n_probe < flat.size:
        idx = (rng or np.random.default_rng(0)).choice(flat.size, n_probe, replace=False)
    grad = np.full(flat.size, np.nan)
    for i in idx:
        old = flat[i]
        flat[i] = old + h
        lp = float(np.sum(f(x) * dout))
        flat[i] = old - h
        lm = float(np.sum(f(x) * dout))
        flat[i] = old
        grad[i] = (lp - lm) / (2 * h)
    return grad.reshape(x.shape), idx


def torch_grads(f, inputs: dict, dout: np.ndarray):
    """Autograd of sum(f(**inputs) * dout) w.r.t. every float input; returns (out, grads)."""
    tin = {}
    for k, v in inputs.items():
        t = torch.from_numpy(np.array(v))
        if t.is_floating_point():
            t.requires_grad_(True)
        tin[k] = t
    out = f(**tin)
    (out * torch.from_numpy(np.asarray(dout))).sum().backward()
    grads = {k: t.grad.numpy() for k, t in tin.items() if t.is_floating_point()}
    return out.detach().numpy(), grads
