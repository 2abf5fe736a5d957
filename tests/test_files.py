"""gpt2np.files: the target is the old file or the new one, never half of one; one cache."""
import json
import os
import re
from pathlib import Path

import pytest

from gpt2np import files


def test_write_replaces_whole_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "out.json"
    files.write_json(path, {"a": 1})
    files.write_json(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.json"]
    files.write_json(path, {"a": [1]}, indent=2)
    assert path.read_text() == json.dumps({"a": [1]}, indent=2) + "\n"


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    path = tmp_path / "log.jsonl"
    files.write_text(path, "old\n")

    def half_then_fail(tmp):
        tmp.write_text("half")
        raise OSError(28, "No space left on device")

    for fsync in (False, True):
        with pytest.raises(OSError, match="No space left"):
            files.replace_atomically(path, half_then_fail, fsync=fsync)
        assert path.read_text() == "old\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["log.jsonl"]


def test_fsync_writes_the_same_bytes(tmp_path, monkeypatch):
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    path = files.write_bytes(tmp_path / "ckpt", b"\x00\x01data", fsync=True)
    assert path.read_bytes() == b"\x00\x01data"
    assert len(synced) == 2  # the file, then its folder (the rename)
    files.write_bytes(tmp_path / "plain", b"x")
    assert len(synced) == 2


def test_temporary_names_are_recognised(tmp_path):
    seen = []
    files.replace_atomically(tmp_path / "shard_train_000001.npy",
                             lambda tmp: (seen.append(tmp), tmp.write_bytes(b"x")))
    (tmp,) = seen
    assert tmp.parent == tmp_path
    assert re.fullmatch(r"shard_train_000001\.npy\.[0-9a-f]{8}\.tmp", tmp.name)
    assert files.temp_target(tmp.name) == "shard_train_000001.npy"
    assert files.temp_target("meta.json.4242.tmp") == "meta.json"  # older writers' names
    assert files.temp_target("meta.json.tmp") == "meta.json"
    assert files.temp_target("meta.json") is None


def test_the_cache_folder(tmp_path, monkeypatch):
    monkeypatch.delenv(files.CACHE_ENV, raising=False)
    assert files.cache_dir() == Path.home() / ".cache" / "gpt2np"
    monkeypatch.setenv(files.CACHE_ENV, str(tmp_path / "env"))
    assert files.cache_dir() == tmp_path / "env"
    assert files.cache_dir(tmp_path / "flag") == tmp_path / "flag"  # a --cache-dir wins


def test_a_folder_is_replaced_whole(tmp_path):
    dest = tmp_path / "out" / "model"

    def build(text):
        return lambda folder: (folder / "a.txt").write_text(text)

    files.replace_folder(dest, build("one"))
    assert (dest / "a.txt").read_text() == "one"
    files.replace_folder(dest, build("two"))  # an earlier folder is replaced
    assert (dest / "a.txt").read_text() == "two"

    def fail(folder):
        (folder / "a.txt").write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        files.replace_folder(dest, fail)
    assert (dest / "a.txt").read_text() == "two"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["model"]  # no temporary left
