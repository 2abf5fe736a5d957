"""What a shard folder holds: prepare and the loader share one rule (gpt2np.data.shards).

meta.json lists the shards and the loader reads exactly those; a folder whose files and
meta.json disagree is refused; prepare into a folder that holds shards needs overwrite;
split names are parsed from the end of a name; a failed prepare leaves no corpus behind.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest

from gpt2np.data import shards as S
from gpt2np.data.prepare import prepare
from gpt2np.data.shards import load_shard, write_shard
from gpt2np.data.shards import ShardFolderError, ShardLoader, list_shards

WORDS = ["the", "king", "queen", "thou", "art", "café", "\n", "to be", "or", "not", "🙂"]


def corpus(path, n_docs, seed=0, words=30):
    """A .jsonl of n_docs documents; returns its path."""
    rng = np.random.default_rng(seed)
    with open(path, "w", encoding="utf-8") as f:
        for _ in range(n_docs):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS, size=words))}) + "\n")
    return str(path)


def loaded_tokens(out, split="train"):
    return sum(ShardLoader(out, 1, 4, split=split).lengths)


def run(inputs, out, **kw):
    kw = dict(dict(shard_size=100, val_shard_size=50, workers=1, progress=False), **kw)
    return prepare(inputs, str(out), **kw)


def test_reused_folder_needs_overwrite_and_then_holds_only_the_new_corpus(tmp_path):
    out = str(tmp_path / "shards")
    big = run([corpus(tmp_path / "big.jsonl", 30)], out)
    assert len(big["shards"]) >= 8
    small_input = corpus(tmp_path / "small.jsonl", 6, seed=1)
    with pytest.raises(FileExistsError, match="--overwrite"):
        run([small_input], out)
    assert json.load(open(os.path.join(out, "meta.json"))) == big  # refused: left untouched
    small = run([small_input], out, overwrite=True)
    assert 2 <= len(small["shards"]) < len(big["shards"])
    assert sorted(n for n in os.listdir(out) if n != "meta.json") == \
        sorted(s["file"] for s in small["shards"])
    # the loader reads exactly the new corpus's tokens
    assert loaded_tokens(out) + loaded_tokens(out, "val") == small["tokens"]


def test_npy_then_bin_into_one_folder_reads_each_token_once(tmp_path):
    out = str(tmp_path / "shards")
    src = corpus(tmp_path / "c.jsonl", 10)
    run([src], out)
    with pytest.raises(FileExistsError):
        run([src], out, fmt="bin")
    meta = run([src], out, fmt="bin", overwrite=True)
    assert all(p.endswith(".bin") for p in list_shards(out, "train"))
    assert loaded_tokens(out) + loaded_tokens(out, "val") == meta["tokens"]


def test_loader_refuses_a_folder_whose_files_and_meta_disagree(tmp_path):
    out = str(tmp_path / "shards")
    meta = run([corpus(tmp_path / "c.jsonl", 12)], out)
    ShardLoader(out, 1, 4)  # as prepared: fine
    bad = str(tmp_path / "bad")

    def variant(edit):
        shutil.rmtree(bad, ignore_errors=True)
        shutil.copytree(out, bad)
        edit(bad)
        return bad

    stale = variant(lambda d: write_shard(os.path.join(d, "shard_train_000099.npy"),
                                          np.arange(500, dtype=np.uint16)))
    with pytest.raises(ShardFolderError, match="does not list: shard_train_000099.npy"):
        ShardLoader(stale, 1, 4)
    other_format = variant(lambda d: write_shard(os.path.join(d, "shard_train_000001.bin"),
                                                 np.arange(500, dtype=np.uint16)))
    with pytest.raises(ShardFolderError, match="shard_train_000001.bin"):
        ShardLoader(other_format, 1, 4)
    last = meta["shards"][-1]["file"]
    gone = variant(lambda d: os.unlink(os.path.join(d, last)))
    with pytest.raises(ShardFolderError, match=f"{last} is listed in meta.json but missing"):
        ShardLoader(gone, 1, 4)
    shorter = variant(lambda d: write_shard(os.path.join(d, last), np.arange(3, dtype=np.uint16)))
    with pytest.raises(ShardFolderError, match="holds 3 tokens, meta.json says"):
        ShardLoader(shorter, 1, 4)

    def unfinished(d):
        m = json.load(open(os.path.join(d, "meta.json")))
        json.dump(dict(m, complete=False), open(os.path.join(d, "meta.json"), "w"))

    with pytest.raises(ShardFolderError, match="did not finish"):
        ShardLoader(variant(unfinished), 1, 4)
    garbled = variant(lambda d: open(os.path.join(d, "meta.json"), "w").write("{"))
    with pytest.raises(ShardFolderError, match="unreadable"):
        ShardLoader(garbled, 1, 4)


def test_folder_without_meta_follows_the_names(tmp_path):
    """Shards made elsewhere (llm.c's fineweb .bin, or llm.c's unnumbered
    tiny_shakespeare_train.bin): the names say the split; mixed corpora are refused."""
    d = str(tmp_path / "plain")
    os.makedirs(d)
    for name, n in [("fw_val_000000.bin", 30), ("fw_train_000002.bin", 40),
                    ("fw_train_000001.bin", 50), ("notes.txt", 0)]:
        if name.endswith(".bin"):
            write_shard(os.path.join(d, name), np.arange(n, dtype=np.uint16))
        else:
            open(os.path.join(d, name), "w").write("x")
    assert [os.path.basename(p) for p in list_shards(d, "train")] == \
        ["fw_train_000001.bin", "fw_train_000002.bin"]
    assert ShardLoader(d, 2, 4).lengths == [50, 40]
    llmc = str(tmp_path / "llmc")
    os.makedirs(llmc)
    for split in ("train", "val"):
        write_shard(os.path.join(llmc, f"tiny_shakespeare_{split}.bin"), np.arange(40, dtype=np.uint16))
    assert [os.path.basename(p) for p in list_shards(llmc, "val")] == ["tiny_shakespeare_val.bin"]
    write_shard(os.path.join(d, "fw_train_000001.npy"), np.arange(50, dtype=np.uint16))
    with pytest.raises(ShardFolderError, match="several formats"):
        ShardLoader(d, 2, 4)
    os.unlink(os.path.join(d, "fw_train_000001.npy"))
    write_shard(os.path.join(d, "other_train_000001.bin"), np.arange(50, dtype=np.uint16))
    with pytest.raises(ShardFolderError, match="several prefixes"):
        ShardLoader(d, 2, 4)


@pytest.mark.parametrize("with_meta", [True, False])
def test_prefix_containing_val_is_not_a_val_split(tmp_path, with_meta):
    out = str(tmp_path / "shards")
    meta = run([corpus(tmp_path / "c.jsonl", 10)], out, prefix="web_val_v2")
    if not with_meta:
        os.unlink(os.path.join(out, "meta.json"))
    val, train = list_shards(out, "val"), list_shards(out, "train")
    assert [os.path.basename(p) for p in val] == ["web_val_v2_val_000000.npy"]
    assert len(train) == len(meta["shards"]) - 1
    assert S.parse_shard_name("web_val_v2_train_000001.npy")["split"] == "train"
    assert S.parse_shard_name("web_val_v2_train_000001.npy.tmp") is None
    with pytest.raises(ValueError, match="--prefix"):
        run([corpus(tmp_path / "d.jsonl", 2)], str(tmp_path / "x"), prefix="a/b")


def test_failed_prepare_leaves_no_corpus(tmp_path):
    """The second file fails after shards were written: they are removed again."""
    good = corpus(tmp_path / "good.jsonl", 20)
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9")
    out = tmp_path / "shards"
    with pytest.raises(ValueError, match="bad.txt is not UTF-8"):
        run([good, str(bad)], out)
    assert not out.exists()  # the folder it made is gone too
    run([good], out)  # and the folder takes a corpus without --overwrite


def test_bin_over_int32_tokens_fails_before_tokenizing(tmp_path, monkeypatch):
    def no_tokenizer():
        raise AssertionError("tokenized before refusing")

    with pytest.raises(ValueError, match="at most 2,147,483,647 tokens"):
        run([corpus(tmp_path / "c.jsonl", 2)], tmp_path / "o", fmt="bin",
            shard_size=2 ** 31, encoding_factory=no_tokenizer)
    assert not (tmp_path / "o").exists()
    # and write_shard itself refuses (no .tmp left behind) when a shard would not fit
    monkeypatch.setattr(S, "BIN_MAX_TOKENS", 10)
    with pytest.raises(ValueError, match="do not fit"):
        write_shard(str(tmp_path / "s_train_000001.bin"), np.arange(11, dtype=np.uint16))
    assert os.listdir(tmp_path) == ["c.jsonl"]


def test_huge_shard_size_allocates_only_the_tokens(tmp_path):
    """--shard-size 1e12 (2 TB of uint16) once failed allocating its buffer up front."""
    meta = run([corpus(tmp_path / "c.jsonl", 3)], tmp_path / "o", shard_size=10 ** 12,
               val_shard_size=10 ** 12)
    assert len(meta["shards"]) == 1 and meta["shard_size"] == 10 ** 12
    assert len(load_shard(str(tmp_path / "o" / meta["shards"][0]["file"]))) == meta["tokens"]


def test_corpus_with_a_short_last_shard_trains(tmp_path):
    """prepare's last shard holds what is left (here 15 tokens, under the 17 one step needs):
    training warns, skips it, and runs through the other shards and past their wrap."""
    from gpt2np.train.loop import train
    from tiny_run import tiny_config

    docs = ["a" + " a" * 99] * 5  # 5 x (100 + <|endoftext|>) tokens: 50 val, 4 x 110 + 15 train
    meta = prepare([], str(tmp_path / "shards"), shard_size=110, val_shard_size=50, workers=1,
                   progress=False, documents=docs)
    assert [s["tokens"] for s in meta["shards"]] == [50, 110, 110, 110, 110, 15]
    cfg = tiny_config(tmp_path / "run", data_shards=str(tmp_path / "shards"), block_size=8,
                      batch_size=2, total_batch_size=16, max_steps=30, eval_interval=30)
    with pytest.warns(UserWarning, match="holds 15 tokens.*skipped"):
        res = train(cfg)
    assert res.status == "done" and res.step == 30  # 24 steps per pass over 4 shards
