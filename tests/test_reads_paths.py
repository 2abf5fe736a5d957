"""Paths that a file's content names stay inside that file's folder (gpt2np.untrusted.inside):
a sharded model's index, a shard folder's meta.json. Every hostile entry is refused with an
error naming the file and the entry, before anything outside the folder is read; the same
entries behave the same in every reader (the class, not the examples)."""
import json
import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import gpt2np
from gpt2np.commands import generate as generate_cmd
from gpt2np.data.shards import ShardLoader, folder_shards
from gpt2np.untrusted import UntrustedFileError, inside
from hostile import cli, shard_folder, sharded_folder

# entries that leave the folder, by name alone ("{outside}": an absolute path that exists)
ESCAPES = ["../x.safetensors", "{outside}", "sub/../../x.safetensors", "./../x.safetensors",
           "..\\x.safetensors", "C:\\x.safetensors", "\\\\host\\share\\x", "..", "a/../..",
           "x\0.safetensors"]
NOT_NAMES = [5, None, "", ["a"], {"a": 1}, True, 1.5]


def _index(folder):
    return folder / "model.safetensors.index.json"


def _point_shard(folder, entry):
    """Make the index send its second shard's tensors to `entry`."""
    d = json.loads(_index(folder).read_text())
    d["weight_map"] = {k: (entry if v.endswith("00002.safetensors") else v)
                       for k, v in d["weight_map"].items()}
    _index(folder).write_text(json.dumps(d))


@pytest.fixture
def outside(tmp_path):
    """A valid shard outside the model folder, so that a reader that follows the entry would
    succeed: only the check stops it."""
    sharded_folder(tmp_path / "src")
    target = tmp_path / "x.safetensors"
    target.write_bytes((tmp_path / "src" / "model-00002-of-00002.safetensors").read_bytes())
    return target


def test_a_sharded_folder_loads(tmp_path):
    gpt2np.from_pretrained(sharded_folder(tmp_path / "m"))


@pytest.mark.parametrize("entry", ESCAPES + NOT_NAMES, ids=repr)
def test_index_entries_outside_the_folder_are_refused(tmp_path, outside, entry):
    folder = sharded_folder(tmp_path / "m")
    entry = entry.format(outside=outside) if isinstance(entry, str) else entry
    _point_shard(folder, entry)
    with pytest.raises(UntrustedFileError) as e:
        gpt2np.from_pretrained(folder)
    msg = str(e.value)
    assert str(_index(folder)) in msg and "weight_map[" in msg and repr(entry)[:20] in msg


def test_an_index_shard_linked_outside_is_refused(tmp_path, outside):
    folder = sharded_folder(tmp_path / "m")
    (folder / "model-00002-of-00002.safetensors").unlink()
    (folder / "model-00002-of-00002.safetensors").symlink_to(outside)
    with pytest.raises(UntrustedFileError, match="is a link to .*outside"):
        gpt2np.from_pretrained(folder)
    # a folder on the way that is a link counts the same
    _point_shard(folder, "sub/model-00002-of-00002.safetensors")
    (folder / "sub").symlink_to(tmp_path / "src")
    with pytest.raises(UntrustedFileError, match="outside"):
        gpt2np.from_pretrained(folder)


def test_links_inside_the_folder_are_followed(tmp_path):
    folder = sharded_folder(tmp_path / "m")
    (folder / "sub").mkdir()
    os.replace(folder / "model-00002-of-00002.safetensors", folder / "sub" / "real.safetensors")
    (folder / "model-00002-of-00002.safetensors").symlink_to("sub/real.safetensors")
    gpt2np.from_pretrained(folder)


def test_a_hub_cache_snapshot_links_into_its_blobs(tmp_path):
    """huggingface_hub's cache: snapshot files are links to ../../blobs; that is allowed, a
    link past the repo's cache folder is not."""
    src = sharded_folder(tmp_path / "src")
    repo = tmp_path / "hub" / "models--someone--tiny"
    snap = repo / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (repo / "blobs").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    for f in src.iterdir():
        (repo / "blobs" / f.name).write_bytes(f.read_bytes())
        (snap / f.name).symlink_to(os.path.relpath(repo / "blobs" / f.name, snap))
    gpt2np.from_pretrained("someone/tiny", cache_dir=tmp_path / "hub", local_files_only=True)
    link = snap / "model-00002-of-00002.safetensors"
    link.unlink()
    link.symlink_to(src / "model-00002-of-00002.safetensors")
    with pytest.raises(UntrustedFileError, match="outside"):
        gpt2np.from_pretrained("someone/tiny", cache_dir=tmp_path / "hub", local_files_only=True)


def test_the_command_names_the_index_and_the_entry(tmp_path, outside, capsys):
    folder = sharded_folder(tmp_path / "m")
    _point_shard(folder, 7)
    code, last, _ = cli(generate_cmd.main, ["--model", folder, "--max-new-tokens", "1"], capsys)
    assert code == 1 and last.startswith("error:")
    assert "model.safetensors.index.json" in last and "weight_map[" in last and "7" in last


# ------------------------------------------------------------------------------ shard folders


def _meta_file(folder, entry):
    meta = json.loads((folder / "meta.json").read_text())
    meta["shards"][1]["file"] = entry
    (folder / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("entry", ESCAPES, ids=repr)
def test_meta_entries_outside_the_folder_are_refused(tmp_path, entry):
    folder = shard_folder(tmp_path / "data")
    outside = tmp_path / "x.npy"
    outside.write_bytes((folder / "toy_train_000001.npy").read_bytes())
    (folder / "toy_train_000001.npy").unlink()
    _meta_file(folder, entry.format(outside=outside))
    for read in (lambda: folder_shards(str(folder), "train"),
                 lambda: ShardLoader(str(folder), 2, 8, split="train")):
        with pytest.raises(UntrustedFileError) as e:
            read()
        assert str(folder / "meta.json") in str(e.value) and "shard" in str(e.value)


def test_a_meta_entry_linked_outside_is_refused(tmp_path):
    folder = shard_folder(tmp_path / "data")
    outside = tmp_path / "elsewhere.npy"
    os.replace(folder / "toy_train_000001.npy", outside)
    (folder / "toy_train_000001.npy").symlink_to(outside)
    with pytest.raises(UntrustedFileError, match="is a link to .*outside"):
        ShardLoader(str(folder), 2, 8, split="train")


def test_a_meta_entry_of_another_type_is_refused(tmp_path):
    folder = shard_folder(tmp_path / "data")
    _meta_file(folder, 3)
    with pytest.raises(OSError, match="meta.json is unreadable.*bad entry"):
        ShardLoader(str(folder), 2, 8, split="train")


# ------------------------------------------------------------------------------ the rule itself

parts = st.sampled_from(["..", ".", "a", "b", "link", "out", "", "/", "\\", "C:"])


@given(st.lists(parts, min_size=1, max_size=6))
def test_inside_never_returns_a_path_outside(tmp_path_factory, pieces):
    """Whatever the entry, inside() either refuses it or returns a path that, links
    followed, is in the folder (the folder holds a link to outside it, "link")."""
    root = tmp_path_factory.getbasetemp() / "inside_rule"
    folder = root / "folder"
    if not folder.exists():
        (root / "out").mkdir(parents=True)
        (folder / "a" / "b").mkdir(parents=True)
        (folder / "link").symlink_to(root / "out")
    entry = "/".join(pieces)
    try:
        path = inside(folder, entry, source="test")
    except UntrustedFileError:
        return
    real, top = os.path.realpath(path), os.path.realpath(folder)
    assert real == top or real.startswith(top + os.sep), (entry, real)


def test_inside_keeps_ordinary_names():
    assert inside("/data", "toy_train_000001.npy", source="x") == Path("/data/toy_train_000001.npy")
    assert inside("/data", "sub/b.npy", source="x") == Path("/data/sub/b.npy")
