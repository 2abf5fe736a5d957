"""Sharded token datasets: `gpt2np prepare` and the per-rank ShardLoader.

A small generated corpus goes through prepare (with 2 tokenizer processes) and comes back:
the shards hold exactly [<|endoftext|>] + tokens of every document in order, shard 0 is
val, the tokens decode back to the text, and the loader's per-rank slices are the blocks
build-nanogpt's DataLoaderLite reads.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from gpt2np.commands.prepare import main
from gpt2np.data.prepare import prepare
from gpt2np.data.shards import load_shard, write_shard
from gpt2np.data.shards import ShardLoader, list_shards
from gpt2np.data.tokenizer import get_encoding

EOT = 50256
WORDS = ["the", "king", "queen", "ROMEO:", "thou", "art", "naïve", "café", "42", "—", "\n",
         "\n\n", "don't", "we'll", "   ", "!", "?", "to be", "or", "not", "日本", "🙂"]


def make_corpus(root, seed=0):
    """Three .txt files (one document each), one .txt of several documents separated by
    '<|endoftext|>', and a .jsonl of documents; returns (paths, docs in order)."""
    rng = np.random.default_rng(seed)

    def doc():
        return " ".join(rng.choice(WORDS, size=int(rng.integers(5, 60))))

    os.makedirs(root, exist_ok=True)
    paths, docs = [], []
    for i in range(3):
        d = doc()
        p = os.path.join(root, f"plain{i}.txt")
        with open(p, "w", encoding="utf-8") as f:
            f.write(d)
        paths.append(p)
        docs.append(d)
    return paths, docs


def encode_docs(docs):
    enc = get_encoding()
    return np.concatenate([[EOT] + enc.encode_ordinary(d) for d in docs]).astype(np.uint16)


def read_all(out_dir):
    meta = json.load(open(os.path.join(out_dir, "meta.json")))
    return meta, [np.asarray(load_shard(os.path.join(out_dir, s["file"]))) for s in meta["shards"]]


@pytest.mark.parametrize("fmt", ["npy", "bin"])
def test_prepare_round_trip(tmp_path, fmt):
    paths, docs = make_corpus(str(tmp_path / "corpus"))
    # more documents: a file with '<|endoftext|>' boundaries and a .jsonl
    rng = np.random.default_rng(1)
    sep_docs = [" ".join(rng.choice(WORDS, size=40)) for _ in range(6)]
    sep_path = tmp_path / "corpus" / "joined.txt"
    sep_path.write_text("<|endoftext|>" + "<|endoftext|>".join(sep_docs), encoding="utf-8")
    json_docs = [" ".join(rng.choice(WORDS, size=50)) + " <|endoftext|> as text" for _ in range(8)]
    json_path = tmp_path / "corpus" / "docs.jsonl"
    json_path.write_text("".join(json.dumps({"text": d, "id": i}) + "\n"
                                 for i, d in enumerate(json_docs)), encoding="utf-8")
    # the plain files are one document each; '<|endoftext|>' splits only joined.txt
    out = str(tmp_path / f"shards_{fmt}")
    meta = prepare([*paths, str(sep_path), str(json_path)], out, shard_size=200,
                   val_shard_size=150, workers=2, fmt=fmt, prefix="tiny",
                   doc_sep="<|endoftext|>", progress=True, chunk_chars=64)
    all_docs = docs + sep_docs + json_docs
    expected = encode_docs(all_docs)

    meta, shards = read_all(out)
    assert meta["documents"] == len(all_docs) and meta["tokens"] == len(expected)
    names = [s["file"] for s in meta["shards"]]
    assert names[0] == f"tiny_val_000000.{fmt}" and meta["shards"][0]["split"] == "val"
    assert all(n == f"tiny_train_{i:06d}.{fmt}" for i, n in enumerate(names) if i > 0)
    assert len(shards) >= 4
    # shard 0 = val holds val_shard_size tokens, the others shard_size but the last
    assert [len(s) for s in shards[:-1]] == [150] + [200] * (len(shards) - 2)
    assert 0 < len(shards[-1]) <= 200
    assert all(s.dtype == np.uint16 for s in shards)
    stream = np.concatenate(shards)
    np.testing.assert_array_equal(stream, expected)  # every document, in order, uncut
    # tokens decode back to the text: documents are what lies between the EOT tokens
    text = get_encoding().decode(stream.tolist())
    assert text.split("<|endoftext|>")[1:4] == docs
    assert "".join(text.split("<|endoftext|>")) == "".join(d.replace("<|endoftext|>", "")
                                                         for d in all_docs)
    assert (stream == EOT).sum() == len(all_docs)  # the literal "<|endoftext|>" is plain text


def test_prepare_cli_single_worker_matches_parallel(tmp_path, capsys):
    paths, docs = make_corpus(str(tmp_path / "c"), seed=3)
    out1, out2 = str(tmp_path / "a"), str(tmp_path / "b")
    main(["--input", *paths, "--out-dir", out1, "--shard-size", "16", "--workers", "1",
          "--no-progress"])
    assert "3 documents" in capsys.readouterr().out
    prepare(paths, out2, shard_size=16, workers=2, progress=False)
    m1, s1 = read_all(out1)
    m2, s2 = read_all(out2)
    assert m1 == m2
    for a, b in zip(s1, s2):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(np.concatenate(s1), encode_docs(docs))
    with pytest.raises(FileNotFoundError):
        prepare([str(tmp_path / "nope.txt")], out1)


def _write(dir_, lengths, seed=0):
    """Shards with distinct, position-revealing tokens: shard i holds i*1000 + arange."""
    os.makedirs(dir_, exist_ok=True)
    data = []
    for i, n in enumerate(lengths):
        toks = (i * 1000 + np.arange(n)).astype(np.uint16)
        split = "val" if i == 0 else "train"
        write_shard(os.path.join(dir_, f"s_{split}_{i:06d}.npy"), toks)
        data.append(toks.astype(np.int64))
    return data


def test_loader_per_rank_offsets_and_streaming(tmp_path):
    B, T, W = 2, 4, 2
    step = B * T * W  # 16 tokens per step for all ranks
    data = _write(str(tmp_path), [40, 50, 37])  # val; train shards of 50 and 37 tokens
    loaders = [ShardLoader(str(tmp_path), B, T, r, W, "train") for r in range(W)]
    assert [os.path.basename(p) for p in list_shards(str(tmp_path), "train")] == \
        ["s_train_000001.npy", "s_train_000002.npy"]
    # shard 1 (50 tokens) has room for 3 steps (3*16+1 <= 50), shard 2 (37) for 2 steps
    expected_blocks = [(1, 0), (1, 16), (1, 32), (2, 0), (2, 16), (1, 0)]  # then wraps
    for shard, base in expected_blocks:
        combined = data[shard][base:base + step + 1]
        for r, ld in enumerate(loaders):
            x, y = ld.next_batch()
            assert x.shape == (B, T) and y.shape == (B, T) and x.dtype == np.int64
            lo = r * B * T  # rank r reads the block at offset B*T*r of this step's block
            np.testing.assert_array_equal(x.reshape(-1), combined[lo:lo + B * T])
            np.testing.assert_array_equal(y.reshape(-1), combined[lo + 1:lo + B * T + 1])
    # the two ranks' rows together are the single-process batch of 2*B rows
    one = ShardLoader(str(tmp_path), B * W, T, 0, 1, "train")
    for r, ld in enumerate(loaders):
        ld.reset()
    for _ in range(7):
        x1, y1 = one.next_batch()
        parts = [ld.next_batch() for ld in loaders]
        np.testing.assert_array_equal(x1, np.concatenate([p[0] for p in parts]))
        np.testing.assert_array_equal(y1, np.concatenate([p[1] for p in parts]))


def test_loader_val_split_reset_and_resume(tmp_path):
    B, T, W = 2, 4, 2
    data = _write(str(tmp_path), [40, 50, 37])
    val = ShardLoader(str(tmp_path), B, T, 1, W, "val")
    first = val.next_batch()
    np.testing.assert_array_equal(first[0].reshape(-1), data[0][8:16])  # rank 1's slice
    val.next_batch()
    val.reset()
    np.testing.assert_array_equal(val.next_batch()[0], first[0])
    # resume: the state is rank-independent, so rank 0's checkpoint serves every rank
    a = [ShardLoader(str(tmp_path), B, T, r, W) for r in range(W)]
    for _ in range(4):  # into the second shard
        for ld in a:
            ld.next_batch()
    assert a[0].state() == a[1].state() == {"shard": 1, "position": 16}
    b = [ShardLoader(str(tmp_path), B, T, r, W) for r in range(W)]
    for ld in b:
        ld.load_state_dict(a[0].state_dict())
    for _ in range(5):
        for la, lb in zip(a, b):
            xa, ya = la.next_batch()
            xb, yb = lb.next_batch()
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)
    with pytest.raises(ValueError):
        b[0].set_state({"shard": 7, "position": 0})


def test_loader_refuses_shards_too_small_and_missing_dirs(tmp_path):
    _write(str(tmp_path / "a"), [40, 16, 50])  # a short shard that is not the last
    with pytest.raises(ValueError, match="fewer than one step"):
        ShardLoader(str(tmp_path / "a"), 2, 4, 0, 2, "train")  # 17 tokens needed, shard 1 has 16
    _write(str(tmp_path / "b"), [40, 16])  # the split's only shard
    with pytest.raises(ValueError, match="fewer than one step"):
        ShardLoader(str(tmp_path / "b"), 2, 4, 0, 2, "train")
    with pytest.raises(FileNotFoundError):
        ShardLoader(str(tmp_path / "nope"), 2, 4)
    with pytest.raises(ValueError):
        ShardLoader(str(tmp_path / "a"), 2, 4, rank=2, world_size=2)


def test_short_last_shard_is_skipped_with_a_warning(tmp_path):
    """prepare ends a corpus with whatever is left: a last shard shorter than one step is
    skipped (with a warning), so the ranks cycle over the others, as one process does."""
    B, T, W = 2, 4, 2
    data = _write(str(tmp_path), [40, 50, 33, 16])  # 17 tokens per step: shard 3 is short
    with pytest.warns(UserWarning, match="s_train_000003.npy holds 16 tokens.*skipped"):
        loaders = [ShardLoader(str(tmp_path), B, T, r, W) for r in range(W)]
    assert loaders[0].lengths == [50, 33, 16]  # every shard is listed (the data's identity)
    blocks = [(1, 0), (1, 16), (1, 32), (2, 0), (2, 16), (1, 0), (1, 16)]  # never shard 3
    for shard, base in blocks:
        for r, ld in enumerate(loaders):
            x, _ = ld.next_batch()
            lo = base + r * B * T
            np.testing.assert_array_equal(x.reshape(-1), data[shard][lo:lo + B * T])
    # a state saved by a run with a smaller step, inside the skipped shard: the next step
    # starts the first shard, as next_batch would have moved on
    ld = loaders[0]
    ld.set_state({"shard": 2, "position": 0})
    np.testing.assert_array_equal(ld.next_batch()[0].reshape(-1), data[1][:B * T])


# --------------------------------------------------------------------------- training on shards


def _train_cli(*args):
    """gpt2np train in a child with one BLAS thread (tiny matrices: more BLAS threads
    would only spin against each other)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root, MPLBACKEND="Agg")
    for v in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(v, None)
    return subprocess.run([sys.executable, "-m", "gpt2np", "train", *map(str, args)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=240)


def test_training_on_shards_and_resume(tmp_path):
    """--data-shards: a prepared corpus trains, and a stopped run resumes to the very params
    of an uninterrupted one (the shard loader's position is in the checkpoint)."""
    from gpt2np.io.checkpoint import load_checkpoint
    from tiny_run import tiny_flags

    paths, _ = make_corpus(str(tmp_path / "corpus"), seed=5)
    more = tmp_path / "corpus" / "more.jsonl"
    rng = np.random.default_rng(6)
    more.write_text("".join(json.dumps({"text": " ".join(rng.choice(WORDS, size=80))}) + "\n"
                            for _ in range(10)), encoding="utf-8")
    shards = str(tmp_path / "shards")
    prepare([*paths, str(more)], shards, shard_size=150, val_shard_size=60, workers=1,
            progress=False)
    assert len(list_shards(shards, "train")) >= 3
    run = tiny_flags(data_shards=shards, block_size=8, batch_size=2, total_batch_size=32,
                     max_steps=12, eval_interval=6, eval_batches=2)
    whole = _train_cli(*run, "--out-dir", tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert " train / " in whole.stdout and " val tokens" in whole.stdout
    log = [json.loads(line) for line in open(tmp_path / "whole" / "log.jsonl")]
    assert len(log) == 12 and log[-1]["train_loss"] < log[0]["train_loss"]
    part = _train_cli(*run, "--out-dir", tmp_path / "part", "--stop-after", 5)
    assert part.returncode == 0, part.stderr[-3000:]
    state = load_checkpoint(tmp_path / "part" / "ckpt.safetensors").state
    # 5 steps of 32 tokens: past the first 150-token train shard, the position is saved
    assert state["step"] == 5 and state["data"]["shard"] >= 1
    rest = _train_cli("--data-shards", shards, "--out-dir", tmp_path / "part", "--resume",
                      "--num-samples", 0, "--no-progress")
    assert rest.returncode == 0, rest.stderr[-3000:]
    a = load_checkpoint(tmp_path / "whole" / "ckpt.safetensors")
    b = load_checkpoint(tmp_path / "part" / "ckpt.safetensors")
    assert b.state["step"] == 12
    for k in a.params:  # bit for bit: the resumed run read the very same batches
        assert a.params[k].tobytes() == b.params[k].tobytes(), k
    # other shards on resume are refused (the data id: shard names and lengths)
    other = _train_cli("--data-shards", _other(shards, tmp_path), "--out-dir",
                       tmp_path / "part", "--resume", "--max-steps", 13, "--no-progress")
    assert other.returncode == 2 and "other data" in other.stderr, other.stderr[-2000:]


def _other(shards, tmp_path):
    """A copy of the shard folder with one token fewer in its first train shard."""
    import shutil

    other = str(tmp_path / "other")
    shutil.copytree(shards, other)
    name = sorted(n for n in os.listdir(other) if "_train_" in n)[0]
    write_shard(os.path.join(other, name), np.array(load_shard(os.path.join(other, name)))[:-1])
    meta = json.load(open(os.path.join(other, "meta.json")))  # a consistent folder
    for s in meta["shards"]:
        s["tokens"] -= s["file"] == name
    json.dump(meta, open(os.path.join(other, "meta.json"), "w"))
    return other


# --------------------------------------------------------------------------- bad inputs


def _prep(inputs, out, **kw):
    return prepare([str(p) for p in inputs], str(out), **dict(
        dict(shard_size=64, val_shard_size=32, workers=1, progress=False), **kw))


@pytest.mark.parametrize("record, got", [({"text": 7}, "got int"),
                                         ({"body": "x"}, r"it has no such field \(only body\)"),
                                         (["text"], "got a JSON list")])
def test_jsonl_record_without_a_text_string_names_file_and_line(tmp_path, record, got):
    path = tmp_path / "docs.jsonl"
    path.write_text(json.dumps({"text": "fine"}) + "\n\n" + json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=rf"docs.jsonl:3: expected a JSON object with a 'text' string, {got}"):
        _prep([path], tmp_path / "out")


@pytest.mark.parametrize("name, doc_sep", [("a.txt", None), ("a.txt", "\n\n"), ("a.jsonl", None)])
@pytest.mark.parametrize("raw, match", [(b"caf\xe9 au lait", "not UTF-8 text"),
                                        (b"\x7fELF\x02\x01\x00\x00", "looks like a binary file")])
def test_non_utf8_or_binary_input_names_the_file(tmp_path, name, doc_sep, raw, match):
    path = tmp_path / name
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=match) as e:
        _prep([path], tmp_path / "out", doc_sep=doc_sep)
    assert str(path) in str(e.value)


def test_crlf_kept_as_in_the_tiny_shakespeare_path(tmp_path):
    """A CRLF text gives the tokens `--data` gives it (after the leading <|endoftext|>)."""
    from gpt2np.data.shakespeare import load_tokens

    path = tmp_path / "crlf.txt"
    path.write_bytes(b"ROMEO:\r\nBut soft, what light\r\n\r\nthrough yonder window breaks?\r\n" * 3)
    want = [EOT] + load_tokens(path, cache=tmp_path / "cache").tolist()
    for doc_sep in (None, "<|endoftext|>"):  # whole file, and the streamed reader
        meta, shards = read_all(_prep([path], tmp_path / f"out{doc_sep is None}",
                                      doc_sep=doc_sep, chunk_chars=7) and
                                tmp_path / f"out{doc_sep is None}")
        assert np.concatenate(shards).tolist() == want


def test_documents_from_any_iterable(tmp_path):
    docs = ["First document.", "Second one,\r\nwith CRLF."]
    meta, shards = read_all(_prep([], tmp_path / "o", documents=iter(docs)) and tmp_path / "o")
    assert meta["documents"] == 2
    np.testing.assert_array_equal(np.concatenate(shards), encode_docs(docs))
    with pytest.raises(TypeError, match="document 1 is a bytes, not a string"):
        _prep([], tmp_path / "p", documents=["ok", b"bytes"])


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_corpus_is_an_error(tmp_path, content):
    for name in ("empty.txt", "empty.jsonl"):
        (tmp_path / name).write_text(content)
        with pytest.raises(ValueError, match=f"{name}: no documents"):
            _prep([tmp_path / name], tmp_path / "out")
        assert not (tmp_path / "out").exists()  # nothing left behind, not even the folder


def _prepare_cli(*args, cwd):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    env.pop("GPT2NP_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "gpt2np", "prepare", *map(str, args)], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=120)


def test_cli_bad_cases_are_one_error_line(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("To be, or not to be: that is the question. " * 20)
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    (tmp_path / "binary.txt").write_bytes(bytes(range(256)))
    (tmp_path / "empty.jsonl").write_text("\n")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "meta.json").write_text("{}")
    out = ["--out-dir", tmp_path / "out", "--no-progress"]
    cases = [  # (argv, what the error line must name, exit status)
        (["--input", tmp_path / "nope.txt", *out], "nope.txt does not exist", 1),
        (["--input", tmp_path / "latin1.txt", *out], "latin1.txt is not UTF-8", 1),
        (["--input", tmp_path / "binary.txt", *out], "binary.txt looks like a binary file", 1),
        (["--input", tmp_path / "empty.jsonl", *out], "empty.jsonl: no documents", 1),
        (["--input", good, "--out-dir", tmp_path / "full"], "--overwrite", 1),
        (["--input", good, *out, "--shard-size", "0"], "--shard-size", 2),
        (["--input", good, *out, "--shard-size", "1.5e3x"], "--shard-size", 2),
        (["--input", good, *out, "--workers", "0"], "--workers", 2),
        (["--input", good, *out, "--val-shard-size", "-4"], "--val-shard-size", 2),
    ]
    for argv, needle, status in cases:
        r = _prepare_cli(*argv, cwd=tmp_path)
        last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""
        assert r.returncode == status, (argv, r.stderr)
        assert "Traceback" not in r.stderr and last.startswith("error:"), (argv, r.stderr)
        assert needle in last, (needle, last)
    ok = _prepare_cli("--input", good, *out, "--shard-size", "1e2", "--workers", "1", cwd=tmp_path)
    assert ok.returncode == 0 and "1 documents" in ok.stdout, ok.stderr
    assert json.load(open(tmp_path / "out" / "meta.json"))["shard_size"] == 100


def test_overwrite_also_removes_what_a_killed_writer_left(tmp_path):
    """Shards are written through gpt2np.files (temporary name, then rename): a killed
    prepare leaves `<shard>.<pid>.tmp`, which --overwrite removes with the old shards; other
    files stay."""
    out = tmp_path / "out"
    _prep([make_corpus(tmp_path / "in")[0][0]], out)
    left = ["shard_train_000002.npy.4242.tmp", "shard_val_000000.bin.tmp"]
    for name in left + ["notes.tmp", "README"]:
        (out / name).write_bytes(b"x")
    with pytest.raises(FileExistsError, match="--overwrite"):
        _prep([make_corpus(tmp_path / "in")[0][1]], out)
    _prep([make_corpus(tmp_path / "in")[0][1]], out, overwrite=True)
    names = sorted(os.listdir(out))
    assert not set(left) & set(names) and {"notes.tmp", "README", "meta.json"} <= set(names)
    assert not any(n.endswith(".tmp") and n != "notes.tmp" for n in names)
