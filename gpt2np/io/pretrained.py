"""Every model source in: Hugging Face GPT-2 folders and hub ids, training runs, llm.c files.

    model = from_pretrained("gpt2")                # hub id, through huggingface_hub's cache
    model = from_pretrained("path/to/folder")      # model.safetensors (+ shards) + config.json
    model = from_pretrained("out/shakespeare")     # a training run: its out-dir ...
    model = from_pretrained("out/shakespeare/ckpt.safetensors")  # ... or its checkpoint file
    model = from_pretrained("gpt2_124M_bf16.bin")  # an llm.c model file (gpt2np.io.llmc)

(and out: gpt2np.io.hf_folder.save_pretrained writes a folder transformers loads)

`model.params` is already named like `GPT2LMHeadModel.state_dict()`, so loading is a rename
(two key layouts exist, see `_canonical_key`) plus a check of every name and shape against
the config, and export is a copy. A training checkpoint holds the same names (and the
optimizer's moments, which a model does not need) and its GPTConfig in its metadata.
No torch at run time.
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from gpt2np.config import GPTConfig
from gpt2np.io import safetensors_layout
from gpt2np.io.checkpoint import CKPT_NAME, CheckpointError, is_checkpoint, load_checkpoint
from gpt2np.io.hf_folder import (CONFIG_NAME, PICKLE_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME,
                                 check_representable, load_config)
from gpt2np.io.llmc import MODEL_MAGIC, is_llmc_model, read_llmc
from gpt2np.model import GPT, param_shapes
from gpt2np.untrusted import check_finite, inside, read_json

# Short names of the four OpenAI releases; on the hub they live under openai-community/.
HUB_NAMES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
}
# Non-parameter buffers that older GPT-2 checkpoints carry: the causal mask ("attn.bias",
# (1,1,n_pos,n_pos)) and the masking constant ("attn.masked_bias"). We build the mask ourselves.
_BUFFER = re.compile(r"^transformer\.h\.\d+\.attn\.(bias|masked_bias)$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


# ------------------------------------------------------------------------------ public API


def from_pretrained(name_or_path, *, backend: str = "numpy", dtype: str = "float32",
                    revision: str | None = None, cache_dir=None, local_files_only: bool = False,
                    allow_pickle: bool = False) -> GPT:
    """A GPT holding GPT-2 weights from any model source.

    name_or_path, in the order it is tried:
      - an llm.c model file (gpt2_124M.bin, gpt2_124M_bf16.bin, its trainer's model_*.bin),
        known by its first 4 bytes whatever its name; its header is checked before anything
        else is read (gpt2np.io.llmc), and its padded vocabulary rows, no tokens, are dropped;
      - a gpt2np training run: its out-dir (which holds `ckpt.safetensors`) or that checkpoint
        file itself; the checkpoint's metadata has the GPTConfig, its SHA-256 is checked;
      - a local folder with `model.safetensors` (or a sharded `model.safetensors.index.json`)
        and `config.json`, as transformers' save_pretrained (or `gpt2np export`) writes;
      - a hub id: "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "openai-community/gpt2", or
        any "owner/name" GPT-2 repo. Hub files go through huggingface_hub's cache (HF_HOME /
        HF_HUB_CACHE, or `cache_dir`); with HF_HUB_OFFLINE=1 or `local_files_only=True` only
        the cache is read.
    dtype: the model's dtype whatever the file's (a float32 run loads as float64, etc.).
    allow_pickle: also accept `pytorch_model.bin` when no safetensors exist (read with
    torch.load(weights_only=True); needs torch). Off by default: pickles can run code.
    """
    llmc_file = os.path.expanduser(str(name_or_path))
    if is_llmc_model(llmc_file):  # known by its magic, whatever its name
        config, params = read_llmc(llmc_file)
    elif (ckpt := training_checkpoint(name_or_path)) is not None:
        config, params = load_run(ckpt)
    else:
        folder = resolve(name_or_path, revision=revision, cache_dir=cache_dir,
                         local_files_only=local_files_only, allow_pickle=allow_pickle)
        config = load_config(folder / CONFIG_NAME)
        params = read_weights(folder, config, allow_pickle=allow_pickle)
    # whatever the source: NaN or inf weights would sample token 0 and score label 0, and
    # so would finite ones that the model's dtype holds as inf
    check_finite(params, f"the weights of {name_or_path}")
    if str(dtype) == "float32":  # (GPT refuses dtypes it does not compute in)
        check_representable(params, "float32", f"the weights of {name_or_path} as float32")
    return GPT(config, backend=backend, dtype=dtype, params=params)


# ------------------------------------------------------------------------------ where the files are


def resolve(name_or_path, *, revision=None, cache_dir=None, local_files_only=False,
            allow_pickle=False) -> Path:
    """The local folder holding config.json and the weights: the folder itself, or the
    huggingface_hub cache snapshot for a hub id (downloaded unless offline).

    A name that looks like a path (see `looks_like_path`) is only ever a path: a mistyped
    run folder is "no such folder" at once, never a hub request.
    """
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise OSError(f"{path} is no model: it holds neither {CKPT_NAME} (a gpt2np training "
                          f"run's out-dir) nor {CONFIG_NAME} with {WEIGHTS_NAME} or "
                          f"{WEIGHTS_INDEX_NAME} (a Hugging Face model folder)")
        return path
    if path.exists():
        raise OSError(f"{str(name_or_path)!r} is a file but not a gpt2np training checkpoint, "
                      f"nor an llm.c model file (which starts with {MODEL_MAGIC}); pass a "
                      f"training run's out-dir or its {CKPT_NAME}, an llm.c model file, or the "
                      f"folder that holds {WEIGHTS_NAME} and {CONFIG_NAME}")
    name = str(name_or_path)
    repo_id = HUB_NAMES.get(name, name)
    if looks_like_path(name) or not _REPO_ID.match(repo_id):
        raise OSError(f"no such folder: {name!r}; pass a training run's out-dir or its "
                      f"{CKPT_NAME}, a model folder ({WEIGHTS_NAME} + {CONFIG_NAME}), or a "
                      f"Hugging Face hub id: {', '.join(HUB_NAMES)} or 'owner/name'")
    try:
        return _hub_snapshot(repo_id, revision=revision, cache_dir=cache_dir,
                             local_files_only=local_files_only, allow_pickle=allow_pickle)
    except OSError as e:
        if name in HUB_NAMES or repo_id in HUB_NAMES.values():
            raise
        # "someone/model" is both a path and a hub id: say that neither was found
        raise OSError(f"no such folder: {name!r} (a training run's out-dir or a model folder); "
                      f"as a Hugging Face hub id: {e}") from e


def looks_like_path(name: str) -> bool:
    """True for a model source that can only be a path, never a hub id ("owner/name"):
    absolute, ~ or . first, a backslash, more than one /, a trailing /, a file name of a model
    file (.safetensors, .json, .bin), or a first part that is a local folder ("out/run" when
    out/ exists)."""
    if os.path.isabs(name) or name.startswith(("~", ".")) or "\\" in name:
        return True
    if name.count("/") > 1 or name.endswith("/"):
        return True
    if name.endswith((".safetensors", ".json", ".bin")):
        return True
    return "/" in name and os.path.isdir(name.split("/")[0])


def _hub_snapshot(repo_id, *, revision, cache_dir, local_files_only, allow_pickle) -> Path:
    """config.json and the weights in the hub cache (downloaded if need be and possible); the
    snapshot folder.

    hf_hub_download is the one path for online and offline: it reads the cache layout
    (models--owner--name/snapshots/<rev>/, refs/<branch>) and, when offline, only that.
    Online, one request without retries comes first: if the hub cannot be reached, the cache
    is read instead, or the error says so at once (huggingface_hub itself retries for ~25 s).
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    # huggingface_hub reads HF_HUB_OFFLINE once at import; also honour it if set since
    offline_env = os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}
    why_offline = ("local_files_only=True" if local_files_only else
                   "offline: HF_HUB_OFFLINE is set" if offline_env else
                   _hub_unreachable(repo_id, revision))
    offline = why_offline is not None
    where = str(cache_dir or constants.HF_HUB_CACHE)

    def get(filename, revision):
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                    local_files_only=offline))

    try:
        config_path = get(CONFIG_NAME, revision)
    except Exception as e:  # not cached while offline, unknown repo, a gated one, ...
        if offline:
            raise OSError(_not_cached(repo_id, why_offline, where)) from e
        raise OSError(f"cannot get {CONFIG_NAME} of {repo_id!r} from the Hugging Face hub: "
                      f"{type(e).__name__}: {e}") from e
    folder = config_path.parent
    # the snapshot folder is named by the commit: fetch the weights from that same commit,
    # so that a push between two downloads cannot pair one commit's config with another's weights
    commit = folder.name
    candidates = [WEIGHTS_NAME, WEIGHTS_INDEX_NAME] + ([PICKLE_NAME] if allow_pickle else [])
    for filename in candidates:
        try:
            path = get(filename, commit)
        except EntryNotFoundError:  # not in the repo (or, offline, not in the cache)
            continue
        if filename == WEIGHTS_INDEX_NAME:
            for shard in index_shards(path):
                get(shard, commit)
        return folder
    raise OSError(f"{repo_id!r} has none of {', '.join(candidates)} "
                  f"{f'in the Hugging Face cache ({where}; {why_offline})' if offline else 'on the hub'}"
                  + ("" if allow_pickle else f" ({PICKLE_NAME} is read only with allow_pickle=True)"))


def _hub_unreachable(repo_id, revision) -> str | None:
    """None if the hub answers (whatever it answers: hf_hub_download then says what it
    means), else why it cannot be reached. One HEAD request, no retries."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import HfHubHTTPError

    try:
        get_hf_file_metadata(hf_hub_url(repo_id, CONFIG_NAME, revision=revision),
                             timeout=constants.HF_HUB_ETAG_TIMEOUT)
    except HfHubHTTPError:
        return None
    except Exception as e:  # no network, no DNS, a closed port, a timeout
        return f"the Hugging Face hub ({constants.ENDPOINT}) cannot be reached: {type(e).__name__}: {e}"
    return None


def _not_cached(repo_id, why_offline: str, where: str) -> str:
    """One line: the hub id is not in the cache and cannot be downloaded; what to do."""
    if why_offline.startswith("offline"):
        fetch = ("download it once without HF_HUB_OFFLINE where the hub is reachable "
                 "(HF_HUB_CACHE names the cache folder)")
    else:
        fetch = ("download it where the hub is reachable and copy that cache here (HF_HUB_CACHE "
                 "names its folder); HF_HUB_OFFLINE=1 then reads the cache without trying the "
                 "network")
    return (f"{repo_id!r} is not in the Hugging Face cache ({where}) and cannot be downloaded "
            f"({why_offline}): use a model folder or a training run's out-dir (e.g. "
            f"out/shakespeare), or {fetch}")


# ------------------------------------------------------------------------------ training runs


def training_checkpoint(name_or_path) -> Path | None:
    """The checkpoint file if name_or_path is a training run (its out-dir, or the checkpoint
    itself), else None."""
    path = Path(os.path.expanduser(str(name_or_path)))
    if path.is_dir():
        return path / CKPT_NAME if (path / CKPT_NAME).is_file() else None
    if path.is_file() and (path.name == CKPT_NAME or is_checkpoint(path)):
        return path  # (a damaged ckpt.safetensors then gets load_checkpoint's own error)
    return None


def load_run(path) -> tuple[GPTConfig, dict[str, np.ndarray]]:
    """(GPTConfig, params) of a training checkpoint, checked (gpt2np.io.checkpoint: its params
    match the config its metadata records, which gpt2np.train.loop saves as "model_config")."""
    ckpt = load_checkpoint(path)
    if "model_config" not in ckpt.state:
        raise CheckpointError(f"{path} has no model_config in its metadata; was it written by "
                              f"gpt2np.train.loop?")
    return GPTConfig.from_dict(ckpt.state["model_config"]), ckpt.params


# ------------------------------------------------------------------------------ weights


def _canonical_key(key: str) -> str:
    """The hub's openai-community files name keys "h.0.attn.c_attn.weight"; transformers'
    save_pretrained writes "transformer.h.0.attn.c_attn.weight". Map both to the latter."""
    if key.startswith("transformer.") or key.startswith("lm_head."):
        return key
    return "transformer." + key


def weight_files(folder, allow_pickle: bool = False) -> list[Path]:
    """The weight files in `folder`: model.safetensors, else the shards its index names,
    else (only if allowed) pytorch_model.bin."""
    folder = Path(folder)
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        shards = [folder / s for s in index_shards(index)]
        missing = [p.name for p in shards if not p.is_file()]
        if missing:
            raise OSError(f"{index} names shards missing from {folder}: {missing}")
        return shards
    if (folder / PICKLE_NAME).is_file():
        if allow_pickle:
            return [folder / PICKLE_NAME]
        raise OSError(f"{folder} holds only {PICKLE_NAME}, a pickle, which can run code when "
                      f"loaded; convert it to {WEIGHTS_NAME}, or pass allow_pickle=True if you "
                      f"trust it")
    raise OSError(f"no {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}) in {folder}")


def index_shards(index) -> list[str]:
    """The shard files a model.safetensors.index.json names (its weight_map's values), each
    a file inside the index's folder (gpt2np.untrusted.inside), in order."""
    index = Path(index)
    d = read_json(index)
    weight_map = d.get("weight_map") if isinstance(d, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} is not a safetensors index: it has no weight_map object "
                         f"mapping tensor names to shard files")
    for key, shard in weight_map.items():
        inside(index.parent, shard, source=index, what=f"weight_map[{key!r}]",
               roots=_hub_repo(index.parent))
    return sorted(set(weight_map.values()))


def _hub_repo(folder: Path) -> list[Path]:
    """[the repo's cache folder] if `folder` is a Hugging Face cache snapshot
    (models--owner--name/snapshots/<commit>), whose files are links into the repo's blobs/;
    else []."""
    if folder.parent.name == "snapshots" and folder.parent.parent.name.startswith("models--"):
        return [folder.parent.parent]
    return []


def read_weights(folder, config: GPTConfig, allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """The params dict (host numpy, the file's dtype) for `config` from the folder's weights.

    Every expected key must be present once with the expected shape and a float dtype;
    buffers are dropped; a stored lm_head.weight must equal wte (tied) and is dropped.
    Anything else is an error. All of it is checked from the files' headers (themselves
    checked against the files' sizes) before any tensor is read.
    """
    expected = param_shapes(config)
    stored = _match([t for file in weight_files(folder, allow_pickle) for t in _stored(file)],
                    expected, config, folder)
    params = {name: t.read() for name, t in stored.items()}
    lm_head = params.pop("lm_head.weight", None)
    if lm_head is not None and not np.array_equal(lm_head, params["transformer.wte.weight"]):
        raise ValueError(f"lm_head.weight in {stored['lm_head.weight'].file} differs from "
                         f"transformer.wte.weight; only the tied GPT-2 lm_head is supported")
    return {k: params[k] for k in expected}  # the checkpoint's order


def _match(tensors: list, expected: dict, config: GPTConfig, folder) -> dict:
    """{param name (or lm_head.weight): its _Stored} for `config`, or an error naming the
    file and the tensor that does not fit."""
    shapes = {**expected, "lm_head.weight": expected["transformer.wte.weight"]}  # (tied)
    found = {}
    for t in tensors:
        name = _canonical_key(t.key)
        if _BUFFER.match(name):
            continue
        if name in found:
            raise ValueError(f"{name!r} is stored twice: in {found[name].file} and {t.file}"
                             f" (as {t.key!r})")
        want = shapes.get(name)
        if want is None:
            raise ValueError(f"unexpected key {t.key!r} in {t.file}: not a parameter of a "
                             f"GPT-2 with {config}")
        if tuple(t.shape) != want:
            raise ValueError(f"{t.key!r} in {t.file} has shape {tuple(t.shape)}; "
                             f"{CONFIG_NAME} ({config}) needs {want}")
        if not t.is_float:
            raise ValueError(f"{name!r} in {t.file} has dtype {t.dtype}, not a float")
        found[name] = t
    missing = [k for k in expected if k not in found]
    if missing:
        raise ValueError(f"missing keys in the weights of {folder}: {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''}")
    return found


@dataclass
class _Stored:
    """One tensor of a weight file: its key, shape and dtype from the header; read() reads it."""

    file: Path
    key: str
    shape: tuple
    dtype: str  # safetensors' name ("F32", ...), or torch's for a pickle ("torch.float32")
    read: Callable[[], np.ndarray]

    @property
    def is_float(self) -> bool:
        return self.dtype in _FILE_DTYPES or self.dtype.startswith(("torch.float", "torch.bfloat"))


# safetensors dtypes a GPT-2 checkpoint may hold, as numpy reads their bytes (BF16: the bits)
_FILE_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def _stored(file: Path) -> list[_Stored]:
    """The tensors of a weight file, from its header (checked against the file's size)."""
    if file.name.endswith(".bin"):
        return _pickle_tensors(file)
    try:
        header, offset = safetensors_layout.read_header(file)
        layout = safetensors_layout.check_tensors(file, header, offset)
    except ValueError as e:  # truncated, corrupt header, not safetensors at all
        raise OSError(f"cannot read {file} as safetensors: {e}") from e
    return [_Stored(file, key, shape, dtype, lambda key=key, shape=shape, dtype=dtype:
                    _read(file, offset + header[key]["data_offsets"][0], dtype, shape, key))
            for key, (dtype, shape) in layout.items()]


def _read(file: Path, start: int, dtype: str, shape, key: str) -> np.ndarray:
    count = math.prod(shape)
    raw = np.fromfile(file, dtype=_FILE_DTYPES[dtype], count=count, offset=start)
    if raw.size != count:  # its size was checked: the file changed while we read it
        raise OSError(f"cannot read {key!r} from {file}: the file ended early")
    if dtype == "BF16":  # numpy has no bfloat16: a bfloat16 is the top half of a float32
        raw = (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(raw.dtype.newbyteorder("="), copy=False).reshape(shape)


def _pickle_tensors(file: Path) -> list[_Stored]:
    # Opt-in only (allow_pickle=True). weights_only=True refuses arbitrary objects.
    import torch

    state = torch.load(str(file), map_location="cpu", weights_only=True)
    return [_Stored(file, key, tuple(t.shape), str(t.dtype),
                    lambda t=t: t.detach().float().numpy() if t.dtype == torch.bfloat16
                    else t.detach().numpy()) for key, t in state.items()]
