"""gpt2np: GPT-2 in NumPy/CuPy with every gradient written by hand."""
from .config import PRESETS, GPTConfig
from .model import GPT, init_params, param_shapes
from .optim import AdamW, clip_grad_norm, cosine_lr

__all__ = ["GPT", "GPTConfig", "PRESETS", "AdamW", "clip_grad_norm", "cosine_lr",
           "init_params", "param_shapes", "from_pretrained"]


def from_pretrained(name_or_path, **kwargs):
    """Load Hugging Face GPT-2 weights; see gpt2np.pretrained.from_pretrained."""
    from .pretrained import from_pretrained as _from_pretrained

    return _from_pretrained(name_or_path, **kwargs)
