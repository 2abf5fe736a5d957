"""Finding, downloading, caching and batching tiny Shakespeare."""
import hashlib
import io
import urllib.request

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpt2np.data import shakespeare as data
from gpt2np.data.shakespeare import BatchLoader, DataNotFoundError, find_data, load_tokens, split
from testdata import shakespeare_path


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("GPT2NP_DATA", raising=False)
    monkeypatch.delenv("GPT2NP_CACHE", raising=False)


def _fake_urlopen(payload, calls):
    def urlopen(url, timeout=None):
        calls.append(url)
        return io.BytesIO(payload)

    return urlopen


# ----------------------------------------------------------------------------- finding


def test_search_order_flag_env_cache(tmp_path, monkeypatch, no_env):
    flag, env, cache = tmp_path / "flag.txt", tmp_path / "env.txt", tmp_path / "cache"
    for p in (flag, env):
        p.write_text(p.name)
    (cache / data.DATA_FILENAME).parent.mkdir()
    (cache / data.DATA_FILENAME).write_text("cached")
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("no download"))
    assert find_data(flag, cache=cache) == flag
    monkeypatch.setenv("GPT2NP_DATA", str(env))
    assert find_data(None, cache=cache) == env
    monkeypatch.delenv("GPT2NP_DATA")
    assert find_data(None, cache=cache) == cache / data.DATA_FILENAME
    monkeypatch.setenv("GPT2NP_CACHE", str(cache))  # the cache folder from the environment
    assert find_data() == cache / data.DATA_FILENAME


def test_download_checked_and_cached(tmp_path, monkeypatch, no_env):
    payload = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    monkeypatch.setattr(data, "DATA_SHA256", hashlib.sha256(payload).hexdigest())
    monkeypatch.setattr(data, "DATA_BYTES", len(payload))
    calls = []
    monkeypatch.setattr(urllib.request, "urlopen", _fake_urlopen(payload, calls))
    path = find_data(None, cache=tmp_path)
    assert path == tmp_path / data.DATA_FILENAME and path.read_bytes() == payload
    assert calls == [data.DATA_URL]
    find_data(None, cache=tmp_path)
    assert len(calls) == 1  # the second time it is in the cache


def test_download_with_wrong_hash_is_refused(tmp_path, monkeypatch, no_env):
    monkeypatch.setattr(urllib.request, "urlopen", _fake_urlopen(b"<html>captive portal</html>", []))
    with pytest.raises(DataNotFoundError, match="SHA-256"):
        find_data(None, cache=tmp_path)
    assert not (tmp_path / data.DATA_FILENAME).exists()  # nothing bad left in the cache


def test_missing_everywhere_names_every_option(tmp_path, monkeypatch, no_env):
    def offline(*a, **k):
        raise OSError("network unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataNotFoundError) as e:
        find_data(None, cache=tmp_path)
    msg = str(e.value)
    for needle in ("--data", "GPT2NP_DATA", str(tmp_path / data.DATA_FILENAME), "GPT2NP_CACHE",
                   data.DATA_URL, data.DATA_SHA256, "network unreachable"):
        assert needle in msg


def test_missing_explicit_file(tmp_path, no_env, monkeypatch):
    with pytest.raises(DataNotFoundError, match="--data"):
        find_data(tmp_path / "nope.txt")
    monkeypatch.setenv("GPT2NP_DATA", str(tmp_path / "nope.txt"))
    with pytest.raises(DataNotFoundError, match="GPT2NP_DATA"):
        find_data(None, cache=tmp_path)


# ----------------------------------------------------------------------------- tokens


def test_tokens_cached_once(tmp_path, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question.")
    ids = load_tokens(text, cache=tmp_path / "c")
    assert ids.dtype == np.uint16
    from gpt2np.data import tokenizer

    assert ids.tolist() == tokenizer.encode(text.read_text())
    monkeypatch.setattr(tokenizer, "encode", lambda s: pytest.fail("tokenized twice"))
    assert np.array_equal(load_tokens(text, cache=tmp_path / "c"), ids)
    text.write_text("Other text")  # new content: a new cache key, tokenized afresh
    with pytest.raises(pytest.fail.Exception):
        load_tokens(text, cache=tmp_path / "c")


@pytest.mark.parametrize("raw, match", [(b"caf\xe9 au lait\n", "not UTF-8 text.*offset 3"),
                                        (b"PK\x03\x04\x00\x00binary", "binary.*NUL")])
def test_non_utf8_or_binary_text_is_a_clear_error(tmp_path, raw, match):
    path = tmp_path / "input.txt"
    path.write_bytes(raw)
    with pytest.raises(ValueError, match=match) as e:
        load_tokens(path, cache=tmp_path / "c")
    assert str(path) in str(e.value)


def test_crlf_is_kept(tmp_path):
    """Line endings are tokens like any other: CRLF text is not turned into LF."""
    from gpt2np.data import tokenizer

    path = tmp_path / "crlf.txt"
    path.write_bytes(b"ROMEO:\r\nO, she doth teach the torches to burn bright!\r\n")
    assert load_tokens(path, cache=tmp_path / "c").tolist() == \
        tokenizer.encode(path.read_bytes().decode())


def test_shakespeare_tokens_and_split(tmp_path):
    path = shakespeare_path()
    if not path.is_file():
        pytest.skip(f"tiny Shakespeare not at {path}")
    assert path.stat().st_size == data.DATA_BYTES
    tokens = load_tokens(path, cache=tmp_path)
    assert len(tokens) == 338_025 and tokens[:3].tolist() == [5962, 22307, 25]  # "First Citizen:"
    train, val = split(tokens)
    assert len(train) == 304_222 and len(val) == 33_803
    assert np.array_equal(np.concatenate([train, val]), tokens)


# ----------------------------------------------------------------------------- batches


def _lite(tokens, B, T, rank, world, n):
    """build-nanogpt's DataLoaderLite, written out as the reference, with one change: the
    wrap-around is decided on rank 0's position (the step's whole block), the same on
    every rank, where DataLoaderLite tests each rank's own position."""
    pos, out = B * T * rank, []
    for _ in range(n):
        buf = tokens[pos:pos + B * T + 1]
        out.append((buf[:-1].reshape(B, T), buf[1:].reshape(B, T)))
        pos += B * T * world
        if pos - B * T * rank + B * T * world + 1 > len(tokens):
            pos = B * T * rank
    return out


@given(st.integers(1, 4), st.integers(1, 8), st.integers(1, 3), st.integers(0, 50), st.data())
def test_sequential_is_dataloaderlite(B, T, world, extra, draw):
    rank = draw.draw(st.integers(0, world - 1))
    tokens = np.arange(B * T * world * 3 + 1 + extra, dtype=np.uint16)
    loader = BatchLoader(tokens, B, T, rank=rank, world_size=world)
    for (x, y), (rx, ry) in zip((loader.next_batch() for _ in range(7)), _lite(tokens, B, T, rank, world, 7)):
        assert x.dtype == np.int64 and np.array_equal(x, rx) and np.array_equal(y, ry)


def test_ranks_read_disjoint_chunks():
    tokens = np.arange(1000, dtype=np.uint16)
    r0, r1 = (BatchLoader(tokens, 2, 5, rank=r, world_size=2) for r in (0, 1))
    seen = [np.concatenate([l.next_batch()[0].ravel() for _ in range(4)]) for l in (r0, r1)]
    assert not set(seen[0]) & set(seen[1])
    assert sorted(np.concatenate(seen).tolist()) == list(range(80))  # together: one pass in order


@given(st.integers(1, 3), st.integers(1, 5), st.integers(2, 4), st.integers(0, 60))
def test_ranks_together_are_one_process_across_epoch_wraps(B, T, world, extra):
    """At every step, the ranks' rows stacked in rank order are the rows of one process
    with world*B rows, through several wrap-arounds (a per-rank wrap rule breaks this: a
    later rank wraps a step early and the ranks stay out of phase)."""
    tokens = np.random.default_rng(extra).integers(0, 50257, B * T * world * 2 + 1 + extra)
    tokens = tokens.astype(np.uint16)
    ranks = [BatchLoader(tokens, B, T, rank=r, world_size=world) for r in range(world)]
    one = BatchLoader(tokens, B * world, T)
    for _ in range(7):  # at most 2 steps per epoch here, so 7 steps wrap at least twice
        x1, y1 = one.next_batch()
        parts = [ld.next_batch() for ld in ranks]
        assert np.array_equal(np.concatenate([p[0] for p in parts]), x1)
        assert np.array_equal(np.concatenate([p[1] for p in parts]), y1)


@pytest.mark.parametrize("random", [False, True])
def test_state_round_trip_replays_the_same_batches(random):
    tokens = np.random.default_rng(0).integers(0, 50257, 500).astype(np.uint16)
    a = BatchLoader(tokens, 3, 7, random=random, seed=5)
    for _ in range(9):
        a.next_batch()
    b = BatchLoader(tokens, 3, 7, random=random, seed=5)
    b.load_state_dict(a.state_dict())
    for _ in range(30):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
        assert np.array_equal(xa[:, 1:], ya[:, :-1])  # y is x shifted by one


def test_random_offsets_differ_by_seed_and_rank():
    tokens = np.arange(10_000, dtype=np.uint16)
    first = lambda **k: BatchLoader(tokens, 4, 8, random=True, **k).next_batch()[0]  # noqa: E731
    assert np.array_equal(first(seed=1), first(seed=1))
    assert not np.array_equal(first(seed=1), first(seed=2))
    assert not np.array_equal(first(seed=1, rank=0, world_size=2), first(seed=1, rank=1, world_size=2))


def test_too_few_tokens():
    with pytest.raises(ValueError, match="too few"):
        BatchLoader(np.arange(64, dtype=np.uint16), 4, 16)


@pytest.mark.parametrize("B, T, world, extra", [(2, 3, 1, 0), (2, 3, 2, 5), (1, 4, 3, 11)])
def test_one_array_is_read_as_one_shard_is(tmp_path, B, T, world, extra):
    """BatchLoader and gpt2np.data.shards.ShardLoader share one DataLoaderLite order: tokens
    as an array and as a folder's only training shard give the same batches on every rank,
    across wraps, while each keeps its own state format (checkpoints store both)."""
    from gpt2np.data.shards import ShardLoader, write_shard

    tokens = np.random.default_rng(extra).integers(0, 50257, B * T * world * 3 + 1 + extra)
    tokens = tokens.astype(np.uint16)
    write_shard(str(tmp_path / "t_train_000001.npy"), tokens)
    for rank in range(world):
        array = BatchLoader(tokens, B, T, rank=rank, world_size=world)
        shards = ShardLoader(str(tmp_path), B, T, rank, world)
        for _ in range(8):  # 3 steps per pass: wraps twice
            (xa, ya), (xs, ys) = array.next_batch(), shards.next_batch()
            assert np.array_equal(xa, xs) and np.array_equal(ya, ys)
        step = B * T * world
        assert array.state_dict()["position"] == 2 * step + B * T * rank  # this rank's
        assert shards.state_dict() == {"shard": 0, "position": 2 * step}  # rank 0's
