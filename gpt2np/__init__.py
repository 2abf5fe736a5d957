"""gpt2np: GPT-2 in NumPy/CuPy with every gradient written by hand."""
from gpt2np.config import PRESETS, GPTConfig
from gpt2np.model import GPT, init_params, param_shapes
from gpt2np.optim import AdamW, clip_grad_norm, cosine_lr

__all__ = ["GPT", "GPTConfig", "PRESETS", "AdamW", "clip_grad_norm", "cosine_lr",
           "init_params", "param_shapes", "from_pretrained", "save_pretrained"]


def from_pretrained(name_or_path, **kwargs):
    """A GPT from any model source: a training run's out-dir or its ckpt.safetensors, a folder
    with model.safetensors + config.json, or a hub id ("gpt2", ...); backend=, dtype= as GPT.
    See gpt2np.io.pretrained.from_pretrained."""
    from gpt2np.io.pretrained import from_pretrained as _from_pretrained

    return _from_pretrained(name_or_path, **kwargs)


def save_pretrained(model, folder, **kwargs):
    """Write `model` (a GPT) to `folder` as model.safetensors + config.json, which
    transformers' GPT2LMHeadModel and from_pretrained load; dtype=, vocab_size= as
    gpt2np.io.hf_folder.save_pretrained."""
    from gpt2np.io.hf_folder import save_pretrained as _save_pretrained

    return _save_pretrained(model, folder, **kwargs)
