"""AdamW, gradient clipping and the LR schedule against their PyTorch counterparts."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from gpt2np import AdamW, clip_grad_norm, cosine_lr
from gradcheck import assert_close


def _params(rng):
    return {"w": rng.standard_normal((4, 3)), "b": rng.standard_normal(3), "e": rng.standard_normal((5, 2))}


@given(st.integers(0, 2**31 - 1), st.floats(1e-4, 1e-1), st.floats(0.0, 0.5),
       st.sampled_from([(0.9, 0.95), (0.9, 0.999), (0.5, 0.9)]))
def test_adamw_matches_torch(seed, lr, wd, betas):
    rng = np.random.default_rng(seed)
    params = _params(rng)
    tparams = {k: torch.tensor(v, requires_grad=True) for k, v in params.items()}
    decay = [t for t in tparams.values() if t.dim() >= 2]
    no_decay = [t for t in tparams.values() if t.dim() < 2]
    topt = torch.optim.AdamW([{"params": decay, "weight_decay": wd},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=lr, betas=betas, eps=1e-8, foreach=False)
    opt = AdamW(params, lr=lr, betas=betas, eps=1e-8, weight_decay=wd)
    for step in range(6):
        grads = {k: rng.standard_normal(v.shape) for k, v in params.items()}
        step_lr = lr * (1 + step) / 6  # a schedule: lr changes every step
        for g in topt.param_groups:
            g["lr"] = step_lr
        for k, t in tparams.items():
            t.grad = torch.tensor(grads[k])
        topt.step()
        opt.step(grads, lr=step_lr)
        for k in params:
            assert_close(params[k], tparams[k].detach().numpy(), 1e-12, f"step {step} {k}")


def test_adamw_decays_only_matrices():
    params = {"w": np.ones((2, 2)), "b": np.ones(2)}
    opt = AdamW(params, lr=0.1, weight_decay=0.5)
    opt.step({"w": np.zeros((2, 2)), "b": np.zeros(2)})  # zero grads: only decay can move
    assert np.allclose(params["w"], 1 - 0.1 * 0.5) and np.all(params["b"] == 1)


def test_adamw_state_round_trip():
    # what a checkpoint keeps (m, v, t, as the training engine saves them) resumes the
    # optimizer exactly: the next step is the same bits as the uninterrupted one's
    rng = np.random.default_rng(0)
    a = _params(rng)
    oa = AdamW(a, lr=1e-2)
    oa.step({k: rng.standard_normal(v.shape) for k, v in a.items()})
    state = {"m": {k: v.copy() for k, v in oa.m.items()},
             "v": {k: v.copy() for k, v in oa.v.items()}, "t": oa.t}
    c = {k: v.copy() for k, v in a.items()}
    oc = AdamW(c, lr=1e-2)
    oc.load_state_dict(state)
    assert oc.t == 1
    g = {k: rng.standard_normal(v.shape) for k, v in a.items()}
    oa.step(g)
    oc.step(g)
    for k in a:
        np.testing.assert_array_equal(c[k], a[k])
        np.testing.assert_array_equal(oc.v[k], oa.v[k])
    bad = {**state, "m": {**state["m"], "w": np.zeros((9, 9))}}
    with pytest.raises(ValueError, match="shape"):
        oc.load_state_dict(bad)


@given(st.integers(0, 2**31 - 1), st.floats(0.01, 100.0))
def test_clip_grad_norm_matches_torch(seed, max_norm):
    rng = np.random.default_rng(seed)
    grads = {k: v * 3 for k, v in _params(rng).items()}
    tgrads = {k: torch.tensor(v, requires_grad=True) for k, v in grads.items()}
    for k, t in tgrads.items():
        t.grad = torch.tensor(grads[k])
    tnorm = torch.nn.utils.clip_grad_norm_(list(tgrads.values()), max_norm)
    norm = clip_grad_norm(grads, max_norm)
    assert_close(norm, tnorm.item(), 1e-12, "norm")
    for k in grads:
        assert_close(grads[k], tgrads[k].grad.numpy(), 1e-12, k)


def test_cosine_lr_shape():
    kw = dict(max_lr=6e-4, min_lr=6e-5, warmup_steps=10, max_steps=50)
    lrs = [cosine_lr(s, **kw) for s in range(60)]
    assert lrs[0] == pytest.approx(6e-5) and lrs[9] == pytest.approx(6e-4)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # warmup rises
    assert all(a >= b for a, b in zip(lrs[10:50], lrs[11:51]))  # decay falls
    assert lrs[30] == pytest.approx(6e-5 + 0.5 * (1 + math.cos(math.pi * 0.5)) * 5.4e-4)
    assert lrs[50] == lrs[59] == pytest.approx(6e-5)
