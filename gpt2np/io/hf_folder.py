"""A Hugging Face GPT-2 model folder: its file names, its config.json both ways, and writing one.

    save_pretrained(model, "out/")   # GPT2LMHeadModel.from_pretrained("out/") loads it
    load_config("out/config.json")   # -> GPTConfig, refusing settings gpt2np does not compute

A folder holds config.json and model.safetensors (or model.safetensors.index.json and its
shards, or, from older releases, pytorch_model.bin). Reading one, with hub ids and training
runs, is gpt2np.io.pretrained; this module knows nothing of the model class, only its
`config`, `dtype` and `state_dict()`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from gpt2np import files
from gpt2np.config import GPTConfig
from gpt2np.data.tokenizer import EOT_TOKEN
from gpt2np.io import safetensors_layout

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
    config = hf_config(model.config.replace(vocab_size=V), dtype)
    files.write_json(folder / CONFIG_NAME, config, indent=2)
    # metadata "pt": transformers expects it in safetensors files it loads
    files.write_bytes(folder / WEIGHTS_NAME, _safetensors_bytes(tensors, dtype, {"format": "pt"}))
    return folder


SAVE_DTYPES = ("float32", "float16", "bfloat16", "float64")


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
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(d, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return config_from_dict(d, where=str(path))


def config_from_dict(d: dict, where: str = "config") -> GPTConfig:
    if "block_size" in d:  # GPTConfig's own names (as GPTConfig.to_dict writes)
        return GPTConfig.from_dict({k: d[k] for k in ("block_size", "vocab_size", "n_layer",
                                                     "n_head", "n_embd") if k in d})
    model_type = d.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise ValueError(f"{where}: model_type {model_type!r} is not GPT-2 ('gpt2')")
    # (field, default as in transformers' GPT2Config, accepted values, why)
    unsupported = [
        ("activation_function", "gelu_new", {"gelu_new", "gelu_pytorch_tanh"},
         "only GELU's tanh approximation is implemented"),
        ("scale_attn_weights", True, {True}, "attention is always scaled by 1/sqrt(head size)"),
        ("scale_attn_by_inverse_layer_idx", False, {False}, "not implemented"),
        ("add_cross_attention", False, {False}, "GPT-2 as a decoder only"),
        ("tie_word_embeddings", True, {True}, "the lm_head is always wte"),
    ]
    for key, default, ok, why in unsupported:
        if d.get(key, default) not in ok:
            raise ValueError(f"{where}: {key}={d[key]!r} is not supported ({why})")
    eps = d.get("layer_norm_epsilon", 1e-5)
    if not isinstance(eps, (int, float)) or not math.isclose(eps, 1e-5, rel_tol=1e-6):
        raise ValueError(f"{where}: layer_norm_epsilon={eps!r} is not supported (LayerNorm uses 1e-5)")
    # reorder_and_upcast_attn only changes the precision of half-float attention: same math.
    fields = {}
    for ours, theirs in (("block_size", ("n_positions", "n_ctx")), ("vocab_size", ("vocab_size",)),
                         ("n_layer", ("n_layer",)), ("n_head", ("n_head",)), ("n_embd", ("n_embd",))):
        found = [t for t in theirs if d.get(t) is not None]
        if not found:
            raise ValueError(f"{where}: missing {' or '.join(theirs)}")
        fields[ours] = d[found[0]]
    n_inner = d.get("n_inner")
    if n_inner is not None and n_inner != 4 * fields["n_embd"]:
        raise ValueError(f"{where}: n_inner={n_inner} is not supported (the MLP is 4 * n_embd)")
    try:
        return GPTConfig(**fields)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
