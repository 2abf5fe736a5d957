"""Documents streamed from Hugging Face `datasets`: FineWeb-Edu, or local files through a builder.

    docs = dataset_documents("HuggingFaceFW/fineweb-edu", config="sample-10BT")
    docs = dataset_documents("parquet", data_files=["a.parquet", "b.parquet"])
    docs = dataset_documents("json", data_files=["a.jsonl"], text_field="content")

`gpt2np.data.prepare --dataset NAME [--dataset-config CFG] [--split train] [--data-files F ...]
[--text-field text]` tokenizes these documents into the same shards as `--input` (build-
nanogpt's fineweb.py does this for FineWeb-Edu's sample-10BT: 100 shards of 1e8 tokens).
The dataset is read with `streaming=True`: records arrive as they are downloaded (or read),
in the dataset's order, and nothing but the hub's own small caches touches the disk, so a
10B-token corpus never has to fit there twice.

`datasets` is an optional extra (pip install 'gpt2np[datasets]'); only this module imports it.
"""
from __future__ import annotations

import os
from typing import Iterator, Sequence

LOCAL_BUILDERS = ("json", "parquet", "csv", "text", "arrow", "pandas")
INSTALL_HINT = "pip install 'gpt2np[datasets]' (or: pip install datasets)"


def _datasets():
    try:
        import datasets
    except ImportError as e:
        raise ImportError(f"reading a Hugging Face dataset needs the `datasets` package, which "
                          f"is not installed: {INSTALL_HINT}") from e
    return datasets


def open_dataset(name: str, config: str | None = None, split: str = "train",
                 data_files: Sequence[str] | None = None):
    """`datasets.load_dataset(name, config, split=split, data_files=..., streaming=True)`,
    with its failures turned into errors that say what was asked for."""
    datasets = _datasets()
    if not name:
        raise ValueError("a dataset name is needed: a hub id (HuggingFaceFW/fineweb-edu) or a "
                         "builder for local files (json, parquet, csv, text) with data files")
    files = list(data_files) if data_files else None
    # a builder reads local files (a hub dataset's data_files are paths inside its repo)
    local = name in getattr(datasets.packaged_modules, "_PACKAGED_DATASETS_MODULES", LOCAL_BUILDERS)
    missing = [f for f in files or () if local and "://" not in f and not _exists(f)]
    if missing:
        raise FileNotFoundError(f"no such data file(s): {', '.join(missing[:5])}")
    what = f"{name!r}" + (f" (config {config!r})" if config else "") + f", split {split!r}"
    try:
        return datasets.load_dataset(name, config, split=split, data_files=files, streaming=True)
    except (ValueError, FileNotFoundError, ConnectionError, OSError) as e:
        offline = (" (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE is set: only cached or local data "
                   "can be read)" if _offline() else "")
        raise RuntimeError(f"cannot open the dataset {what}{offline}: {type(e).__name__}: "
                           f"{' '.join(str(e).split())}") from e


def dataset_documents(name: str, config: str | None = None, split: str = "train",
                      data_files: Sequence[str] | None = None,
                      text_field: str = "text") -> Iterator[str]:
    """The `text_field` of every record of the (streamed) dataset, in its order."""
    ds = open_dataset(name, config, split, data_files)
    columns = getattr(ds, "column_names", None)  # None when the stream does not know them
    if columns is not None and text_field not in columns:
        raise ValueError(f"the dataset {name!r} has no {text_field!r} column; its columns are "
                         f"{', '.join(columns)} (choose one with --text-field)")
    return _texts(ds, name, text_field)


def _texts(ds, name: str, text_field: str) -> Iterator[str]:
    for i, record in enumerate(ds):
        try:
            text = record[text_field]
        except KeyError:
            raise ValueError(f"record {i} of {name!r} has no {text_field!r} field; it has "
                             f"{', '.join(record)} (choose one with --text-field)") from None
        if not isinstance(text, str):
            raise ValueError(f"record {i} of {name!r}: {text_field!r} holds "
                             f"{type(text).__name__}, not text (choose a text column with "
                             f"--text-field)")
        yield text


def describe(name: str, config: str | None = None, split: str = "train",
             data_files: Sequence[str] | None = None, text_field: str = "text") -> dict:
    """Where the documents came from, for the shard folder's meta.json."""
    source = {"dataset": name, "config": config, "split": split, "text_field": text_field}
    if data_files:
        source["data_files"] = [os.path.abspath(f) if _exists(f) else f for f in data_files]
    return source


def _exists(path: str) -> bool:
    import glob

    return os.path.exists(path) or bool(glob.glob(path))  # datasets accepts glob patterns


def _offline() -> bool:
    return any(os.environ.get(v, "").upper() in {"1", "ON", "YES", "TRUE"}
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
