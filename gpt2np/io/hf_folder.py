"""A Hugging Face GPT-2 model folder: its file names, its config.json both ways, and writing one.

    save_pretrained(model, "out/")   # GPT2LMHeadModel.from_pretrained("out/") loads it
    load_config("out/config.json")   # -> GPTConfig, refusing settings gpt2np does not compute

A folder holds config.json and model.safetensors (or model.safetensors.index.json and its
shards, or, from older releases, pytorch_model.bin). Reading one, with hub ids and training
runs, is gpt2np.io.pretrained; this module knows nothing of the model class, only its
`config`, `dtype` and `state_dict()`.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from gpt2np import files
from gpt2np.config import GPTConfig
from gpt2np.data.tokenizer import EOT_TOKEN
from gpt2np.io import safetensors_layout
from gpt2np.untrusted import read_json

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"  # sharded checkpoints
PICKLE_NAME = "pytorch_model.bin"
CONFIG_NAME = "config.json"


# ------------------------------------------------------------------------------ writing


def save_pretrained(model, folder, *, dtype: str | None = None,
                    vocab_size: int | None = None) -> Path:
    """Write `model.safetensors` + `config.json` of a gpt2np.GPT that transformers'
    GPT2LMHeadModel loads.

    Keys are the prefixed names transformers' own save_pretrained writes, without the tied
    lm_head.weight and without buffers. dtype: "float32", "float16", "bfloat16" or
    "float64" (default: the model's). vocab_size: keep only the first rows of wte (drop a
    padded vocabulary's rows; the logits of the kept ids do not change). Each file is written
    atomically (gpt2np.files), config.json before the weights.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    dtype = model.dtype if dtype is None else dtype
    if dtype not in SAVE_DTYPES:
        raise ValueError(f"cannot save as {dtype!r}; choose one of {', '.join(SAVE_DTYPES)}")
    V = model.config.vocab_size if vocab_size is None else vocab_size
    if not 1 <= V <= model.config.vocab_size:
        raise ValueError(f"vocab_size {V} must be in [1, the model's {model.config.vocab_size}]")
    tensors = model.state_dict()
    tensors["transformer.wte.weight"] = tensors["transformer.wte.weight"][:V]  # (V, C)
    check_representable(tensors, dtype, f"cannot save as {dtype} (gpt2np export --dtype)")
    config = hf_config(model.config.replace(vocab_size=V), dtype)
    files.write_json(folder / CONFIG_NAME, config, indent=2)
    # metadata "pt": transformers expects it in safetensors files it loads
    files.write_bytes(folder / WEIGHTS_NAME, _safetensors_bytes(tensors, dtype, {"format": "pt"}))
    return folder


SAVE_DTYPES = ("float32", "float16", "bfloat16", "float64")


def check_representable(tensors: dict, dtype: str, where: str):
    """Refuse a finite value that `dtype` would hold as inf (past float16's 65504, bfloat16's
    or float32's ~3.4e38), naming `where` and the tensor: such a model computes NaN."""
    if dtype == "float64":
        return
    for name, a in tensors.items():
        # the largest magnitude overflows if anything does (rounding is monotonic); a NaN
        # max is skipped below (two reductions: no array-sized temporary)
        a = np.asarray(a)
        top = max(float(a.max(initial=0.0)), -float(a.min(initial=0.0)))
        with np.errstate(over="ignore"):  # the overflow is what we look for
            narrow = (_bf16_bits(np.float32(top)) & 0x7FFF == 0x7F80 if dtype == "bfloat16"
                      else np.isinf(np.asarray(top).astype(dtype)))
        if np.isfinite(top) and narrow:
            wider = {"float16": "bfloat16 or float32", "bfloat16": "float32"}.get(dtype, "float64")
            raise ValueError(f"{where}: {name!r} holds a value of magnitude {top:.6g}, past "
                             f"{dtype}'s range: as {dtype} it would be inf; use {wider}")


def _safetensors_bytes(tensors: dict, dtype: str, metadata: dict) -> bytes:
    """The safetensors file of `tensors` cast to dtype; bfloat16 too, which numpy lacks."""
    from safetensors.numpy import save

    if dtype != "bfloat16":
        return save({k: np.ascontiguousarray(v, dtype=dtype) for k, v in tensors.items()},
                    metadata=metadata)
    # safetensors.numpy cannot write BF16: write the bits as U16, then relabel them in the header
    data = save({k: _bf16_bits(v) for k, v in tensors.items()}, metadata=metadata)
    header, start = safetensors_layout.split(data)
    for key, entry in header.items():
        if key != "__metadata__":
            entry["dtype"] = "BF16"
    return safetensors_layout.join(header, data[start:])


def _bf16_bits(a) -> np.ndarray:
    """float -> bfloat16 bit patterns (uint16), rounded to nearest even, as torch rounds."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(a)  # rounding could carry a NaN's payload into inf: keep it a quiet NaN
    return np.where(nan, ((u >> 16) | 0x0040).astype(np.uint16), rounded)


def hf_config(config: GPTConfig, dtype: str = "float32") -> dict:
    """config.json in transformers' GPT2Config names, for exactly the model we compute."""
    # GPT-2's <|endoftext|> is bos/eos; a smaller vocab has no such token
    eot = EOT_TOKEN if config.vocab_size > EOT_TOKEN else None
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": config.vocab_size,
        "n_positions": config.block_size,
        "n_ctx": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "add_cross_attention": False,
        "tie_word_embeddings": True,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "dtype": dtype,  # transformers 5's name
        "torch_dtype": dtype,  # transformers 4's
    }


# ------------------------------------------------------------------------------ config.json


def load_config(path) -> GPTConfig:
    """GPTConfig from a config.json in transformers' names (or GPTConfig's own).

    Refuses settings that would make transformers compute something other than our model,
    rather than load them and silently produce different logits.
    """
    path = Path(path)
    if not path.is_file():
        raise OSError(f"missing {path}: the folder needs a {CONFIG_NAME} describing the model")
    d = read_json(path)
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return config_from_dict(d, where=str(path))


# (field, default as in transformers' GPT2Config, accepted values, why)
_UNSUPPORTED = (
    ("model_type", "gpt2", ("gpt2",), "only GPT-2 is implemented"),
    ("activation_function", "gelu_new", ("gelu_new", "gelu_pytorch_tanh"),
     "only GELU's tanh approximation is implemented"),
    ("scale_attn_weights", True, (True,), "attention is always scaled by 1/sqrt(head size)"),
    ("scale_attn_by_inverse_layer_idx", False, (False,), "not implemented"),
    ("add_cross_attention", False, (False,), "GPT-2 as a decoder only"),
    ("tie_word_embeddings", True, (True,), "the lm_head is always wte"),
)
# GPTConfig's fields and the names a config.json may give them, GPTConfig's own first
_NAMES = (("block_size", ("block_size", "n_positions", "n_ctx")),
          ("vocab_size", ("vocab_size",)), ("n_layer", ("n_layer",)),
          ("n_head", ("n_head",)), ("n_embd", ("n_embd",)))


def config_from_dict(d: dict, where: str = "config") -> GPTConfig:
    """The GPTConfig of a config.json's dict, in transformers' names or GPTConfig's own
    (block_size, as GPTConfig.to_dict writes): either way every setting is checked."""
    for key, default, ok, why in _UNSUPPORTED:
        value = d.get(key, default)
        # (a tuple, compared by ==: a list or dict in the file is refused, not a TypeError)
        if type(value) is not type(default) or value not in ok:
            raise ValueError(f"{where}: {key}={value!r} is not supported ({why})")
    eps = d.get("layer_norm_epsilon", 1e-5)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) \
            or not math.isclose(eps, 1e-5, rel_tol=1e-6):
        raise ValueError(f"{where}: layer_norm_epsilon={eps!r} is not supported (LayerNorm uses 1e-5)")
    # reorder_and_upcast_attn only changes the precision of half-float attention: same math.
    fields = {}
    for ours, theirs in _NAMES:
        found = [t for t in theirs if d.get(t) is not None]
        if not found:
            raise ValueError(f"{where}: missing {' or '.join(theirs)}")
        if found[0] == "block_size" and len(found) > 1 and d[found[1]] != d["block_size"]:
            raise ValueError(f"{where}: block_size={d['block_size']!r} and {found[1]}="
                             f"{d[found[1]]!r} disagree; give one of them")
        fields[ours] = d[found[0]]
    try:
        config = GPTConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    n_inner = d.get("n_inner")
    if n_inner is not None and (type(n_inner) is not int or n_inner != 4 * config.n_embd):
        raise ValueError(f"{where}: n_inner={n_inner!r} is not supported (the MLP is 4 * n_embd)")
    return config
