"""AdamW with decay groups, global-norm gradient clipping, cosine LR with linear warmup.

All three match their PyTorch counterparts (torch.optim.AdamW, clip_grad_norm_, and
build-nanogpt's get_lr) step for step; tests check it in float64.
"""
from __future__ import annotations

import math

import numpy as np

from gpt2np.backends import backend_of

# Elements per block of the CPU update: 4 arrays of 64K float32 = 1 MB, in L2/L3
_ADAM_BLOCK = 1 << 16


class AdamW:
    """AdamW over a name -> array dict, updated in place.

    Weight decay applies only to tensors with ndim >= 2 (matmul weights and embeddings), not
    to biases and LayerNorm gains, as build-nanogpt's configure_optimizers does.
    """

    def __init__(self, params: dict, lr: float = 6e-4, betas=(0.9, 0.95), eps: float = 1e-8,
                 weight_decay: float = 0.1):
        for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
            _check_nonneg(name, value)
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2
                and all(_is_real(b) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
        self.params = params
        self.lr = lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.weight_decay = weight_decay
        self.t = 0  # steps taken
        first = next(iter(params.values()), None)
        self.backend = backend_of(first)  # every param on one backend, in one dtype
        self.xp = xp = self.backend.xp
        # the backend's fused update of every tensor at once, or None: _update's, per tensor
        self.fused_update = None if first is None else self.backend.adamw_update(first.dtype)
        self.m = {k: xp.zeros_like(p) for k, p in params.items()}  # first moment
        self.v = {k: xp.zeros_like(p) for k, p in params.items()}  # second moment
        self._scratch = {}  # dtype -> flat work array for step()

    def decays(self, name: str) -> bool:
        return self.params[name].ndim >= 2

    def step(self, grads: dict, lr: float | None = None):
        lr = self.lr if lr is None else _check_nonneg("lr", lr)
        missing = set(self.params) - set(grads)
        if missing:
            raise KeyError(f"grads lack {sorted(missing)[:5]}")
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        bias1 = 1.0 - b1 ** self.t
        bias2 = 1.0 - b2 ** self.t
        step_size = lr / bias1
        sqrt_bias2 = math.sqrt(bias2)
        if self._fused_step(grads, lr, step_size, sqrt_bias2):
            return
        xp = self.xp
        for name, p in self.params.items():
            decay = 1.0 - lr * self.weight_decay if self.decays(name) else 1.0
            # Flat views, walked in blocks that stay in cache on the CPU: the eleven in-place
            # ops below then cost one trip through memory for p, g, m and v, not eleven;
            # and the scratch is one small block, not a param-sized temporary.
            if not p.flags.c_contiguous:  # a flat view would be a copy: update it whole
                self._update(xp, p, grads[name], self.m[name], self.v[name], decay, step_size,
                             sqrt_bias2)
                continue
            p1, g1 = p.reshape(-1), grads[name].reshape(-1)
            m1, v1 = self.m[name].reshape(-1), self.v[name].reshape(-1)
            step = max(1, p1.size if xp is not np else _ADAM_BLOCK)
            for i in range(0, p1.size, step):
                self._update(xp, p1[i:i + step], g1[i:i + step], m1[i:i + step], v1[i:i + step],
                             decay, step_size, sqrt_bias2)

    def _fused_step(self, grads, lr, step_size, sqrt_bias2) -> bool:
        """The whole update in a few kernel launches, where the backend has a fused update
        (CuPy: a multi-tensor AdamW, same arithmetic as _update) and the arrays suit it
        (contiguous, one dtype); False otherwise."""
        if self.fused_update is None:
            return False
        names = list(self.params)
        dtype = self.params[names[0]].dtype
        if not all(self.params[n].flags.c_contiguous and grads[n].flags.c_contiguous
                   and self.params[n].dtype == grads[n].dtype == dtype for n in names):
            return False
        decays = [1.0 - lr * self.weight_decay if self.decays(n) else 1.0 for n in names]
        self.fused_update([self.params[n] for n in names], [grads[n] for n in names],
                          [self.m[n] for n in names], [self.v[n] for n in names], decays,
                          self.beta1, self.beta2, self.eps, step_size, sqrt_bias2)
        return True

    def _update(self, xp, p, g, m, v, decay, step_size, sqrt_bias2):
        b1, b2 = self.beta1, self.beta2
        tmp = self._scratch_like(p)
        if decay != 1.0:
            p *= decay  # decoupled weight decay, before the Adam step
        m *= b1
        xp.multiply(g, 1.0 - b1, out=tmp)
        m += tmp  # m = b1 * m + (1 - b1) * g
        v *= b2
        xp.multiply(g, g, out=tmp)
        tmp *= 1.0 - b2
        v += tmp  # v = b2 * v + (1 - b2) * g^2
        # p -= lr/bias1 * m / (sqrt(v)/sqrt(bias2) + eps), in torch's order of operations
        xp.sqrt(v, out=tmp)
        tmp /= sqrt_bias2
        tmp += self.eps
        xp.divide(m, tmp, out=tmp)
        tmp *= step_size
        p -= tmp

    def _scratch_like(self, p):
        """A view of one flat scratch array (as big as the biggest block), shaped like p."""
        buf = self._scratch.get(p.dtype.str)
        if buf is None or buf.size < p.size:
            buf = self._scratch[p.dtype.str] = self.xp.empty(p.size, dtype=p.dtype)
        return buf[:p.size].reshape(p.shape)

    def load_state_dict(self, state: dict):
        """Take the moments m, v and the step count t of a checkpoint (host or device)."""
        for key in ("m", "v"):
            if set(state[key]) != set(self.params):
                raise ValueError(f"optimizer state {key!r} does not match the params' names")
            for name, value in state[key].items():
                if tuple(value.shape) != tuple(self.params[name].shape):
                    raise ValueError(f"optimizer state {key}[{name!r}] has shape "
                                     f"{tuple(value.shape)}, param has {tuple(self.params[name].shape)}")
                param = self.params[name]
                getattr(self, key)[name] = self.backend.asarray(value, dtype=param.dtype).copy()
        self.t = int(state["t"])


def _is_real(value) -> bool:
    # bool is an int, but True as a learning rate is surely a mistake
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def _check_nonneg(name: str, value, strict: bool = False):
    """value, if it is a finite real number >= 0 (> 0 if strict); else a ValueError naming the
    argument (a NaN would turn every parameter NaN at the first step)."""
    if not _is_real(value) or not math.isfinite(value) or value < 0 or (strict and value == 0):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} 0, "
                         f"got {value!r}")
    return value


def _check_count(name: str, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")


def global_grad_norm(grads: dict) -> float:
    """sqrt(sum of squares) over every gradient, the per-tensor sums added in float64.

    On the GPU the sums stay on the device and are added there: one transfer to the host
    per step instead of one synchronising transfer per tensor (148 for GPT-2)."""
    total = 0.0
    device_total = None
    backend = backend_of(next(iter(grads.values()), None))  # every gradient on one backend
    xp = backend.xp
    # the BLAS's own threads would then wait, busy, for more work, on the cores the
    # backend's threads need next (the numpy backend runs every product on its own threads)
    with backend.serial_blas():
        for g in grads.values():
            g2 = g.reshape(-1)
            sq = xp.dot(g2, g2)
            if xp is np:
                total += float(sq)
            else:
                sq = sq.astype(xp.float64)
                device_total = sq if device_total is None else device_total + sq
    if device_total is not None:
        total += float(device_total)
    return math.sqrt(total)


def clip_grad_norm(grads: dict, max_norm: float) -> float:
    """Scale all grads in place so their global L2 norm is at most max_norm; return the norm
    before clipping (as torch.nn.utils.clip_grad_norm_)."""
    _check_nonneg("max_norm", max_norm, strict=True)
    norm = global_grad_norm(grads)
    coef = max_norm / (norm + 1e-6)  # torch's epsilon
    if coef < 1.0:
        for g in grads.values():
            g *= coef
    return norm


def cosine_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """Linear warmup for warmup_steps, then cosine decay to min_lr at max_steps, then min_lr."""
    for name, value in (("step", step), ("warmup_steps", warmup_steps), ("max_steps", max_steps)):
        _check_count(name, value)
    _check_nonneg("max_lr", max_lr)
    _check_nonneg("min_lr", min_lr)
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= max_steps or max_steps <= warmup_steps:
        return min_lr
    ratio = (step - warmup_steps) / (max_steps - warmup_steps)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)
