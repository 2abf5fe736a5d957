"""Print how closely gpt2np's hand-written gradients match PyTorch autograd.

    python examples/gradcheck_report.py [--seeds 5]

For each layer and for whole models, float64 and float32 runs of gpt2np are compared with
torch autograd in float64 on the same inputs; the table gives the worst relative error
(max |ours - torch| / max |torch|) over the seeds (at most 2 for the whole models) and all
tensors. docs/performance.md lists a dated run of it.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from gradcheck import rel_error, torch_grads  # noqa: E402

from gpt2np.backends import torch_reference as R  # noqa: E402
from gpt2np.backends.torch_reference import TorchGPT  # noqa: E402
from gpt2np import GPT, GPTConfig  # noqa: E402
from gpt2np import layers as L  # noqa: E402


def layer_cases(rng):
    B, T, C, NH, V = 2, 16, 32, 4, 64
    x = rng.standard_normal((B, T, C))
    return {
        "embedding": (L.embedding_forward, L.embedding_backward, R.ref_embedding,
                      dict(idx=rng.integers(0, V, (B, T)), wte=rng.standard_normal((V, C)),
                           wpe=rng.standard_normal((T, C))), ["wte", "wpe"]),
        "layernorm": (L.layernorm_forward, L.layernorm_backward, R.ref_layernorm,
                      dict(x=x, weight=rng.standard_normal(C), bias=rng.standard_normal(C)),
                      ["x", "weight", "bias"]),
        "linear": (L.linear_forward, L.linear_backward, R.ref_linear,
                   dict(x=x, weight=rng.standard_normal((C, 3 * C)), bias=rng.standard_normal(3 * C)),
                   ["x", "weight", "bias"]),
        "attention": (lambda qkv: L.attention_forward(qkv, NH),
                      lambda d, c: (L.attention_backward(d, c),),
                      lambda qkv: R.ref_attention(qkv, NH), dict(qkv=rng.standard_normal((B, T, 3 * C))), ["qkv"]),
        "gelu": (L.gelu_forward, lambda d, c: (L.gelu_backward(d, c),), R.ref_gelu, dict(x=3 * x), ["x"]),
        "cross_entropy": (L.cross_entropy_forward, lambda d, c: (L.cross_entropy_backward(float(d), c),),
                          R.ref_cross_entropy, dict(logits=3 * rng.standard_normal((B, T, V)),
                                                    targets=rng.integers(0, V, (B, T))), ["logits"]),
    }


def layer_errors(seed, dtype):
    rng = np.random.default_rng(seed)
    out = {}
    for name, (fwd, bwd, ref, inputs, wrt) in layer_cases(rng).items():
        cast = {k: (v.astype(dtype) if v.dtype.kind == "f" else v) for k, v in inputs.items()}
        y, cache = fwd(**cast)
        dout = np.random.default_rng(seed + 1).standard_normal(np.shape(y))
        grads = bwd(dout.astype(dtype) if np.ndim(dout) else dout, cache)
        _, ref_grads = torch_grads(ref, inputs, dout)
        out[name] = max(rel_error(g, ref_grads[k]) for g, k in zip(grads, wrt))
    return out


def model_error(cfg, seed, dtype):
    rng = np.random.default_rng(seed)
    model = GPT(cfg, dtype=dtype, seed=seed)
    idx = rng.integers(0, cfg.vocab_size, (2, cfg.block_size))
    targets = rng.integers(0, cfg.vocab_size, (2, cfg.block_size))
    _, loss = model.forward(idx, targets)
    grads = model.backward()
    ref = TorchGPT.from_params(cfg, {k: v.astype(np.float64) for k, v in model.state_dict().items()},
                               dtype=torch.float64)
    ref(torch.from_numpy(idx), torch.from_numpy(targets))[1].backward()
    expected = ref.grads()
    return max(rel_error(grads[k], expected[k]) for k in expected)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=5)
    args = ap.parse_args()
    rows = {}
    for dtype in ("float64", "float32"):
        for seed in range(args.seeds):
            for name, err in layer_errors(seed, dtype).items():
                rows.setdefault(name, {}).setdefault(dtype, 0.0)
                rows[name][dtype] = max(rows[name][dtype], err)
    models = {
        "model 2L/4H/64C V=512 T=32": GPTConfig(block_size=32, vocab_size=512, n_layer=2, n_head=4, n_embd=64),
        "model 4L/4H/128C V=50257 T=64": GPTConfig(block_size=64, vocab_size=50257, n_layer=4, n_head=4, n_embd=128),
    }
    for name, cfg in models.items():
        rows[name] = {dt: max(model_error(cfg, s, dt) for s in range(min(args.seeds, 2)))
                      for dt in ("float64", "float32")}
    print(f"worst relative gradient error vs torch autograd (float64), {args.seeds} seeds")
    print(f"{'':32s} {'float64':>10s} {'float32':>10s}")
    for name, r in rows.items():
        print(f"{name:32s} {r['float64']:10.2e} {r['float32']:10.2e}")


if __name__ == "__main__":
    main()
