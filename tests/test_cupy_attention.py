"""gpt2np.backends.cupy_attention, the GPU's attention, checked on the CPU: its orchestration (query
blocks, batched GEMMs, the row operations) run with NumPy stand-ins for the kernels must
equal the reference attention of gpt2np.layers, forward and backward. The kernels
themselves are checked against the same stand-ins on a GPU (tests/test_cupy.py) and on the
CUDA simulator (tests/test_gpu_sim.py)."""
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpt2np.backends.cupy_attention import (BlockCache, attention_backward, attention_forward,
                                            numpy_row_ops)
from gpt2np import layers as L
from gradcheck import assert_close


@given(B=st.integers(1, 3), T=st.integers(1, 40), NH=st.integers(1, 4), hs=st.integers(1, 9),
       block=st.sampled_from([1, 3, 16, 256]), bias=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_blocked_attention_equals_the_reference(B, T, NH, hs, block, bias, seed):
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((B, T, 3 * NH * hs))
    b = rng.standard_normal(3 * NH * hs) if bias else None
    dy = rng.standard_normal((B, T, NH * hs))
    ref, ref_cache = L.attention_forward(qkv, NH, b)
    ref_dqkv = L.attention_backward(dy, ref_cache)
    out, cache = attention_forward(qkv, NH, b, row_ops=numpy_row_ops(block=block))
    assert isinstance(cache, BlockCache)  # the query blocks ran (not flash attention)
    dqkv = attention_backward(dy, cache)  # the cache knows its row ops
    assert out.shape == ref.shape and dqkv.shape == qkv.shape
    assert_close(out, ref, 1e-12, "y")
    assert_close(dqkv, ref_dqkv, 1e-12, "dqkv")


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_blocked_attention_in_low_precision(precision):
    # both paths round the same GEMM operands (scores from q*scale and k, P, v, dy, dS), so
    # they agree to float32 accumulation, not merely to bf16 tolerance
    rng = np.random.default_rng(1)
    qkv = rng.standard_normal((2, 33, 3 * 4 * 8)).astype(np.float32)
    dy = rng.standard_normal((2, 33, 32)).astype(np.float32)
    with L.matmul_precision(precision):
        ref, ref_cache = L.attention_forward(qkv, 4)
        ref_dqkv = L.attention_backward(dy, ref_cache)
        out, cache = attention_forward(qkv, 4, row_ops=numpy_row_ops(block=8))
        dqkv = attention_backward(dy, cache)
    assert_close(out, ref, 1e-5, "y")
    assert_close(dqkv, ref_dqkv, 1e-4, "dqkv")
