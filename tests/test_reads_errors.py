"""A damaged or foreign file ends in one `error:` line that names the file (and the line,
entry or field) and what to do, never in a library's internal message; a damaged log does
not block a resume at all."""
import json
import pickle
import re

import numpy as np
import pytest

from gpt2np.commands import eval as eval_cmd
from gpt2np.commands import generate as generate_cmd
from gpt2np.data.shards import ShardLoader, load_shard
from gpt2np.evals import hellaswag as H
from gpt2np.generate import generate
from gpt2np.train import outputs
from hostile import cli, model_folder, shard_folder, sharded_folder

# ------------------------------------------------------------------------------ log.jsonl

DAMAGE = [b"[1, 2, 3]", b"\xff\xfe not utf-8", b'{"step": "3", "train_loss": 1.0}',
          b'{"train_loss": 1.0}', b'{"step": -1}', b'{"step": true}', b"[" * 100_000,
          b'"just a string"', b"x" * 5000]


def test_a_damaged_log_does_not_block_a_resume(tmp_path, monkeypatch):
    """The reported case: a log line that is a JSON list stopped --resume of a valid
    checkpoint with `'list' object has no attribute 'get'`."""
    from gpt2np.train.loop import train
    from tiny_run import tiny_config, train_tiny

    run = train_tiny(tmp_path / "run", tmp_path / "cache", max_steps=4, eval_interval=2)
    log = run / outputs.LOG_NAME
    good = log.read_bytes().splitlines()
    assert len(good) == 4
    log.write_bytes(b"\n".join(good[:2] + DAMAGE + good[2:]) + b"\n")
    monkeypatch.setattr(outputs, "MAX_LINE_BYTES", 4096)  # the b"x" * 5000 line is too long
    with pytest.warns(UserWarning, match="log.jsonl: skipped 9 damaged line") as w:
        result = train(tiny_config(run, tmp_path / "cache", max_steps=6, eval_interval=2,
                                   resume=True))
    assert "line 3, 4, 5, 6, 7 ..." in str(w[0].message)
    assert result.status == "done" and [r["step"] for r in result.records] == list(range(6))
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == list(range(6))


def test_a_log_cut_short_by_a_crash_is_read_without_a_warning(tmp_path, recwarn):
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"step": 0, "train_loss": 1.0}\n{"step": 1, "train_lo')
    assert outputs.read_jsonl(log) == [{"step": 0, "train_loss": 1.0}]
    assert not recwarn.list


# ------------------------------------------------------------------------------ HellaSwag


def test_a_non_utf8_hellaswag_file_is_named_with_its_line(tmp_path, capsys):
    good = json.dumps({"ctx": "A man", "endings": ["a.", "b.", "c.", "d."], "label": 0})
    path = tmp_path / "hs.jsonl"
    path.write_bytes((good + "\n").encode() + b'{"ctx": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=r"not UTF-8 text \(byte 0xe9 at line 2") as e:
        H.load_items(path)
    assert str(path) in str(e.value)
    folder = model_folder(tmp_path / "m")
    code, last, _ = cli(eval_cmd.main, ["--model", folder, "--task", "hellaswag", "--data", path,
                                        "--no-progress"], capsys)
    assert code == 1 and last.startswith("error:") and str(path) in last and "line 2" in last


@pytest.mark.parametrize("limit", [0, -3, True, 2.5])
def test_a_bad_limit_is_refused(tmp_path, limit):
    path = tmp_path / "hs.jsonl"
    path.write_text(json.dumps({"ctx": "A", "endings": ["a", "b", "c", "d"], "label": 0}))
    with pytest.raises(ValueError, match="limit must be"):
        H.load_items(path, limit=limit)


# ------------------------------------------------------------------------------ shards


def _npy(array, allow_pickle=False):
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=allow_pickle)
    return buf.getvalue()


GOOD_NPY = _npy(np.arange(600, dtype=np.uint16))
BAD_SHARDS = {
    "text": (b"these are not tokens\n", "no readable numpy header"),
    "a pickle": (_npy(np.array([{"a": 1}], dtype=object), allow_pickle=True), "1-D uint16"),
    "pickle bytes": (pickle.dumps(list(range(10))), "no readable numpy header"),
    "truncated": (GOOD_NPY[:-10], "truncated"),
    "too long": (GOOD_NPY + b"\0" * 6, "damaged"),
    "float32": (_npy(np.arange(600, dtype=np.float32)), "1-D uint16"),
    "2-D": (_npy(np.zeros((20, 30), dtype=np.uint16)), "1-D uint16"),
    "big-endian": (_npy(np.arange(600, dtype=">u2")), "1-D uint16"),
    "broken header": (GOOD_NPY[:10] + b"{'descr': <u2" + GOOD_NPY[23:], "no readable numpy header"),
    "empty": (b"", "no readable numpy header"),
    "bin, bad magic": (b"\0" * 2048, "not an llm.c token file"),
}


@pytest.mark.parametrize("data, match", BAD_SHARDS.values(), ids=BAD_SHARDS)
def test_malformed_shards_are_named(tmp_path, capsys, data, match):
    name = "toy_train_000001.bin" if "bin" in match or "llm.c" in match else "toy_train_000001.npy"
    folder = shard_folder(tmp_path / "data")
    path = folder / name
    path.write_bytes(data)
    for mmap in (True, False):
        with pytest.raises(ValueError, match=match) as e:
            load_shard(str(path), mmap=mmap)
        msg = str(e.value)
        assert str(path) in msg and "gpt2np prepare" in msg and "allow_pickle" not in msg
    code, last, _ = cli(eval_cmd.main, ["--model", model_folder(tmp_path / "m"), "--task",
                                        "loss", "--data", path, "--no-progress"], capsys)
    assert code == 1 and last.startswith("error:") and str(path) in last
    if name.endswith(".npy"):
        with pytest.raises((ValueError, OSError), match=name):
            ShardLoader(str(folder), 2, 8, split="train")


@pytest.mark.parametrize("meta, match", [
    (b"{not json", "not valid JSON"), (b"\xff\xfe", "not UTF-8"), (b"[1]", "unreadable"),
    (b'{"shards": {"a": 1}}', "not a list"), (b'{"shards": [{"file": "x.npy"}]}', "bad entry"),
    (b'{"shards": [{"file": "x.npy", "split": "val", "tokens": -4}]}', "bad entry"),
])
def test_a_damaged_meta_json_is_named(tmp_path, meta, match):
    folder = shard_folder(tmp_path / "data")
    (folder / "meta.json").write_bytes(meta)
    with pytest.raises(OSError, match=match) as e:
        ShardLoader(str(folder), 2, 8)
    assert str(folder / "meta.json") in str(e.value) and "--overwrite" in str(e.value)


# ------------------------------------------------------------------------------ model folders


@pytest.mark.parametrize("index, match", [
    ({"weight_map": {"transformer.wte.weight": 5}}, r"weight_map\['transformer.wte.weight'\] 5"),
    ({"weight_map": []}, "no weight_map"), ({"metadata": {}}, "no weight_map"),
    ([1, 2], "no weight_map"), ("{oops", "not valid JSON"),
])
def test_a_damaged_index_is_named(tmp_path, capsys, index, match):
    folder = sharded_folder(tmp_path / "m")
    text = index if isinstance(index, str) else json.dumps(index)
    (folder / "model.safetensors.index.json").write_text(text)
    code, last, _ = cli(generate_cmd.main, ["--model", folder, "--max-new-tokens", "1"], capsys)
    assert code == 1 and last.startswith("error:") and "model.safetensors.index.json" in last
    assert re.search(match, last), last


@pytest.mark.parametrize("text, match", [
    (b"\xff\xfe{}", "not UTF-8"), (b"[" * 100_000, "nests its JSON too deeply"),
    (b"[1, 2]", "must hold a JSON object"), (b"{,}", "not valid JSON"),
])
def test_a_damaged_config_json_is_named(tmp_path, capsys, text, match):
    folder = model_folder(tmp_path / "m")
    (folder / "config.json").write_bytes(text)
    code, last, _ = cli(generate_cmd.main, ["--model", folder, "--max-new-tokens", "1"], capsys)
    assert code == 1 and last.startswith("error:") and "config.json" in last and match in last


def test_a_damaged_weights_file_is_named(tmp_path, capsys):
    folder = model_folder(tmp_path / "m")
    (folder / "model.safetensors").write_bytes(b"not safetensors at all")
    code, last, _ = cli(generate_cmd.main, ["--model", folder, "--max-new-tokens", "1"], capsys)
    assert code == 1 and "model.safetensors" in last and "not a safetensors file" in last


# ------------------------------------------------------------------------------ flags


@pytest.mark.parametrize("seed", ["-1", "-42", "1.5", "x"])
def test_generate_names_a_bad_seed(tmp_path, capsys, seed):
    """The reported case: --seed -1 failed with numpy's `expected non-negative integer`."""
    code, last, _ = cli(generate_cmd.main, ["--seed", seed], capsys)
    assert code == 2 and last.startswith("error:") and "--seed" in last


@pytest.mark.parametrize("seed", [-1, 1.5, "7", True])
def test_the_library_names_a_bad_seed(seed):
    from gpt2np import GPT
    from hostile import TINY

    with pytest.raises(ValueError, match="seed must be None or an int >= 0"):
        generate(GPT(TINY), np.array([[1, 2]]), 2, seed=seed)


def test_a_config_json_that_is_no_regular_file_is_refused(tmp_path, capsys):
    import os

    folder = model_folder(tmp_path / "m")
    (folder / "config.json").unlink()
    os.mkfifo(folder / "config.json")  # reading it would wait for a writer forever
    code, last, _ = cli(generate_cmd.main, ["--model", folder, "--max-new-tokens", "1"], capsys)
    assert code == 1 and "config.json" in last
