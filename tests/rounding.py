"""float32's error model for the tests that compare float32 (or TF32, bf16) results with a
float64 oracle: each example's tolerance is measured on that example, not fixed.

Why not a fixed tolerance. Every float32 operation rounds its exact result by a relative
u = 2^-24 at most, but how far those errors move an output depends on the example: on its
scale, its depth, its conditioning (a near-constant LayerNorm row, near-equal logits, a
gradient that is a cancelling sum). A fixed bound is loose for most examples and, for the
badly conditioned ones hypothesis finds, tighter than float32 allows: a correct model fails.

The error model. The layers are backward stable (matmuls, sums, exp, tanh, sqrt): a float32
evaluation is the exact evaluation with its inputs, parameters and intermediate results each
moved by a few u relative. `Rounding` makes such moves on purpose, in float64 (whose own
rounding is 2^29 times smaller): every parameter, every float input and output of every
layer function and every matmul operand is moved by eps = 2^-23 = 2u relative, each entry up
or down at random. `sensitivity` runs DRAWS such evaluations and keeps, per tensor, the
largest rel_error from the exact result: the spread float32's rounding can cause on this
example (Monte Carlo arithmetic: D. S. Parker, "Monte Carlo arithmetic", 1997). A float32
result passes within SAFETY times that spread, or times eps where the spread is smaller (a
float32 result holds even its largest entry only to u).

Where a layer cancels what the moves of its inputs cannot reach, the move says so: the
cross-entropy's loss is lse - logit[target] and its target gradient p - 1, differences of
terms float32 rounds first (see Rounding.ops).

What SAFETY = 16 covers:
  - a layer rounds at several operations between its moved inputs and outputs (a K-term
    sum, LayerNorm's mean, variance and scaling, the softmax's exp and sum): their errors add
    up to a few moves' worth, mostly in random directions, so like the square root of
    their count. Each move is already a full 2u, twice the worst rounding. (A sum in a
    plain loop over n terms grows its error like sqrt(n) moves: thousands of terms, the
    most these tests sum in one loop, stay well inside the margin.)
  - random moves can, by chance, point away from the direction an output is most sensitive
    to: the largest of DRAWS = 10 independent draws falls below a tenth of its typical size
    only with a probability like 0.1^10 (for a Gaussian spread).
The tolerance depends only on the float64 computation, never on the results under test; a
float32 path that errs further than float32's rounding can (a bf16 rounding where float32
belongs, a dropped term) still fails: tests/test_precision.py checks that tf32's and bf16's
results fail float32's tolerance.

TF32 and bf16 matmuls round their operands to 10 and 7 mantissa bits, once per operand:
`Rounding(operand_eps=OPERAND_EPS[precision])` moves every matmul operand by that rounding,
everything else by eps: bf16 by 2^-8, its largest rounding to nearest (as to_bf16 and the
CPU's emulation round); TF32 by 2^-10, a whole unit in its last place, which covers
truncation too (how a GPU's tensor cores shorten float32 operands is theirs to choose).

A matmul alone has a rigorous bound instead: `assert_matmul_close`.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from gpt2np import layers as L
from gpt2np.evals.gradcheck import rel_error

EPS32 = 2.0 ** -23  # float32's machine epsilon: 2u, twice its largest relative rounding
OPERAND_EPS = {"fp32": EPS32, "tf32": 2.0 ** -10, "bf16": 2.0 ** -8}
DRAWS = 10
SAFETY = 16


def _is_float_array(a) -> bool:
    return isinstance(a, (np.ndarray, np.floating)) and a.dtype.kind == "f"


class Rounding:
    """Random relative moves of float64 values where float32 arithmetic would round them.

    r(a)            a copy of a float array with each entry moved by eps relative, up or
                    down at random (anything else comes back as it is);
    r.ops(base)     `base`'s layer functions (a LayerOps), each with its positional float
                    inputs and its outputs moved (caches, ints and keywords as they are);
    r.matmul(a, b)  a GEMM (for `L.matmul_precision(p, r)`) that moves both operands by
                    operand_eps first;
    r.apply(model)  a float64 GPT with its params moved in place, its ops and its GEMMs
                    those above.
    """

    def __init__(self, seed, eps: float = EPS32, operand_eps: float = EPS32):
        self.rng = np.random.default_rng(seed)
        self.eps, self.operand_eps = eps, operand_eps

    def __call__(self, a, eps: float | None = None):
        if not _is_float_array(a):
            return a
        return np.asarray(a) * (1.0 + (self.eps if eps is None else eps) * self._signs(a))

    def _signs(self, a):
        return 2.0 * self.rng.integers(0, 2, np.shape(a)) - 1.0

    def ops(self, base: L.LayerOps = L.REFERENCE_OPS) -> L.LayerOps:
        def moved(fn, forward):
            def call(*args, **kwargs):
                result = fn(*[self(a) for a in args], **kwargs)
                if forward:  # (out, cache): the cache is the function's own business
                    return (self(result[0]),) + tuple(result[1:])
                if isinstance(result, tuple):
                    return tuple(self(g) for g in result)
                return self(result)
            return call

        fns = {f.name: moved(getattr(base, f.name), f.name.endswith("_forward"))
               for f in dataclasses.fields(base)}
        fns["cross_entropy_forward"] = self._cross_entropy(fns["cross_entropy_forward"])
        fns["cross_entropy_backward"] = self._cross_entropy_grad(fns["cross_entropy_backward"])
        return dataclasses.replace(base, **fns)

    # The cross-entropy cancels what its inputs' moves cannot reach: float32 rounds each
    # row's log-sum-exp (|lse| <= max|logits| + log V) and the target's logit before the
    # loss, their difference, may be small; and it rounds p = exp(logit - lse), with lse's
    # error, before the target's p - 1 may be small (a confident, correct row). In the moved
    # float64 evaluation those cancel exactly. So the loss also moves by eps times the size
    # of those terms, and each dlogits entry w p (w the row's weight) by eps (1 + |lse|) w p.

    def _cross_entropy(self, forward):
        def call(logits, targets, ignore_index=-1, **kwargs):
            loss, cache = forward(logits, targets, ignore_index, **kwargs)
            x = np.asarray(logits, dtype=np.float64)
            t = np.asarray(targets)
            valid = t != ignore_index
            w = valid / max(int(valid.sum()), 1)  # (B,T) each row's weight in the mean
            m = x.max(axis=-1, keepdims=True)
            p = np.exp(x - m)
            s = p.sum(axis=-1, keepdims=True)
            lse = (np.log(s) + m)[..., 0]  # (B,T)
            logit = np.take_along_axis(x, np.where(valid, t, 0)[..., None], -1)[..., 0]
            terms = np.sum(w * (np.abs(lse) + np.abs(logit)))
            self._ce_grad_size = ((1 + np.abs(lse)) * w)[..., None] * (p / s)
            return loss + self.eps * self._signs(loss) * terms, cache
        return call

    def _cross_entropy_grad(self, backward):
        def call(dloss, cache, **kwargs):
            d = backward(dloss, cache, **kwargs)
            return d + self.eps * self._signs(d) * abs(float(dloss)) * self._ce_grad_size
        return call

    def matmul(self, a, b, out=None, precision="fp32"):
        return np.matmul(self(a, self.operand_eps), self(b, self.operand_eps), out=out)

    @staticmethod
    def matmul_operand(x, precision="fp32"):
        return x

    def apply(self, model):
        """Move a float64 numpy GPT's params, and route its layers and GEMMs through here."""
        assert model.dtype == "float64" and model.backend.name == "numpy"
        for p in model.params.values():
            p[...] = self(p)
        model.ops = self.ops(model.ops)
        model.backend = _RoundedGemms(model.backend, self)
        return model


class _RoundedGemms:
    """A backend whose matmuls are a Rounding's: the model sets its backend as the GEMM of
    every forward and backward (L.matmul_precision), so that is where the moves go in."""

    def __init__(self, backend, rounding: Rounding):
        self.inner = backend
        self.matmul, self.matmul_operand = rounding.matmul, rounding.matmul_operand

    def __getattr__(self, name):
        return getattr(self.inner, name)


def sensitivity(compute, *, draws: int = DRAWS, seed=0, eps: float = EPS32,
                operand_eps: float = EPS32) -> tuple[dict, dict]:
    """(exact, spread): compute(None), the float64 results {name: array}, and per name the
    largest rel_error from them of compute(r) over `draws` Roundings r (the same moves for
    the same seed). compute(r) must apply r wherever float32 would round, and return copies
    (not buffers that a later call overwrites)."""
    exact = {k: np.asarray(v, dtype=np.float64) for k, v in compute(None).items()}
    spread = dict.fromkeys(exact, 0.0)
    for d in range(draws):
        moved = compute(Rounding([seed, d], eps, operand_eps))
        for k, v in exact.items():
            spread[k] = max(spread[k], rel_error(moved[k], v))
    return exact, spread


def tolerance(spread: float) -> float:
    """The largest rel_error float32's rounding explains, for a measured spread."""
    return SAFETY * max(spread, EPS32)


def assert_within_rounding(actual: dict, expected: dict, spread: dict, what: str = "",
                           sides: int = 1) -> float:
    """Every actual[k] within tolerance(spread[k]) of expected[k] (rel_error); sides=2 where
    both are rounded results (two float32 computations: each within its tolerance of the
    exact one). Returns the closest call, max error / tolerance (<= 1 passes)."""
    if set(actual) != set(expected) or set(expected) - set(spread):
        raise AssertionError(f"{what}: results differ in names: ours {sorted(actual)[:5]}, "
                             f"expected {sorted(expected)[:5]}")
    worst, report = 0.0, ""
    for k in expected:
        err, tol = rel_error(actual[k], expected[k]), sides * tolerance(spread[k])
        ratio = err / tol if err == err else np.inf  # nan fails
        if ratio >= worst:
            worst, report = ratio, (f"{what} {k}: relative error {err:.3e} > tolerance {tol:.3e} "
                                    f"({sides} x {SAFETY} x the float64 result's spread "
                                    f"{spread[k]:.3e} under float32-sized moves)")
    if not worst <= 1.0:
        raise AssertionError(report)
    return worst


def model_results(model, idx, targets) -> dict:
    """{"logits", "loss", every gradient}: one forward and backward, as float64 host copies."""
    logits, loss = model.forward(idx, targets)
    out = {"logits": logits, "loss": loss, **model.backward()}
    return {k: np.array(model.backend.to_host(v), dtype=np.float64) for k, v in out.items()}


def model_sensitivity(config, params: dict, idx, targets, precision: str = "fp32",
                      seed=0) -> tuple[dict, dict]:
    """sensitivity() of model_results for a GPT with `params` in `precision` (its matmul
    operands moved by OPERAND_EPS[precision]), computed by the float64 numpy model."""
    from gpt2np import GPT

    def compute(r):
        model = GPT(config, dtype="float64", params=params)
        return model_results(model if r is None else r.apply(model), idx, targets)

    return sensitivity(compute, seed=seed, operand_eps=OPERAND_EPS[precision])


def layer_sensitivity(name: str, args: list, dout, precision: str = "fp32",
                      **kwargs) -> tuple[dict, dict]:
    """sensitivity() of the reference layer `name` ("layernorm", "attention", ...): its
    forward of the positional `args` (and keyword `kwargs`, not moved), then its backward of
    `dout` (unless None), as {"out", "grad 0", "grad 1", ...} (the backward's in order)."""
    def compute(r):
        ops = L.REFERENCE_OPS if r is None else r.ops()
        with L.matmul_precision("fp32", r):  # r None: the current GEMM, the reference's
            out, cache = getattr(ops, f"{name}_forward")(*args, **kwargs)
            grads = () if dout is None else getattr(ops, f"{name}_backward")(dout, cache)
        grads = grads if isinstance(grads, tuple) else (grads,)
        return {"out": out, **{f"grad {i}": g for i, g in enumerate(grads)}}

    return sensitivity(compute, operand_eps=OPERAND_EPS[precision])


def gamma(n: int) -> float:
    """n u / (1 - n u), u = 2^-24: the relative error bound of n float32 products and sums
    (Higham, Accuracy and Stability of Numerical Algorithms, section 3.1)."""
    nu = n * EPS32 / 2
    return nu / (1 - nu)


def assert_matmul_close(c, a, b, operand_err: float = 0.0, bias=None, name: str = "") -> float:
    """c, a float32 product of a and b (float64 arrays, (...,M,K) and (...,K,N)), plus
    `bias` if given (added in float32 after the product), against the exact a @ b (+ bias)
    elementwise within the rigorous bound
        |c - a b| <= (2d + d^2 + g_K (1 + d)^2) (|a| |b|),  g_K = K u / (1 - K u),
    where d bounds the relative change of an operand on its way in (0 for operands used as
    they are; OPERAND_EPS["tf32"], one TF32 ulp, for an operand rounded or truncated to TF32)
    and g_K = gamma(K) bounds K float32 products and sums in any order and grouping; the
    bias's addition adds u |a b + bias|. Returns the closest call, max error / bound (<= 1 passes)."""
    u, d = EPS32 / 2, operand_err
    exact = a @ b
    bound = (2 * d + d * d + gamma(a.shape[-1]) * (1 + d) ** 2) * (np.abs(a) @ np.abs(b))
    if bias is not None:
        exact = exact + bias
        bound = (1 + u) * bound + u * np.abs(exact)
    err = np.abs(np.asarray(c, dtype=np.float64) - exact)
    ratio = float(np.max(err / np.where(bound > 0, bound, np.inf), initial=0.0))
    if not (ratio <= 1.0 and np.all(err[bound == 0] == 0)):
        raise AssertionError(f"{name}: error {np.max(err):.3e} past float32's rounding bound "
                             f"(closest call {ratio:.2f} of it)")
    return ratio
