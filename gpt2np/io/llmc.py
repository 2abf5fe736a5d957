"""llm.c's model and tokenizer files: read and write the binary format of karpathy/llm.c.

    config, params = read_llmc("gpt2_124M.bin")           # float32 (version 3) or bf16 (5)
    write_llmc("out.bin", model.config, model.state_dict(), dtype="bfloat16")
    write_llmc_tokenizer("gpt2_tokenizer.bin")

A model file is a header of 256 little-endian int32 (1024 bytes), then every parameter, each
tensor contiguous, in llm.c's order (see `_LAYOUT`):

    header[0] 20240326 (magic)      header[4] L     (n_layer)
    header[1] 3: float32, 5: bf16   header[5] NH    (n_head)
    header[2] maxT (block_size)     header[6] C     (n_embd)
    header[3] V    (vocab_size)     header[7] Vp    (V padded to a multiple of 128), rest 0

Two layouts differ from gpt2np's params (named like Hugging Face GPT2LMHeadModel):
  - llm.c's linear weights are (out, in), nn.Linear's; gpt2np's are HF Conv1D's (in, out),
    the transpose: llm.c's qkvw[l] (3C, C) is `transformer.h.{l}.attn.c_attn.weight`.T;
  - wte has Vp rows; rows V..Vp-1 are no tokens (llm.c writes zeros there), so the reader
    drops them and gives a config with vocab_size V.
A bf16 file holds every tensor, LayerNorms included, as float32 rounded to nearest even.

A tokenizer file is a header of 256 int32 (20240328, version 2, the number of tokens, the
<|endoftext|> id), then for each token one length byte and that many bytes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gpt2np.config import GPT2_VOCAB_SIZE, LIMITS, GPTConfig
from gpt2np.data.tokenizer import EOT_TOKEN, get_encoding
from gpt2np.files import replace_atomically
from gpt2np.model import param_shapes

MODEL_MAGIC = 20240326
TOKENIZER_MAGIC = 20240328
TOKENIZER_VERSION = 2  # 2: the header holds the EOT id
HEADER_INTS = 256
HEADER_BYTES = 4 * HEADER_INTS
VERSIONS = {3: "float32", 5: "bfloat16"}  # header[1] -> the dtype of every tensor
VERSION_OF = {dtype: version for version, dtype in VERSIONS.items()}
VOCAB_MULTIPLE = 128  # llm.c pads the vocabulary to a multiple of this (50257 -> 50304)
_ITEMSIZE = {"float32": 4, "bfloat16": 2}
_FILE_DTYPE = {"float32": "<f4", "bfloat16": "<u2"}  # bf16 travels as its bit patterns

# header[2:8] in order: our name, llm.c's, and the largest value we believe (GPTConfig's
# bounds). The bounds only reject nonsense (a damaged or foreign file) before any size is trusted.
_FIELDS = (
    ("block_size", "maxT", LIMITS["block_size"]),
    ("vocab_size", "V", LIMITS["vocab_size"]),
    ("n_layer", "L", LIMITS["n_layer"]),
    ("n_head", "NH", LIMITS["n_head"]),
    ("n_embd", "C", LIMITS["n_embd"]),
    ("padded_vocab_size", "Vp", LIMITS["vocab_size"]),
)

# llm.c's 16 parameter tensors in file order: llm.c's name, gpt2np's key ("{i}": the layer;
# a per-layer tensor is stored layer after layer, (L, ...)), and whether llm.c stores the
# transpose of gpt2np's array (nn.Linear's (out, in) against Conv1D's (in, out)).
_LAYOUT = (
    ("wte", "transformer.wte.weight", False),  # (Vp, C)
    ("wpe", "transformer.wpe.weight", False),  # (maxT, C)
    ("ln1w", "transformer.h.{i}.ln_1.weight", False),  # (L, C)
    ("ln1b", "transformer.h.{i}.ln_1.bias", False),  # (L, C)
    ("qkvw", "transformer.h.{i}.attn.c_attn.weight", True),  # (L, 3C, C)
    ("qkvb", "transformer.h.{i}.attn.c_attn.bias", False),  # (L, 3C)
    ("attprojw", "transformer.h.{i}.attn.c_proj.weight", True),  # (L, C, C)
    ("attprojb", "transformer.h.{i}.attn.c_proj.bias", False),  # (L, C)
    ("ln2w", "transformer.h.{i}.ln_2.weight", False),  # (L, C)
    ("ln2b", "transformer.h.{i}.ln_2.bias", False),  # (L, C)
    ("fcw", "transformer.h.{i}.mlp.c_fc.weight", True),  # (L, 4C, C)
    ("fcb", "transformer.h.{i}.mlp.c_fc.bias", False),  # (L, 4C)
    ("fcprojw", "transformer.h.{i}.mlp.c_proj.weight", True),  # (L, C, 4C)
    ("fcprojb", "transformer.h.{i}.mlp.c_proj.bias", False),  # (L, C)
    ("lnfw", "transformer.ln_f.weight", False),  # (C,)
    ("lnfb", "transformer.ln_f.bias", False),  # (C,)
)


class LlmcFormatError(ValueError):
    """A file that is not a readable llm.c model: `field` names the part that is wrong."""

    def __init__(self, path, field: str, problem: str):
        self.path, self.field = str(path), field
        super().__init__(f"{path}: {problem}")


@dataclass(frozen=True)
class LlmcHeader:
    version: int
    dtype: str  # "float32" | "bfloat16"
    block_size: int
    vocab_size: int
    padded_vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]

    def config(self) -> GPTConfig:
        """The model's config: vocab_size is V, the real tokens (the padded rows are dropped)."""
        return GPTConfig(block_size=self.block_size, vocab_size=self.vocab_size,
                         n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd)

    def num_params(self) -> int:
        """Numbers stored after the header (wte with its Vp rows)."""
        return sum(int(np.prod(shape)) for _, shape, _, _ in
                   _file_tensors(self.config(), self.padded_vocab_size))

    def file_size(self) -> int:
        return HEADER_BYTES + self.num_params() * self.itemsize


# ------------------------------------------------------------------------------ the layout


def _file_tensors(config: GPTConfig, padded_vocab_size: int):
    """Yield (gpt2np key, shape in the file, gpt2np shape, transposed) in file order.

    Shapes come from gpt2np's param_shapes: llm.c's is its transpose for the linear weights,
    and wte's has padded_vocab_size rows of which gpt2np holds the first config.vocab_size.
    """
    ours = param_shapes(config)
    padded = param_shapes(config.replace(vocab_size=padded_vocab_size))
    for _, key, transposed in _LAYOUT:
        for i in (range(config.n_layer) if "{i}" in key else [None]):
            k = key.format(i=i)
            shape = padded[k][::-1] if transposed else padded[k]
            yield k, shape, ours[k], transposed


def _size_problem(values: dict) -> tuple[str, str] | None:
    """(field, what is wrong) for the first size llm.c's header cannot hold, else None."""
    for name, llmc_name, bound in _FIELDS:
        v = values[name]
        if not 1 <= v <= bound:
            return name, f"{name} ({llmc_name}) = {v} must be in [1, {bound}]"
    if values["n_embd"] % values["n_head"]:
        return "n_head", (f"n_embd (C) = {values['n_embd']} is not divisible by "
                          f"n_head (NH) = {values['n_head']}")
    if values["padded_vocab_size"] < values["vocab_size"]:
        return "padded_vocab_size", (f"padded_vocab_size (Vp) = {values['padded_vocab_size']} "
                                     f"is smaller than vocab_size (V) = {values['vocab_size']}")
    try:  # the rest of GPTConfig's checks (its parameter count), with the padded rows
        GPTConfig(**{k: values[k] for k in ("block_size", "n_layer", "n_head", "n_embd")},
                  vocab_size=values["padded_vocab_size"])
    except ValueError as e:
        return "num_params", str(e)
    return None


# ------------------------------------------------------------------------------ reading


def is_llmc_model(path) -> bool:
    """Whether `path` is a file that starts with llm.c's model magic (reads 4 bytes)."""
    if not os.path.isfile(path):
        return False
    with open(path, "rb") as f:
        head = f.read(4)
    return len(head) == 4 and int.from_bytes(head, "little", signed=True) == MODEL_MAGIC


def read_llmc_header(path) -> LlmcHeader:
    """The header of llm.c model file `path`, every check done before any tensor is read:
    magic, version, sizes (positive, bounded, C % NH == 0, Vp >= V), and the file's length
    equal to what the sizes need. Raises LlmcFormatError naming the field that is wrong."""
    with open(path, "rb") as f:
        raw = f.read(HEADER_BYTES)
        size = os.fstat(f.fileno()).st_size
    if len(raw) < HEADER_BYTES:
        raise LlmcFormatError(path, "header", f"the file is {size} bytes, shorter than "
                              f"the {HEADER_BYTES}-byte header of an llm.c model file")
    h = [int(v) for v in np.frombuffer(raw, dtype="<i4")]
    if h[0] != MODEL_MAGIC:
        raise LlmcFormatError(path, "magic", f"not an llm.c model file: it starts with "
                              f"{h[0]}, llm.c's model files with {MODEL_MAGIC}")
    if h[1] not in VERSIONS:
        known = ", ".join(f"{v} ({d})" for v, d in VERSIONS.items())
        raise LlmcFormatError(path, "version", f"llm.c model version {h[1]} is not supported, "
                              f"only {known}; export it again with llm.c's train_gpt2.py")
    values = {name: h[2 + j] for j, (name, _, _) in enumerate(_FIELDS)}
    problem = _size_problem(values)
    if problem is not None:
        raise LlmcFormatError(path, problem[0], f"header: {problem[1]}")
    header = LlmcHeader(version=h[1], dtype=VERSIONS[h[1]], **values)
    need = header.file_size()
    if size != need:
        what = "truncated" if size < need else f"{size - need} bytes too long"
        raise LlmcFormatError(path, "length", (
            f"the file is {size} bytes but its header (maxT={header.block_size}, "
            f"Vp={header.padded_vocab_size}, L={header.n_layer}, C={header.n_embd}, "
            f"{header.dtype}) needs {need}: {what}; it is damaged or not an llm.c model"))
    return header


def read_llmc(path) -> tuple[GPTConfig, dict[str, np.ndarray]]:
    """(GPTConfig, params) of llm.c model file `path`: float32 host arrays in gpt2np's names
    and layout (linear weights transposed to (in, out), wte cropped to the V real tokens,
    bf16 widened exactly). Reads one tensor slice at a time."""
    header = read_llmc_header(path)
    config = header.config()
    params = {}
    offset = HEADER_BYTES
    with open(path, "rb") as f:
        for key, shape, ours, transposed in _file_tensors(config, header.padded_vocab_size):
            # wte's first V rows are the first V*C numbers of its (Vp, C)
            count = int(np.prod(ours))
            a = _read_numbers(f, path, offset, count, header.dtype)
            a = a.reshape(ours[::-1]).T if transposed else a.reshape(ours)
            params[key] = np.ascontiguousarray(a)
            offset += int(np.prod(shape)) * header.itemsize
    return config, {k: params[k] for k in param_shapes(config)}  # the checkpoint's order


def _read_numbers(f, path, offset: int, count: int, dtype: str) -> np.ndarray:
    f.seek(offset)
    raw = np.fromfile(f, dtype=_FILE_DTYPE[dtype], count=count)
    if raw.size != count:  # the length was checked: the file changed while we read it
        raise LlmcFormatError(path, "length", f"ended at byte {offset + raw.nbytes} while "
                              f"reading {count} numbers from byte {offset}")
    return raw.astype(np.float32) if dtype == "float32" else bf16_bits_to_float32(raw)


# ------------------------------------------------------------------------------ bfloat16


def float32_to_bf16_bits(a) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounded to nearest, ties to even, as torch's
    .to(torch.bfloat16) (float64 is first rounded to float32, as torch does). Finite values
    past bf16's largest become inf; a NaN stays a (quiet) NaN of the same sign."""
    u = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    # adding 0x7FFF rounds halves down, 0x8000 up: the kept low bit picks the even one
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    # a NaN's low payload bits could carry into inf: keep its top bits, set the quiet bit
    nan = ((u >> 16) | 0x0040).astype(np.uint16)
    return np.where(np.isnan(u.view(np.float32)), nan, rounded)


def bf16_bits_to_float32(bits) -> np.ndarray:
    """bfloat16 bit patterns (uint16) -> float32, exactly: bf16 is a float32's top half."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


# ------------------------------------------------------------------------------ writing


def write_llmc(path, config: GPTConfig, params: dict, dtype: str = "float32") -> Path:
    """Write `params` (host arrays in gpt2np's names and layout, as model.state_dict() gives)
    as llm.c model file `path`, atomically (a temporary beside it, renamed over it).

    dtype "float32" (version 3) or "bfloat16" (version 5, rounded to nearest even). wte is
    padded with zero rows to Vp, vocab_size rounded up to a multiple of 128; rows a model
    already has past GPT-2's 50257 tokens (trained with a padded vocabulary) are kept, and
    the header's V is then 50257, the tokenizer's, so a reader keeps those 50257 rows.
    """
    if dtype not in VERSION_OF:
        raise ValueError(f"cannot write an llm.c model as {dtype!r}; choose one of "
                         f"{', '.join(VERSION_OF)}")
    if not isinstance(config, GPTConfig):
        raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
    _check_params(config, params)
    values = dict(config.to_dict(), vocab_size=min(config.vocab_size, GPT2_VOCAB_SIZE),
                  padded_vocab_size=-(-config.vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE)
    problem = _size_problem(values)
    if problem is not None:
        raise ValueError(f"cannot write {path} as an llm.c model: {problem[1]}")
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:2] = MODEL_MAGIC, VERSION_OF[dtype]
    header[2:8] = [values[name] for name, _, _ in _FIELDS]

    def write(tmp: Path):
        with open(tmp, "wb") as f:
            f.write(memoryview(header))
            for key, shape, ours, transposed in _file_tensors(config, values["padded_vocab_size"]):
                a = np.asarray(params[key])
                f.write(memoryview(_file_numbers(a.T if transposed else a, dtype)))
                padding = int(np.prod(shape)) - a.size  # wte's rows past vocab_size
                f.write(memoryview(np.zeros(padding, dtype=_FILE_DTYPE[dtype])))

    return replace_atomically(path, write)


def _file_numbers(a: np.ndarray, dtype: str) -> np.ndarray:
    """`a` as the file stores it: contiguous little-endian float32, or bf16 bits."""
    if dtype == "float32":
        return np.ascontiguousarray(a, dtype="<f4")
    return float32_to_bf16_bits(a).astype("<u2", copy=False)


def _check_params(config: GPTConfig, params: dict):
    expected = param_shapes(config)
    missing = [k for k in expected if k not in params]
    unexpected = [k for k in params if k not in expected]
    if missing or unexpected:
        raise ValueError(f"params do not match {config}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for key, shape in expected.items():
        got = tuple(params[key].shape)
        if got != shape:
            raise ValueError(f"params[{key!r}] has shape {got}; {config} needs {shape}")


def write_llmc_tokenizer(path) -> Path:
    """Write GPT-2's tokenizer (gpt2np's tiktoken encoding) as llm.c's tokenizer file `path`,
    atomically: every token's bytes, ids 0 .. 50256 (<|endoftext|>)."""
    enc = get_encoding()
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:4] = TOKENIZER_MAGIC, TOKENIZER_VERSION, enc.n_vocab, EOT_TOKEN
    body = bytearray()
    for i in range(enc.n_vocab):
        token = enc.decode_single_token_bytes(i)
        if len(token) > 255:  # its length must fit one byte
            raise ValueError(f"token {i} is {len(token)} bytes; llm.c's tokenizer file "
                             f"holds at most 255 per token")
        body += bytes([len(token)]) + token
    return replace_atomically(path, lambda tmp: tmp.write_bytes(header.tobytes() + body))
