"""Check a model's hand-written gradients on real text: torch autograd and finite differences.

    gpt2np gradcheck --model M [--text FILE | --data-shards DIR] [-B N] [-T N]
                               [--fd K] [--seed S] [--json OUT]
    gpt2np gradcheck ...                                                  (the same)

M is anything `gpt2np.from_pretrained` takes: a Hugging Face name or folder, or a training
run. One batch of real text (the first B*T+1 tokens of tiny Shakespeare by default, or of
--text FILE, or of the token shards in --data-shards) goes through the model in float64:
  1. the hand-written backward (gpt2np.GPT.backward);
  2. PyTorch autograd on the same params and batch (gpt2np.backends.torch_reference.TorchGPT), the
     oracle: every tensor's relative error max|ours - torch| / max|torch| must be <= 1e-9;
  3. central finite differences of the loss on K sampled entries of every tensor, an oracle
     independent of torch: each entry's |fd - ours| must be within the tolerance that the
     error model of the difference quotient gives for it (`fd_tolerance`), so that a correct
     gradient cannot fail however curved or badly scaled the loss is there.
A table gives both errors per tensor (the finite-difference one, and its tolerance, relative
to the tensor's largest gradient); the exit status is 1 if any tensor is over either
tolerance, and the failing tensors are named. --json writes
{"worst_rel_err", "tensors": {name: rel_err}, "fd": {name: err}, "fd_tol": {name: tol}} (and
a little more).

Cost: one float64 forward+backward each for gpt2np and torch, plus 4*K perturbed forwards
per tensor for the finite differences (steps of h and 2h each way). A perturbed entry of
block i only changes blocks i.. onwards: its block runs from block i's cached input, and the
blocks after it run once for all the perturbations of block i's tensors, stacked as one batch
(wte and wpe need whole forwards). GPT-2 124M at the default B=1, T=32, K=1 (148 tensors):
see docs/performance.md.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from gpt2np import layers as L
from gpt2np.errors import UsageError
from gpt2np.model import block_forward, sub_params

TOLERANCE = 1e-9  # vs torch autograd, both float64: agreement near machine precision
FD_STEP = 1e-5  # h of the central differences (see fd_tolerance)
# Rounding of one float64 evaluation of the loss, in units of eps * scale (see fd_tolerance)
FD_ROUNDING = 64
EPS = float(np.finfo(np.float64).eps)
DEFAULT_B, DEFAULT_T = 1, 32


@dataclass
class GradcheckResult:
    """What check_gradients found; errors are scale-free (relative to the tensor's largest)."""
    loss: float  # gpt2np's float64 loss on the batch
    torch_loss: float
    tensors: dict[str, float]  # name -> relative error vs torch autograd
    fd: dict[str, float]  # name -> finite-difference error at its worst entry (empty with fd=0)
    fd_tol: dict[str, float]  # name -> that entry's tolerance (fd_tolerance), same units
    shapes: dict[str, tuple]
    fd_entries: int  # entries probed per tensor (fewer where a tensor is smaller)
    seconds: dict[str, float] = field(default_factory=dict)
    tolerance: float = TOLERANCE

    @property
    def worst_rel_err(self) -> float:
        return max(self.tensors.values())

    @property
    def worst_fd_err(self) -> float | None:
        """The largest finite-difference error (relative), None without finite differences."""
        return max(self.fd.values()) if self.fd else None

    @property
    def worst_fd_ratio(self) -> float | None:
        """The largest finite-difference error / its tolerance (<= 1 passes), or None."""
        return max(fd_ratio(e, self.fd_tol[k]) for k, e in self.fd.items()) if self.fd else None

    def failures(self) -> list[str]:
        """Names of the tensors over a tolerance (nan counts as over), in the params' order."""
        return [k for k, e in self.tensors.items()
                if not e <= self.tolerance or (k in self.fd and fd_ratio(self.fd[k], self.fd_tol[k]) > 1)]

    def to_json(self) -> dict:
        return {"worst_rel_err": self.worst_rel_err, "worst_fd_err": self.worst_fd_err,
                "worst_fd_ratio": self.worst_fd_ratio, "tolerance": self.tolerance, "loss": self.loss, "torch_loss": self.torch_loss,
                "fd_entries": self.fd_entries, "failures": self.failures(),
                "seconds": self.seconds, "tensors": self.tensors, "fd": self.fd,
                "fd_tol": self.fd_tol}


def rel_error(actual, expected) -> float:
    """max |actual - expected| / max |expected|: one scale-free number per tensor (absolute if
    expected is all zero). The shapes must be equal: a ValueError names them otherwise."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        raise ValueError(f"shape {actual.shape} != expected {expected.shape}")
    err = float(np.max(np.abs(actual - expected))) if expected.size else 0.0
    scale = float(np.max(np.abs(expected))) if expected.size else 0.0
    return err / scale if scale > 0 else err


# ------------------------------------------------------------------------ the batch


def batch_from_text(path, B: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) int64 (B, T): the first B*T+1 GPT-2 tokens of a text file, y shifted by one.
    Only as much of the file as needed is read and tokenized."""
    from gpt2np.data.shakespeare import decode_text
    from gpt2np.data.tokenizer import encode

    need = B * T + 1
    path = Path(path)
    size = path.stat().st_size
    n_bytes = 8 * need + 4096  # English averages ~4 bytes per token: twice that, and more
    while True:
        with open(path, "rb") as f:
            raw = f.read(n_bytes)
        whole = len(raw) >= size
        if not whole:  # end at a line: the cut may split a word or a UTF-8 character
            raw = raw[:raw.rfind(b"\n") + 1]
        ids = encode(decode_text(raw, path))  # as training reads text: binary refused
        if len(ids) >= need or whole:
            break
        n_bytes *= 4
    if len(ids) < need:
        raise ValueError(f"{path} holds {len(ids)} GPT-2 tokens, fewer than B*T+1 = {need}: "
                         f"use a smaller -B/-T or a longer text")
    buf = np.asarray(ids[:need], dtype=np.int64)
    return buf[:-1].reshape(B, T), buf[1:].reshape(B, T)


def batch_from_shards(data_dir, B: int, T: int) -> tuple[np.ndarray, np.ndarray]:
    """The first batch of the shards' validation split (or of the train split if none)."""
    from gpt2np.data.shards import ShardLoader, list_shards

    try:
        list_shards(data_dir, "val")
        split = "val"
    except FileNotFoundError:
        split = "train"  # list_shards below says clearly if there is none of either
    return ShardLoader(str(data_dir), B, T, split=split).next_batch()


def _check_batch(x, config):
    B, T = x.shape
    if T > config.block_size:
        raise UsageError(f"-T {T} is longer than the model's block size {config.block_size}")
    top = int(x.max())
    if top >= config.vocab_size:
        raise ValueError(f"the batch holds token id {top}, but the model's vocabulary has "
                         f"{config.vocab_size} entries: it does not read GPT-2 tokens; pass "
                         f"--data-shards with ids below {config.vocab_size}")


# ------------------------------------------------------------------------ the checks


def torch_reference(config, params: dict, x, y) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and gradients of gpt2np.backends.torch_reference.TorchGPT (autograd) in float64."""
    try:
        import torch

        from gpt2np.backends.torch_reference import TorchGPT
    except ImportError as e:
        raise RuntimeError(f"gradcheck needs PyTorch, the autograd oracle ({e}): "
                           f"pip install 'gpt2np[torch]'") from e
    ref = TorchGPT.from_params(config, {k: np.asarray(v, dtype=np.float64)
                                        for k, v in params.items()}, dtype=torch.float64)
    _, loss = ref(torch.from_numpy(x), torch.from_numpy(y))
    loss.backward()
    return loss.item(), ref.grads()


class _SuffixLoss:
    """The float64 losses of the model's forward under perturbations of one parameter entry
    each, restarted where a perturbation takes effect and batched after it.

    The inputs of every block and of ln_f are kept from one clean forward. A perturbation
    of block i changes that block's output only through block i itself: each perturbed
    block i runs alone on block i's input, and the blocks after it, ln_f and the lm_head run
    once for all of them, their outputs stacked on the batch axis (so do those of ln_f).
    wte and wpe (the embedding, and wte the lm_head too) run whole forwards, one each. Uses
    the model's params in place: each entry is set, used and restored exactly.
    """

    def __init__(self, model, x, y):
        self.p, self.cfg, self.x, self.y = model.params, model.config, x, y
        self.inputs = [None] * (self.cfg.n_layer + 1)  # block inputs, then ln_f's
        h = self._embed()
        for i in range(self.cfg.n_layer):
            self.inputs[i] = h
            h = self._block(i, h)
        self.inputs[self.cfg.n_layer] = h
        logits, _ = L.lm_head_forward(self._ln_f(h), self.p["transformer.wte.weight"])
        # the size of the log-sum-exp and the target's logit, which cancel in the loss
        self.logit_scale = float(np.max(np.abs(logits)))
        self.clean = float(L.cross_entropy_forward(logits, self.y)[0])  # the unperturbed loss

    @staticmethod
    def start_of(name: str, n_layer: int) -> int:
        """-1: the embedding; i: block i; n_layer: ln_f."""
        if name.startswith("transformer.h."):
            return int(name.split(".")[2])
        return n_layer if name.startswith("transformer.ln_f.") else -1

    def _embed(self):
        h, _ = L.embedding_forward(self.x, self.p["transformer.wte.weight"],
                                   self.p["transformer.wpe.weight"])
        return h

    def _block(self, i, h):
        h, _ = block_forward(L.REFERENCE_OPS, h, sub_params(self.p, f"transformer.h.{i}."),
                             self.cfg.n_head)
        return h

    def _ln_f(self, h):
        h, _ = L.layernorm_forward(h, self.p["transformer.ln_f.weight"],
                                   self.p["transformer.ln_f.bias"])
        return h

    def losses(self, start: int, changes) -> list[float]:
        """The loss with each change applied alone: changes are (flat view of a param that
        takes effect at `start`, index, value)."""
        n_layer = self.cfg.n_layer
        outs = []
        for flat, j, value in changes:  # the part each change alters, alone
            old = flat[j]
            flat[j] = value
            try:
                if start < 0:  # the embedding, and the tied lm_head: the whole forward
                    h = self._embed()
                    for i in range(n_layer):
                        h = self._block(i, h)
                    outs.append(self._head(self._ln_f(h))[0])
                elif start < n_layer:
                    outs.append(self._block(start, self.inputs[start]))
                else:
                    outs.append(self._ln_f(self.inputs[n_layer]))
            finally:
                flat[j] = old  # restored exactly: the same float64 value
        if start < 0:
            return outs
        h = np.concatenate(outs)  # (changes * B, T, C): what follows runs once for all
        for i in range(start + 1, n_layer) if start < n_layer else ():
            h = self._block(i, h)
        return self._head(self._ln_f(h) if start < n_layer else h)

    def _head(self, h) -> list[float]:
        # h (G*B,T,C) after ln_f -> the mean loss of each group of B rows, in groups of
        # rows whose float64 logits stay under 64 MB
        B, T = self.y.shape
        wte = self.p["transformer.wte.weight"]
        per = max(1, (64 << 20) // (B * T * wte.shape[0] * wte.itemsize))
        out = []
        for g in range(0, h.shape[0] // B, per):
            rows = h[g * B:(g + per) * B]
            logits, _ = L.lm_head_forward(rows, wte)
            for k in range(rows.shape[0] // B):
                loss, _ = L.cross_entropy_forward(logits[k * B:(k + 1) * B], self.y)
                out.append(float(loss))
        return out


# Perturbations evaluated together after the block they change: their stacked activations
# stay under ~100 MB for GPT-2 small at T = 32
FD_BATCH_ROWS = 4096


# ------------------------------------------------------------------------ finite differences


def fd_points(x0: float, h: float = FD_STEP) -> tuple[float, float, float, float]:
    """The values an entry x0 takes for central_difference: x0 + h, x0 - h, x0 + 2h, x0 - 2h."""
    return x0 + h, x0 - h, x0 + 2 * h, x0 - 2 * h


def fd_estimate(points, losses) -> tuple[float, float]:
    """(D(h), |D(2h) - D(h)|) from the losses at fd_points: the central difference and the
    truncation allowance that fd_tolerance takes.

    D(s) = (loss(x0 + s) - loss(x0 - s)) / ((x0 + s) - (x0 - s)): the divisor is the step as
    stored, not 2s (an entry of size |x0| holds x0 + s only to eps * |x0|).
    """
    d1 = (losses[0] - losses[1]) / (points[0] - points[1])
    d2 = (losses[2] - losses[3]) / (points[2] - points[3])
    return d1, abs(d2 - d1)


def central_difference(loss_at: Callable[[float], float], x0: float,
                       h: float = FD_STEP) -> tuple[float, float]:
    """fd_estimate of loss_at(v), a float64 loss with one entry set to v, around x0."""
    points = fd_points(x0, h)
    return fd_estimate(points, [loss_at(v) for v in points])


def fd_tolerance(truncation: float, scale: float, h: float = FD_STEP) -> float:
    """How far a central difference D(h) may be from the derivative it estimates:
    `truncation` (central_difference's |D(2h) - D(h)|) + FD_ROUNDING * EPS * scale / h.

    The error model. Let phi(t) be the loss with one entry moved by t, and rho(t) the float64
    rounding error of evaluating it, |rho| <= Delta. By Taylor's theorem
        D(s) = phi' + c3 s^2 + c5 s^4 + ... + r(s),  c3 = phi'''/6, c5 = phi^(5)/120,
    where r(s) = (rho(s) - rho(-s)) / 2s is the rounding, |r(s)| <= Delta / s. Then
    D(2h) - D(h) = 3 c3 h^2 + 15 c5 h^4 + r(2h) - r(h), and eliminating c3,
        D(h) - phi' = (D(2h) - D(h)) / 3 - 4 c5 h^4 - r(2h) / 3 + 4 r(h) / 3,
        |D(h) - phi'| <= |D(2h) - D(h)| / 3 + 4 |c5| h^4 + 1.5 Delta / h.
    Truncation: the allowance |D(2h) - D(h)| is three times the measured h^2 term, which
    covers the h^4 term while h is well inside the distance over which the loss changes
    character (h^2 |phi^(5)| < 10 |phi'''|: LayerNorm's standard deviation, the gaps between
    softmax logits are far above h = 1e-5). It is measured, not assumed: a sharply curved
    loss (a near-constant LayerNorm row, whose k-th derivative grows like std^-k) gets the
    allowance its curvature needs, and a gentle one keeps the check tight.
    Rounding: the layers are backward stable (matmuls, sums, exp, tanh, sqrt): a float64
    evaluation is the exact loss of inputs and intermediate results moved by a few eps
    relative each. So Delta is a modest multiple of EPS * scale, where `scale` is the size
    of what the loss is computed from: |loss| (or sum |output * dout|) plus sum |x * dL/dx|
    over the inputs, their condition, which carries the cancellations (x - mean in a
    LayerNorm of a near-constant row, lse - logit in a confident cross-entropy). The
    multiple, FD_ROUNDING / 1.5 = 42, covers the tens of dependent operations per element.
    With h = 1e-5 the rounding allowance is 1.4e-9 * scale: far below the gradient errors
    that matter.
    """
    return truncation + FD_ROUNDING * EPS * scale / h


def fd_ratio(error: float, tolerance: float) -> float:
    """error / tolerance: <= 1 passes; inf for a nan error (or a nonzero one over a zero
    tolerance)."""
    if error == 0:
        return 0.0
    ratio = error / tolerance if tolerance > 0 else np.inf
    return ratio if ratio == ratio else np.inf


def finite_differences(model, x, y, grads: dict, k: int, seed: int = 0,
                       h: float = FD_STEP) -> tuple[dict[str, float], dict[str, float]]:
    """Per tensor, over k sampled entries: (errors, tolerances), |central difference - grads|
    and its fd_tolerance at the entry where their ratio is the worst, both divided by the
    tensor's max|grads| (as they are if that is 0). A tensor passes if error <= tolerance."""
    # The forwards see one short batch: their GEMMs are small, so one BLAS thread runs them
    # faster than several (handing such small products to other threads costs more)
    with model.backend.serial_blas():
        return _finite_differences(model, _SuffixLoss(model, x, y), grads, k, seed, h)


def _finite_differences(model, f, grads, k, seed, h):
    rng = np.random.default_rng(seed)
    # a perturbed entry changes every computation downstream of it: the rounding scale is the
    # loss, the logits it cancels from, and its sensitivity to every parameter (fd_tolerance)
    scale = abs(f.clean) + f.logit_scale + sum(float(np.sum(np.abs(p * grads[name])))
                                               for name, p in model.params.items())
    probes = {name: rng.choice(p.size, min(k, p.size), replace=False)
              for name, p in model.params.items()}
    by_start = {}  # the tensors that take effect at one place: their probes run together
    for name in model.params:
        by_start.setdefault(f.start_of(name, model.config.n_layer), []).append(name)
    per = max(1, FD_BATCH_ROWS // (4 * f.x.size))  # probed entries per evaluation
    worst = {name: (-1.0, 0.0, 0.0) for name in model.params}  # (error / tol, error, tol)
    for start, names in by_start.items():
        probe = [(name, int(j)) for name in names for j in probes[name]]
        for c in range(0, len(probe), per):
            chunk, changes = probe[c:c + per], []
            for name, j in chunk:
                flat = model.params[name].reshape(-1)  # a view: perturbs the param in place
                changes += [(flat, j, v) for v in fd_points(flat[j], h)]
            losses = f.losses(start, changes)
            for i, (name, j) in enumerate(chunk):
                estimate, truncation = fd_estimate([v for _, _, v in changes[4 * i:4 * i + 4]],
                                                   losses[4 * i:4 * i + 4])
                g = float(np.asarray(grads[name]).reshape(-1)[j])
                err, tol = abs(estimate - g), fd_tolerance(truncation, scale, h)
                if fd_ratio(err, tol) > worst[name][0]:
                    worst[name] = (fd_ratio(err, tol), err, tol)
    errors, tolerances = {}, {}
    for name in model.params:
        norm = float(np.max(np.abs(np.asarray(grads[name], dtype=np.float64)))) or 1.0
        errors[name], tolerances[name] = worst[name][1] / norm, worst[name][2] / norm
    return errors, tolerances


def check_gradients(model, x, y, fd: int = 1, seed: int = 0) -> GradcheckResult:
    """Compare model's hand-written gradients on batch (x, y) with torch autograd and with
    finite differences on `fd` entries per tensor; everything in float64 on the CPU."""
    from gpt2np.model import GPT

    if model.backend.name != "numpy" or model.dtype != "float64":
        model = GPT(model.config, backend="numpy", dtype="float64", params=model.state_dict())
    x, y = np.asarray(x, dtype=np.int64), np.asarray(y, dtype=np.int64)
    _check_batch(x, model.config)
    seconds = {}
    t0 = time.perf_counter()
    _, loss = model.forward(x, y)
    ours = {k: np.array(g) for k, g in model.backward().items()}  # copies: buffers get reused
    seconds["gpt2np"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    torch_loss, expected = torch_reference(model.config, model.params, x, y)
    seconds["torch"] = time.perf_counter() - t0
    tensors = {k: rel_error(ours[k], expected[k]) for k in model.params}
    fd_errors, fd_tol = {}, {}
    if fd > 0:
        t0 = time.perf_counter()
        fd_errors, fd_tol = finite_differences(model, x, y, ours, fd, seed)
        seconds["finite_differences"] = time.perf_counter() - t0
    return GradcheckResult(loss=float(loss), torch_loss=torch_loss, tensors=tensors,
                           fd=fd_errors, fd_tol=fd_tol,
                           shapes={k: tuple(p.shape) for k, p in model.params.items()},
                           fd_entries=fd, seconds=seconds)
