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


def assert_fd_close(f, x: np.ndarray, dout, grad, *, n_probe=None, rng=None, scale=0.0,
                    name="") -> float:
    """Oracle 2: `grad` (dL/dx, the backward under test) against central differences of
    L(x) = sum(f(x) * dout), float64, on n_probe random entries (all without n_probe).

    Each entry passes if |grad - D(h)| <= fd_tolerance (gpt2np.evals.gradcheck, where the
    error model is derived): the truncation measured from D(2h) - D(h), plus the rounding of
    two float64 evaluations of L, FD_ROUNDING * eps * S / h. S is the size of what L is
    computed from, the sum of
      - sum |f(x) * dout|: the output's own rounding;
      - sum |x * grad|: the inputs' condition, a relative eps move of every input; it carries
        the cancellations inside f that the inputs' size drives (x - mean in LayerNorm,
        scaled by 1/std for a near-constant row);
      - max|x| * sum |dout|: intermediate results of the inputs' size that cancel to a
        smaller output (lse - logit in a confident cross-entropy, 0.5 x (1 + tanh u) in GELU
        for x << 0): each output may carry an error of eps * max|x|;
      - `scale`: anything else the caller knows f computes before a cancellation.
    The tolerance does not depend on `grad` beyond the eps-sized condition term: a wrong
    gradient cannot loosen its own check. So a correct gradient cannot fail, however curved
    L is at x, and an error of ~1e-6 relative still does.

    Returns the closest call, max over the entries of error / tolerance (<= 1).
    """
    from gpt2np.evals.gradcheck import central_difference, fd_ratio, fd_tolerance

    x = np.array(x, dtype=np.float64)  # a copy: perturbed in place
    dout = np.asarray(dout, dtype=np.float64)
    grad = np.asarray(grad, dtype=np.float64)
    if grad.shape != x.shape:
        raise AssertionError(f"{name}: gradient shape {grad.shape} != input shape {x.shape}")
    flat, g = x.reshape(-1), grad.reshape(-1)
    S = float(np.sum(np.abs(f(x) * dout)) + np.sum(np.abs(x * grad))
              + np.max(np.abs(x), initial=0.0) * np.sum(np.abs(dout))) + scale
    idx = np.arange(flat.size)
    if n_probe is not None and n_probe < flat.size:
        idx = (rng or np.random.default_rng(0)).choice(flat.size, n_probe, replace=False)
    worst, report = 0.0, ""
    for i in idx:
        old = flat[i]

        def loss_at(value, i=i):
            flat[i] = value
            return float(np.sum(f(x) * dout))

        estimate, truncation = central_difference(loss_at, old)
        flat[i] = old
        err, tol = abs(g[i] - estimate), fd_tolerance(truncation, S)
        if fd_ratio(err, tol) >= worst:
            worst = fd_ratio(err, tol)
            report = (f"{name} vs finite differences: entry {np.unravel_index(i, x.shape)}: "
                      f"grad {g[i]:.17g}, central difference {estimate:.17g}: error {err:.3e} > "
                      f"tolerance {tol:.3e} (truncation {truncation:.3e}, scale {S:.3e})")
    if not worst <= 1.0:
        raise AssertionError(report)
    return worst


def finite_diff(f, x: np.ndarray, dout: np.ndarray, h=1e-5, n_probe=None, rng=None):
    """Central differences of L(x) = sum(f(x) * dout) w.r.t. x (float64): the estimates
    alone, without a tolerance (assert_fd_close compares with one derived from the error
    model).

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
