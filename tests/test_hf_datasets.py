"""Documents from Hugging Face `datasets` (gpt2np.data.hf_datasets) over local files the test writes."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from gpt2np.data import hf_datasets as D

pytest.importorskip("datasets")

DOCS = ["First document.\nWith two lines.", "", "  second: ünïcödé & <|endoftext|> as text ",
        "third " * 50, "last"]


@pytest.fixture
def files(tmp_path):
    """The documents as two jsonl files and as two parquet files (3 + 2 records)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    parts = (DOCS[:3], DOCS[3:])
    out = {"json": [], "parquet": []}
    for i, docs in enumerate(parts):
        path = tmp_path / f"part{i}.jsonl"
        path.write_text("".join(json.dumps({"id": j, "text": d}) + "\n"
                                for j, d in enumerate(docs)))
        out["json"].append(str(path))
        path = tmp_path / f"part{i}.parquet"
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path)
        out["parquet"].append(str(path))
    return out


@pytest.mark.parametrize("builder", ["json", "parquet"])
def test_local_files_stream_in_order(files, builder):
    assert list(D.dataset_documents(builder, data_files=files[builder])) == DOCS
    # the files' order is the documents' order
    reordered = D.dataset_documents(builder, data_files=files[builder][::-1])
    assert list(reordered) == DOCS[3:] + DOCS[:3]


def test_a_missing_text_field_lists_the_columns(files):
    with pytest.raises(ValueError, match=r"no 'content' column; its columns are id, text"):
        list(D.dataset_documents("json", data_files=files["json"], text_field="content"))


def test_a_non_text_field_is_refused(files):
    with pytest.raises(ValueError, match="'id' holds int, not text"):
        list(D.dataset_documents("parquet", data_files=files["parquet"], text_field="id"))


def test_missing_files_and_splits_are_named(files, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        D.dataset_documents("json", data_files=[str(tmp_path / "nowhere.jsonl")])
    with pytest.raises(RuntimeError, match="split 'validation'.*Bad split"):
        D.dataset_documents("json", data_files=files["json"], split="validation")


def test_without_datasets_the_error_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(ImportError, match=r"pip install 'gpt2np\[datasets\]'"):
        D.dataset_documents("HuggingFaceFW/fineweb-edu", "sample-10BT")


def test_describe_records_the_source(files):
    d = D.describe("parquet", None, "train", files["parquet"], "text")
    assert d == {"dataset": "parquet", "config": None, "split": "train", "text_field": "text",
                 "data_files": files["parquet"]}


# ----------------------------------------------------------------------- prepare --dataset


def _shards(folder):
    from gpt2np.data.shards import load_shard, read_meta

    meta = read_meta(str(folder))
    return meta, [np.asarray(load_shard(str(folder / s["file"]))) for s in meta["shards"]]


@pytest.mark.parametrize("builder", ["json", "parquet"])
def test_prepare_dataset_gives_the_shards_of_input(files, tmp_path, builder, capsys):
    from gpt2np.commands import prepare

    common = ["--shard-size", "20", "--val-shard-size", "30", "--workers", "1", "--no-progress"]
    assert prepare.main(["--input", *files["json"], "--out-dir", str(tmp_path / "a"), *common]) == 0
    assert prepare.main(["--dataset", builder, "--data-files", *files[builder],
                         "--out-dir", str(tmp_path / "b"), *common]) == 0
    (meta_a, a), (meta_b, b) = _shards(tmp_path / "a"), _shards(tmp_path / "b")
    assert len(a) == len(b) >= 3 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert meta_a["shards"] == meta_b["shards"] and meta_a["documents"] == meta_b["documents"] == 4
    assert meta_b["source"]["dataset"] == builder and meta_b["source"]["split"] == "train"


@pytest.mark.parametrize("argv, message", [
    (["--input", "x.txt", "--dataset", "json"], "not allowed with argument"),
    (["--input", "x.txt", "--data-files", "x.jsonl"],
     "--data-files, --dataset-config and --split go with --dataset"),
    ([], "one of the arguments --input/-i --dataset is required"),
])
def test_prepare_dataset_flags_are_checked(tmp_path, capsys, argv, message):
    from gpt2np.commands import prepare

    try:
        code = prepare.main([*argv, "--out-dir", str(tmp_path / "out")])
    except SystemExit as e:
        code = e.code
    assert code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_prepare_without_datasets_says_how_to_install(files, tmp_path, monkeypatch, capsys):
    from gpt2np.commands import prepare

    monkeypatch.setitem(sys.modules, "datasets", None)
    assert prepare.main(["--dataset", "json", "--data-files", *files["json"],
                         "--out-dir", str(tmp_path / "out"), "--no-progress"]) == 1
    assert "pip install 'gpt2np[datasets]'" in capsys.readouterr().err
