"""llm.c's model and tokenizer files (gpt2np.io.llmc).

The layout is checked against byte offsets worked out by hand here from llm.c's
train_gpt2.c (fill_in_parameter_sizes: wte (Vp, C), wpe (maxT, C), ln1w, ln1b, qkvw (L, 3C, C),
... each contiguous after a 1024-byte header), not against the module's own table.
"""
import os
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpt2np import GPT, GPTConfig
from gpt2np.config import GPT2_VOCAB_SIZE
from gpt2np.data.tokenizer import get_encoding
from gpt2np.io.llmc import (LlmcFormatError, bf16_bits_to_float32, float32_to_bf16_bits,
                            is_llmc_model, read_llmc, read_llmc_header, write_llmc,
                            write_llmc_tokenizer)
from gpt2np.model import param_shapes

# The tiny model of the hand-built file: L=1, C=4, NH=2, V=5, Vp=128, maxT=3.
TINY = GPTConfig(block_size=3, vocab_size=5, n_layer=1, n_head=2, n_embd=4)
# llm.c's 16 tensors for TINY in file order, with their sizes (numbers) for L=1, C=4
TINY_SIZES = [("wte", 128 * 4), ("wpe", 3 * 4), ("ln1w", 4), ("ln1b", 4), ("qkvw", 12 * 4),
              ("qkvb", 12), ("attprojw", 4 * 4), ("attprojb", 4), ("ln2w", 4), ("ln2b", 4),
              ("fcw", 16 * 4), ("fcb", 16), ("fcprojw", 4 * 16), ("fcprojb", 4), ("lnfw", 4),
              ("lnfb", 4)]
TINY_NUMBERS = 776  # the sum of TINY_SIZES
FCPROJB_OFFSET = 4080  # 1024 + 4 * (512+12+4+4+48+12+16+4+4+4+64+16+64), fcprojb's first byte


def header_ints(version=3, maxT=3, V=5, L=1, NH=2, C=4, Vp=128, magic=20240326):
    h = np.zeros(256, dtype="<i4")
    h[:8] = magic, version, maxT, V, L, NH, C, Vp
    return h


def tiny_pattern(k, n):
    """Tensor number k of the hand-built file: k * 1000 + 0, 1, 2, ... (exact in float32)."""
    return (k * 1000 + np.arange(n)).astype("<f4")


@pytest.fixture
def tiny_file(tmp_path):
    path = tmp_path / "tiny.bin"
    body = b"".join(tiny_pattern(k, n).tobytes() for k, (_, n) in enumerate(TINY_SIZES))
    path.write_bytes(header_ints().tobytes() + body)
    return path


def expected_tiny_params():
    """What gpt2np must hold for the hand-built file: llm.c's (out, in) weights transposed."""
    t = {name: tiny_pattern(k, n) for k, (name, n) in enumerate(TINY_SIZES)}
    h = "transformer.h.0."
    return {
        "transformer.wte.weight": t["wte"].reshape(128, 4)[:5],
        "transformer.wpe.weight": t["wpe"].reshape(3, 4),
        h + "ln_1.weight": t["ln1w"], h + "ln_1.bias": t["ln1b"],
        h + "attn.c_attn.weight": t["qkvw"].reshape(12, 4).T,
        h + "attn.c_attn.bias": t["qkvb"],
        h + "attn.c_proj.weight": t["attprojw"].reshape(4, 4).T,
        h + "attn.c_proj.bias": t["attprojb"],
        h + "ln_2.weight": t["ln2w"], h + "ln_2.bias": t["ln2b"],
        h + "mlp.c_fc.weight": t["fcw"].reshape(16, 4).T, h + "mlp.c_fc.bias": t["fcb"],
        h + "mlp.c_proj.weight": t["fcprojw"].reshape(4, 16).T, h + "mlp.c_proj.bias": t["fcprojb"],
        "transformer.ln_f.weight": t["lnfw"], "transformer.ln_f.bias": t["lnfb"],
    }


def random_params(config, seed=0, dtype="float32"):
    """Every parameter random and nonzero (biases, LayerNorms too): a misplaced tensor shows."""
    rng = np.random.default_rng(seed)
    return {k: rng.normal(0, 0.5, size=s).astype(dtype) for k, s in param_shapes(config).items()}


def torch_bf16(a):
    """The oracle for bf16 rounding: torch's own cast, widened back to float32."""
    torch = pytest.importorskip("torch")
    return torch.from_numpy(np.asarray(a, dtype=np.float32)).to(torch.bfloat16).float().numpy()


# ------------------------------------------------------------------------------ the layout


def test_hand_built_file_reads_to_known_tensors(tiny_file):
    assert tiny_file.stat().st_size == 1024 + 4 * TINY_NUMBERS == 4128
    header = read_llmc_header(tiny_file)
    assert (header.version, header.dtype, header.padded_vocab_size) == (3, "float32", 128)
    assert header.config() == TINY
    assert header.num_params() == TINY_NUMBERS
    config, params = read_llmc(tiny_file)
    assert config == TINY
    expected = expected_tiny_params()
    assert list(params) == list(param_shapes(TINY))  # the checkpoint's order
    for key, want in expected.items():
        assert params[key].dtype == np.float32 and params[key].flags.c_contiguous, key
        np.testing.assert_array_equal(params[key], want, err_msg=key)
    # by hand: qkvw is tensor 4, stored (3C, C) = (12, 4); its row 7, column 1 is number
    # 7 * 4 + 1 = 29 of it, and gpt2np's c_attn.weight (C, 3C) holds it at [1, 7]
    assert params["transformer.h.0.attn.c_attn.weight"][1, 7] == 4029
    # fcprojb (tensor 13) starts at the byte offset computed by hand from llm.c's sizes
    raw = tiny_file.read_bytes()
    assert struct.unpack_from("<4f", raw, FCPROJB_OFFSET) == (13000, 13001, 13002, 13003)
    np.testing.assert_array_equal(params["transformer.h.0.mlp.c_proj.bias"],
                                  [13000, 13001, 13002, 13003])


def test_hand_built_bf16_file(tmp_path):
    """Version 5: the same layout in 2-byte numbers; bf16 bits widen to float32 exactly."""
    path = tmp_path / "tiny_bf16.bin"
    bits = [(0x3F80 + 0x80 * k + np.arange(n)).astype("<u2") for k, (_, n) in enumerate(TINY_SIZES)]
    path.write_bytes(header_ints(version=5).tobytes() + b"".join(b.tobytes() for b in bits))
    assert path.stat().st_size == 1024 + 2 * TINY_NUMBERS
    assert read_llmc_header(path).dtype == "bfloat16"
    _, params = read_llmc(path)
    # 0x3F80 is 1.0 and 0x3F81 1.0078125: bf16 0x3F80 + j is 1 + j/128 for j < 128
    np.testing.assert_array_equal(params["transformer.wte.weight"],
                                  (1 + np.arange(20) / 128).reshape(5, 4))
    # qkvw is tensor 4, its number 29 (row 7, column 1) has bits 0x3F80 + 4 * 0x80 + 29:
    # widened, the top half of a float32
    want = np.frombuffer(struct.pack("<I", (0x3F80 + 0x200 + 29) << 16), dtype="<f4")[0]
    assert params["transformer.h.0.attn.c_attn.weight"][1, 7] == want


def test_writer_gives_the_hand_built_bytes(tiny_file, tmp_path):
    """Written back, the hand-built file is the same bytes, but for the padded rows of wte,
    which the reader drops and the writer fills with zeros."""
    config, params = read_llmc(tiny_file)
    out = write_llmc(tmp_path / "again.bin", config, params)
    want = bytearray(tiny_file.read_bytes())
    want[1024 + 4 * 5 * 4:1024 + 4 * 128 * 4] = bytes(4 * 123 * 4)
    assert out.read_bytes() == bytes(want)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again.bin", "tiny.bin"]  # no temporary


# ------------------------------------------------------------------------------ round trips


@given(n_layer=st.integers(1, 3), n_head=st.integers(1, 3), hs=st.integers(1, 4),
       vocab_size=st.integers(1, 300), block_size=st.integers(1, 9), seed=st.integers(0, 99))
def test_float32_round_trip_is_exact(tmp_path_factory, n_layer, n_head, hs, vocab_size,
                                     block_size, seed):
    config = GPTConfig(block_size=block_size, vocab_size=vocab_size, n_layer=n_layer,
                       n_head=n_head, n_embd=n_head * hs)
    params = random_params(config, seed)
    path = write_llmc(tmp_path_factory.mktemp("rt") / "m.bin", config, params)
    Vp = -(-vocab_size // 128) * 128
    assert read_llmc_header(path).padded_vocab_size == Vp
    got_config, got = read_llmc(path)
    assert got_config == config
    for key, value in params.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_bfloat16_round_trip_rounds_to_nearest_even(tmp_path):
    config = GPTConfig(block_size=4, vocab_size=7, n_layer=2, n_head=2, n_embd=8)
    params = random_params(config, seed=1)
    path = write_llmc(tmp_path / "m.bin", config, params, dtype="bfloat16")
    header = read_llmc_header(path)
    assert (header.version, header.dtype) == (5, "bfloat16")
    assert path.stat().st_size == 1024 + 2 * header.num_params()
    got_config, got = read_llmc(path)
    assert got_config == config
    for key, value in params.items():
        np.testing.assert_array_equal(got[key], torch_bf16(value), err_msg=key)
        np.testing.assert_array_equal(got[key], bf16_bits_to_float32(float32_to_bf16_bits(value)))


def test_bf16_ties_by_hand():
    """Bit patterns rounded by hand: a float32's low 16 bits 0x8000 are exactly half way."""
    cases = {
        0x3F808000: 0x3F80,  # 1 + 2^-8: half way between 1 (even) and 1 + 2^-7: down
        0x3F818000: 0x3F82,  # 1 + 3 * 2^-8: half way between ...81 and ...82 (even): up
        0x3F808001: 0x3F81,  # just past half way: up
        0x3F807FFF: 0x3F80,  # just short of half way: down
        0xBF808000: 0xBF80,  # the sign does not change ties
        0x00018000: 0x0002,  # a subnormal tie, up to even
        0x7F7FFFFF: 0x7F80,  # float32's largest rounds past bf16's largest: inf, as torch
        0x7F800000: 0x7F80, 0xFF800000: 0xFF80,  # inf stays inf
    }
    u = np.array(list(cases), dtype=np.uint32)
    np.testing.assert_array_equal(float32_to_bf16_bits(u.view(np.float32)),
                                  np.array(list(cases.values()), dtype=np.uint16))
    # torch agrees (the writer must round as llm.c's train_gpt2.py does, through torch)
    np.testing.assert_array_equal(torch_bf16(u.view(np.float32)),
                                  bf16_bits_to_float32(list(cases.values())))


def test_bf16_nan_stays_nan_and_random_values_match_torch():
    nan_bits = np.array([0x7FC00000, 0xFFC00000, 0x7F800001, 0x7FFFFFFF], dtype=np.uint32)
    assert np.isnan(bf16_bits_to_float32(float32_to_bf16_bits(nan_bits.view(np.float32)))).all()
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 1, 10000), rng.normal(0, 1e-39, 1000),  # subnormals too
                        rng.normal(0, 1e38, 1000)]).astype(np.float32)
    np.testing.assert_array_equal(bf16_bits_to_float32(float32_to_bf16_bits(x)), torch_bf16(x))


def test_bf16_tie_written_to_the_file(tmp_path):
    """The writer rounds a tie to even: ln_f.bias[0] = 1 + 2^-8 is stored as bf16 1.0."""
    params = expected_tiny_params()
    tie = np.frombuffer(struct.pack("<I", 0x3F808000), dtype="<f4")[0]
    params["transformer.ln_f.bias"] = np.array([tie, 0, 0, 0], dtype=np.float32)
    path = write_llmc(tmp_path / "m.bin", TINY, params, dtype="bfloat16")
    lnfb_offset = 1024 + 2 * (TINY_NUMBERS - 4)  # the last tensor
    assert struct.unpack_from("<H", path.read_bytes(), lnfb_offset) == (0x3F80,)
    assert read_llmc(path)[1]["transformer.ln_f.bias"][0] == 1.0


def test_float64_params_are_written_as_float32(tmp_path):
    params64 = random_params(TINY, seed=3, dtype="float64")
    path = write_llmc(tmp_path / "m.bin", TINY, params64)
    _, got = read_llmc(path)
    for key, value in params64.items():
        np.testing.assert_array_equal(got[key], value.astype(np.float32))


@pytest.mark.parametrize("vocab_size, Vp", [(50300, 50304), (50304, 50304), (50305, 50432)])
def test_padded_vocab_keeps_its_rows_and_the_header_says_gpt2(tmp_path, vocab_size, Vp):
    config = GPTConfig(block_size=2, vocab_size=vocab_size, n_layer=1, n_head=1, n_embd=2)
    params = random_params(config)
    path = write_llmc(tmp_path / "m.bin", config, params)
    header = read_llmc_header(path)
    assert (header.vocab_size, header.padded_vocab_size) == (GPT2_VOCAB_SIZE, Vp)
    wte = np.fromfile(path, dtype="<f4", count=Vp * 2, offset=1024).reshape(Vp, 2)
    np.testing.assert_array_equal(wte[:vocab_size], params["transformer.wte.weight"])
    assert not wte[vocab_size:].any()  # llm.c's padding: zero rows
    got_config, got = read_llmc(path)
    assert got_config == config.replace(vocab_size=GPT2_VOCAB_SIZE)
    np.testing.assert_array_equal(got["transformer.wte.weight"],
                                  params["transformer.wte.weight"][:GPT2_VOCAB_SIZE])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_of_the_loaded_model_equal_the_source_models(tmp_path, dtype):
    config = GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=8)
    params = random_params(config, seed=2)
    path = write_llmc(tmp_path / "m.bin", config, params, dtype=dtype)
    got_config, got = read_llmc(path)
    source = params if dtype == "float32" else {k: torch_bf16(v) for k, v in params.items()}
    idx = np.random.default_rng(0).integers(0, 11, size=(2, 8))
    want, _ = GPT(config, params=source).forward(idx)
    logits, _ = GPT(got_config, params=got).forward(idx)
    np.testing.assert_array_equal(logits, want)


def test_transformers_linear_layout_matches_the_file(tmp_path):
    """llm.c stores nn.Linear weights (out, in): layer 0's qkvw read raw from the file, applied
    as F.linear, equals transformers' Conv1D c_attn of the same params; and a
    GPT2LMHeadModel loaded with the params read back gives gpt2np's logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = GPTConfig(block_size=8, vocab_size=11, n_layer=2, n_head=2, n_embd=8)
    params = random_params(config, seed=4)
    path = write_llmc(tmp_path / "m.bin", config, params)
    C, Vp, maxT, L = 8, 128, 8, 2
    qkvw_offset = 1024 + 4 * (Vp * C + maxT * C + 2 * L * C)  # after wte, wpe, ln1w, ln1b
    qkvb_offset = qkvw_offset + 4 * L * 3 * C * C
    qkvw0 = np.fromfile(path, dtype="<f4", count=3 * C * C, offset=qkvw_offset).reshape(3 * C, C)
    qkvb0 = np.fromfile(path, dtype="<f4", count=3 * C, offset=qkvb_offset)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=L, n_head=2, n_embd=C, vocab_size=11, n_positions=maxT)).eval()
    _, got = read_llmc(path)
    hf.load_state_dict({k: torch.from_numpy(v) for k, v in got.items()}, strict=False)
    x = torch.from_numpy(np.random.default_rng(1).normal(size=(3, C)).astype(np.float32))
    with torch.no_grad():
        linear = torch.nn.functional.linear(x, torch.from_numpy(qkvw0), torch.from_numpy(qkvb0))
        np.testing.assert_allclose(linear.numpy(), hf.transformer.h[0].attn.c_attn(x).numpy(),
                                   rtol=1e-6, atol=1e-6)
        idx = np.random.default_rng(0).integers(0, 11, size=(2, 8))
        hf_logits = hf(torch.from_numpy(idx)).logits.numpy()
    np.testing.assert_allclose(GPT(config, params=params).forward(idx)[0], hf_logits,
                               rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------ damaged files


def damaged(tmp_path, ints=None, data=None, name="bad.bin"):
    """A file with the tiny model's header changed by `ints` ({index: value}), and the tiny
    model's body (or `data` as the whole file)."""
    path = tmp_path / name
    if data is None:
        h = header_ints()
        for i, v in (ints or {}).items():
            h[i] = v
        data = h.tobytes() + bytes(4 * TINY_NUMBERS)
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("ints, field, words", [
    ({0: 20240520}, "magic", "not an llm.c model file"),  # a token file's magic
    ({1: 4}, "version", "version 4"),
    ({1: 2}, "version", "version 2"),
    ({2: 0}, "block_size", "block_size (maxT) = 0"),
    ({2: -3}, "block_size", "block_size (maxT) = -3"),
    ({2: 2 ** 20 + 1}, "block_size", "must be in"),
    ({3: 0}, "vocab_size", "vocab_size (V) = 0"),
    ({3: 2 ** 31 - 1}, "vocab_size", "2147483647"),
    ({4: -1}, "n_layer", "n_layer (L) = -1"),
    ({4: 1025}, "n_layer", "n_layer (L) = 1025"),
    ({5: 0}, "n_head", "n_head (NH) = 0"),
    ({6: 0}, "n_embd", "n_embd (C) = 0"),
    ({6: 65537}, "n_embd", "n_embd (C) = 65537"),
    ({5: 3}, "n_head", "not divisible"),
    ({7: 4}, "padded_vocab_size", "smaller than vocab_size"),
    ({7: 0}, "padded_vocab_size", "padded_vocab_size (Vp) = 0"),
    ({7: 129}, "length", "truncated"),  # a valid header whose sizes the file does not have
])
def test_damaged_header_is_one_clear_error(tmp_path, ints, field, words):
    path = damaged(tmp_path, ints)
    for read in (read_llmc_header, read_llmc):
        with pytest.raises(LlmcFormatError) as e:
            read(path)
        assert e.value.field == field
        assert str(path) in str(e.value) and words in str(e.value)


@pytest.mark.parametrize("change, words", [
    (lambda raw: raw[:-1], "truncated"),
    (lambda raw: raw[:1024], "truncated"),
    (lambda raw: raw + b"\0", "1 bytes too long"),
    (lambda raw: raw + raw, "too long"),
])
def test_wrong_length_is_refused(tiny_file, tmp_path, change, words):
    path = damaged(tmp_path, data=change(tiny_file.read_bytes()))
    with pytest.raises(LlmcFormatError, match="needs 4128") as e:
        read_llmc(path)
    assert e.value.field == "length" and words in str(e.value)


@pytest.mark.parametrize("size", [0, 4, 1023])
def test_file_shorter_than_the_header(tmp_path, size):
    path = damaged(tmp_path, data=header_ints().tobytes()[:size])
    with pytest.raises(LlmcFormatError, match=f"{size} bytes, shorter than the 1024-byte") as e:
        read_llmc(path)
    assert e.value.field == "header"


def test_sparse_file_claiming_huge_sizes_fails_without_allocating(tmp_path):
    """Sizes at their bounds but within GPTConfig's parameter cap: the header claims ~8*10^10
    numbers. The file (sparse, 1 GiB) is refused by its length before anything of the
    claimed size is allocated."""
    path = tmp_path / "huge.bin"
    with open(path, "wb") as f:
        f.write(header_ints(maxT=2 ** 20, V=2 ** 20, L=1, NH=1, C=32768, Vp=2 ** 20).tobytes())
        f.truncate(2 ** 30)
    tracemalloc.start()
    try:
        with pytest.raises(LlmcFormatError, match="truncated") as e:
            read_llmc(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert e.value.field == "length"
    assert peak < 16 * 2 ** 20


def test_is_llmc_model(tiny_file, tmp_path):
    assert is_llmc_model(tiny_file)
    assert is_llmc_model(damaged(tmp_path, {1: 4}, name="v4.bin"))  # the magic only
    assert not is_llmc_model(damaged(tmp_path, {0: 20240328}, name="tok.bin"))
    assert not is_llmc_model(damaged(tmp_path, data=b"", name="empty.bin"))
    assert not is_llmc_model(damaged(tmp_path, data=b"\x2e\xd4\x34", name="short.bin"))
    assert not is_llmc_model(tmp_path)  # a folder
    assert not is_llmc_model(tmp_path / "missing.bin")


# ------------------------------------------------------------------------------ writer errors


def test_writer_refuses_bad_requests(tmp_path):
    params = expected_tiny_params()
    target = tmp_path / "m.bin"
    with pytest.raises(ValueError, match="'float16'"):
        write_llmc(target, TINY, params, dtype="float16")
    with pytest.raises(ValueError, match="missing .*ln_f.bias"):
        write_llmc(target, TINY, {k: v for k, v in params.items() if "ln_f.bias" not in k})
    with pytest.raises(ValueError, match=r"wpe.weight.*\(2, 4\).*needs \(3, 4\)"):
        write_llmc(target, TINY, dict(params, **{"transformer.wpe.weight": np.zeros((2, 4))}))
    # a config llm.c's header cannot hold is no GPTConfig at all (its bounds are llm.c's)
    with pytest.raises(ValueError, match=r"block_size must be positive and at most 1048576, got 1048577"):
        GPTConfig(block_size=2 ** 20 + 1, vocab_size=2, n_layer=1, n_head=1, n_embd=1)
    assert list(tmp_path.iterdir()) == []


class _Unreadable:
    """An array-like with the right shape whose data cannot be read: a write that fails
    half way through the file."""
    shape = (4,)

    def __array__(self, dtype=None, copy=None):
        raise RuntimeError("cannot read this tensor")


def test_failed_write_leaves_the_old_file(tiny_file):
    before = tiny_file.read_bytes()
    params = dict(expected_tiny_params(), **{"transformer.ln_f.weight": _Unreadable()})
    with pytest.raises(RuntimeError, match="cannot read this tensor"):
        write_llmc(tiny_file, TINY, params)
    assert tiny_file.read_bytes() == before
    assert os.listdir(tiny_file.parent) == ["tiny.bin"]  # no temporary left


# ------------------------------------------------------------------------------ tokenizer


def test_tokenizer_file(tmp_path):
    path = write_llmc_tokenizer(tmp_path / "gpt2_tokenizer.bin")
    raw = path.read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    assert list(header[:4]) == [20240328, 2, 50257, 50256] and not header[4:].any()
    tokens, pos = [], 1024
    while pos < len(raw):  # llm.c's tokenizer_init: one length byte, then the bytes
        n = raw[pos]
        tokens.append(raw[pos + 1:pos + 1 + n])
        pos += 1 + n
    assert pos == len(raw) and len(tokens) == 50257
    assert tokens[0] == b"!" and tokens[220] == b" " and tokens[15496] == b"Hello"
    assert tokens[50256] == b"<|endoftext|>"
    enc = get_encoding()
    assert b"".join(tokens[i] for i in enc.encode_ordinary("Hello world")) == b"Hello world"
