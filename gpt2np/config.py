"""GPTConfig: the hyperparameters that fix a GPT-2's shapes, with the four OpenAI presets."""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace

# GPT-2's tokenizer: 50,000 BPE merges + 256 bytes + <|endoftext|>. A model may have more
# embedding rows (padding, e.g. 50304 = 393 * 128), never fewer.
GPT2_VOCAB_SIZE = 50257

# The four released GPT-2 sizes (block 1024, vocab 50257 for all of them).
PRESETS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}

# The largest value of each field, and of the parameter count, that gpt2np believes: far past
# any GPT-2, they only reject nonsense (a damaged or hostile config.json, checkpoint or
# header) before a size read from a file allocates anything.
LIMITS = {"block_size": 2 ** 20, "vocab_size": 2 ** 20, "n_layer": 1024, "n_head": 65536,
          "n_embd": 65536}
MAX_PARAMS = 10 ** 11


@dataclass(frozen=True)
class GPTConfig:
    block_size: int = 1024  # longest sequence the position table holds
    vocab_size: int = GPT2_VOCAB_SIZE
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768

    def __post_init__(self):
        for name, limit in LIMITS.items():
            value = getattr(self, name)
            # bool is an int subclass; True as a layer count is surely a mistake
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"GPTConfig.{name} must be an int, got {value!r}")
            if not 1 <= value <= limit:
                raise ValueError(f"GPTConfig.{name} must be positive and at most {limit}, "
                                 f"got {value}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(
                f"GPTConfig.n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})"
            )
        if self.num_params() > MAX_PARAMS:
            raise ValueError(f"GPTConfig {self.to_dict()} has {self.num_params():,} parameters, "
                             f"more than the {MAX_PARAMS:,} gpt2np accepts")

    def num_params(self) -> int:
        """The parameter count (gpt2np.model.param_shapes' arrays), without building them."""
        C = self.n_embd
        per_layer = 12 * C * C + 13 * C  # c_attn, c_proj, c_fc, c_proj weights and biases; 2 LN
        return (self.vocab_size + self.block_size) * C + self.n_layer * per_layer + 2 * C

    @property
    def head_size(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GPTConfig":
        """GPTConfig.from_preset("gpt2-medium", vocab_size=50304)."""
        key = name.split("/")[-1]  # accept "openai-community/gpt2"
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
        return cls(**{**PRESETS[key], **overrides})

    def replace(self, **changes) -> "GPTConfig":
        return replace(self, **changes)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GPTConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a GPTConfig is a dict of its fields, got {type(d).__name__}")
        known = {"block_size", "vocab_size", "n_layer", "n_head", "n_embd"}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown GPTConfig fields: {sorted(unknown)}")
        return cls(**d)
