"""Documents from Hugging Face `datasets` (gpt2np.hf_datasets) over local files the test writes."""
from __future__ import annotations

import json
import sys

import pytest

from gpt2np import hf_datasets as D

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
        path.write_text("".join(json.dumps({"id": j, "text": d}) + "\n" for j, d in enumerate(docs)))
        out["json"].append(str(path))
        path = tmp_path / f"part{i}.parquet"
        pq.write_table(pa.table({"id": list(range(len(docs))), "text": docs}), path)
        out["parquet"].append(str(path))
    return out


@pytest.mark.parametrize("builder", ["json", "parquet"])
def test_local_files_stream_in_order(files, builder):
    assert list(D.dataset_documents(builder, data_files=files[builder])) == DOCS
    # the files' order is the documents' order
    assert list(D.dataset_documents(builder, data_files=files[builder][::-1])) == DOCS[3:] + DOCS[:3]


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
