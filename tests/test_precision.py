"""Matmul precision (fp32 / tf32 / bf16): the rounding, its exact meaning per layer, the whole
model within bf16 tolerance of the float64 oracle, and training under it. On the CPU the
tf32/bf16 operands are emulated; the GPU runs the same tests in tests/test_cupy.py."""
import numpy as np
import pytest
import torch

from gpt2np.layers import round_mantissa
from gpt2np.backends.torch_reference import TorchGPT
from gpt2np import GPT, AdamW, GPTConfig
from gpt2np import layers as L
from gradcheck import rel_error
from rounding import assert_matmul_close, assert_within_rounding, model_sensitivity


def _nasty_floats(rng, n=200_000):
    x = (rng.standard_normal(n) * np.exp(rng.uniform(-80, 80, n))).astype(np.float32)
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, 3.4028235e38, -3.4028235e38, 1e-45, -1e-45,
               1.0000001, 1.5, 3.3961514e38]  # the last rounds up to inf in bf16
    x[:len(special)] = special
    # exact ties between two bf16 neighbours, with even and odd kept bits
    ties = (rng.integers(0, 2**31, 5000, dtype=np.uint32) & np.uint32(0x7F7F0000)) | np.uint32(0x8000)
    x[100:5100] = ties.view(np.float32)
    return x


def test_bf16_rounding_is_torchs_bit_for_bit():
    x = _nasty_floats(np.random.default_rng(0))
    ours = round_mantissa(x, 7)
    ref = torch.from_numpy(x).to(torch.bfloat16).float().numpy()
    same = (ours.view(np.uint32) == ref.view(np.uint32)) | (np.isnan(ours) & np.isnan(ref))
    assert same.all(), x[~same][:5]


def test_tf32_rounding_is_round_to_nearest_even_at_10_bits():
    x = _nasty_floats(np.random.default_rng(1))
    ours = round_mantissa(x, 10)
    assert not (ours.view(np.uint32) & np.uint32(0x1FFF)).any()  # 13 low bits cleared
    normal = np.isfinite(x) & (np.abs(x) >= np.finfo(np.float32).tiny) & (np.abs(x) < 3e38)
    m, e = np.frexp(x[normal].astype(np.float64))  # x = m * 2^e, 0.5 <= |m| < 1
    ref = np.ldexp(np.rint(m * 2.0**11) / 2.0**11, e)  # 11 significant bits, ties to even
    np.testing.assert_array_equal(ours[normal].astype(np.float64), ref)
    assert np.isnan(ours[4]) and ours[2] == np.inf


def test_rounding_leaves_its_input_alone():
    x = np.linspace(-3, 3, 101, dtype=np.float32)
    before = x.copy()
    round_mantissa(x, 7)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("precision,bits", [("bf16", 7), ("tf32", 10)])
def test_linear_is_exact_math_on_rounded_operands(precision, bits):
    # what the tensor cores compute: operands rounded, then exact products summed in float32.
    # So the result must match float64 math on the rounded operands to float32 accumulation.
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 48)).astype(np.float32)
    w = (0.2 * rng.standard_normal((48, 96))).astype(np.float32)
    b = rng.standard_normal(96).astype(np.float32)
    dout = rng.standard_normal((2, 5, 96)).astype(np.float32)
    # (within float32's rounding of K-term sums: tests/rounding.py::assert_matmul_close)
    r = lambda a: round_mantissa(a, bits).astype(np.float64)  # noqa: E731
    with L.matmul_precision(precision):
        out, cache = L.linear_forward(x, w, b)
        dx, dw, db = L.linear_backward(dout, cache)
    assert out.dtype == dx.dtype == dw.dtype == np.float32
    assert_matmul_close(out, r(x), r(w), bias=b.astype(np.float64), name="out")
    assert_matmul_close(dx, r(dout), r(w).T, name="dx")
    assert_matmul_close(dw, r(x).reshape(-1, 48).T, r(dout).reshape(-1, 96), name="dweight")
    ones = np.ones((1, 10))  # dbias is not a matmul: a float32 sum of the 10 rows of dout
    assert_matmul_close(db[None], ones, dout.reshape(-1, 96).astype(np.float64), name="dbias")
    # and it is not the float32 result: the rounding took place
    assert rel_error(out, x.astype(np.float64) @ w + b) > 10 * 2.0**-24


def test_precision_context_is_scoped_and_checked():
    assert L.get_matmul_precision() == "fp32"
    with L.matmul_precision("bf16"):
        assert L.get_matmul_precision() == "bf16"
        with pytest.raises(RuntimeError):
            with L.matmul_precision("tf32"):
                raise RuntimeError("boom")
        assert L.get_matmul_precision() == "bf16"
    assert L.get_matmul_precision() == "fp32"
    with pytest.raises(ValueError, match="precision must be one of"):
        with L.matmul_precision("fp16"):
            pass


def test_bad_precision_arguments():
    cfg = GPTConfig(block_size=8, vocab_size=16, n_layer=1, n_head=2, n_embd=8)
    with pytest.raises(ValueError, match="precision must be one of"):
        GPT(cfg, precision="bfloat16")
    with pytest.raises(ValueError, match="needs dtype='float32'"):
        GPT(cfg, dtype="float64", precision="bf16")
    with pytest.raises(TypeError, match="float32 operands"):
        with L.matmul_precision("bf16"):
            L.matmul(np.ones((2, 2)), np.ones((2, 2)))


def _model_results(precision, params, idx, targets):
    cfg = GPTConfig(block_size=32, vocab_size=96, n_layer=2, n_head=4, n_embd=64)
    model = GPT(cfg, dtype="float32", precision=precision, params=params)
    logits, loss = model.forward(idx, targets)
    out = {"logits": logits, "loss": loss, **model.backward()}
    return {k: np.array(v, dtype=np.float64) for k, v in out.items()}


def test_whole_model_within_bf16_and_tf32_tolerance_of_float64():
    """The 2-layer, 64-dim model in each precision against the float64 oracle, within the
    tolerance of that precision's rounding: the spread of the float64 model's results when
    its matmul operands move by a TF32 or bf16 rounding, everything else by float32's
    (tests/rounding.py). tf32's and bf16's results fail float32's tolerance, and the errors
    are ordered as the mantissas: the rounding is really applied, in forward and backward,
    and float32's tolerance would catch it where it does not belong."""
    cfg = GPTConfig(block_size=32, vocab_size=96, n_layer=2, n_head=4, n_embd=64)
    rng = np.random.default_rng(0)
    params = GPT(cfg, dtype="float32", seed=0).state_dict()
    idx = rng.integers(0, cfg.vocab_size, (3, 32))
    targets = rng.integers(0, cfg.vocab_size, (3, 32))
    ref = TorchGPT.from_params(cfg, params, dtype=torch.float64)
    rlogits, rloss = ref(torch.from_numpy(idx), torch.from_numpy(targets))
    rloss.backward()
    expected = {"logits": rlogits.detach().numpy(), "loss": np.array(rloss.item()), **ref.grads()}
    ours, spread = {}, {}
    for precision in ("fp32", "tf32", "bf16"):
        ours[precision] = _model_results(precision, params, idx, targets)
        spread[precision] = model_sensitivity(cfg, params, idx, targets, precision)[1]
        assert_within_rounding(ours[precision], expected, spread[precision], precision)
    for precision in ("tf32", "bf16"):
        with pytest.raises(AssertionError, match="tolerance"):
            assert_within_rounding(ours[precision], expected, spread["fp32"], f"{precision} at fp32")
    errors = {p: (rel_error(r["logits"], expected["logits"]),
                  max(rel_error(r[k], expected[k]) for k in ref.grads())) for p, r in ours.items()}
    fp32, tf32, bf16 = errors["fp32"], errors["tf32"], errors["bf16"]
    assert fp32[0] < tf32[0] < bf16[0] and fp32[1] < tf32[1] < bf16[1], errors


def test_bf16_training_tracks_fp32():
    cfg = GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32)
    rng = np.random.default_rng(0)
    data = np.tile(rng.permutation(64)[:12], 20)  # a cycle: each token fixes the next
    losses = {}
    for precision in ("fp32", "bf16"):
        model = GPT(cfg, precision=precision, seed=0)
        opt = AdamW(model.params, lr=3e-3)
        curve = []
        for step in range(40):
            i = (step * 5) % (len(data) - 17)
            x, y = data[None, i:i + 16], data[None, i + 1:i + 17]
            _, loss = model.forward(np.repeat(x, 4, 0), np.repeat(y, 4, 0))
            opt.step(model.backward())
            curve.append(float(loss))
        losses[precision] = np.array(curve)
    assert losses["bf16"][-5:].mean() < 0.5 * losses["bf16"][:5].mean()  # it learns
    np.testing.assert_allclose(losses["bf16"], losses["fp32"], rtol=0.01)


def test_generation_runs_in_the_models_precision():
    cfg = GPTConfig(block_size=16, vocab_size=32, n_layer=1, n_head=2, n_embd=16)
    model = GPT(cfg, precision="bf16", seed=0)
    seen = []
    real = type(model.backend).matmul

    def spy(a, b, out=None, precision="fp32"):
        seen.append(precision)
        return real(a, b, out=out, precision=precision)

    type(model.backend).matmul = staticmethod(spy)
    try:
        model.generate(np.zeros((1, 3), dtype=np.int64), 4, temperature=0)
    finally:
        type(model.backend).matmul = staticmethod(real)
    assert seen and set(seen) == {"bf16"}
