"""llm.c's model files through every command that takes a model, and `gpt2np export --format
llmc`.

The llm.c files here are made by `llmc_file_bytes`, which follows llm.c's train_gpt2.py
(write_model, write_tensors) and not gpt2np.io.llmc: its 16 tensors in llm.c's order,
nn.Linear's (out, in) weights, wte padded with zero rows to a multiple of 128, bf16 through
torch's cast. So "loads" means: a file written the way llm.c writes it loads, and "exports"
means: the bytes are the ones llm.c would have written for those params.
"""
import json

import numpy as np
import pytest

import gpt2np
from gpt2np import GPT, GPTConfig
from gpt2np.commands import eval as eval_cmd
from gpt2np.commands import export as export_cmd
from gpt2np.commands import generate as generate_cmd
from gpt2np.commands import gradcheck as gradcheck_cmd
from gpt2np.commands import train as train_cmd
from gpt2np.config import GPT2_VOCAB_SIZE, PRESETS
from gpt2np.data.shakespeare import BatchLoader, load_tokens, split
from gpt2np.data.tokenizer import encode, get_encoding
from gpt2np.errors import UsageError
from gpt2np.evals.gradcheck import batch_from_text
from gpt2np.evals.loss import load_eval_tokens, token_loss
from gpt2np.io import export as export_module
from gpt2np.io.checkpoint import load_checkpoint
from gpt2np.io.export import export, llmc_model_name
from gpt2np.io.hf_folder import save_pretrained
from gpt2np.io.llmc import read_llmc, read_llmc_header
from gpt2np.model import init_params, param_shapes
from testdata import shakespeare_path
from tiny_run import TINY, tiny_flags, tiny_run  # noqa: F401 (tiny_run: a fixture)

# GPT-2's vocabulary (real text's token ids), everything else tiny
CFG = GPTConfig(block_size=16, vocab_size=GPT2_VOCAB_SIZE, n_layer=2, n_head=2, n_embd=16)
TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n") * 3

# llm.c's per-layer tensors, in its file order (after wte, wpe; before ln_f)
LAYER_TENSORS = ("ln_1.weight", "ln_1.bias", "attn.c_attn.weight", "attn.c_attn.bias",
                 "attn.c_proj.weight", "attn.c_proj.bias", "ln_2.weight", "ln_2.bias",
                 "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight", "mlp.c_proj.bias")


def llmc_file_bytes(config, params, dtype="float32", padding_rows=None) -> bytes:
    """llm.c's model file of gpt2np `params` (vocab_size <= 50257), as llm.c's train_gpt2.py
    writes it; `padding_rows` (Vp - V, C) replaces the zero rows, as a trainer's file may."""
    torch = pytest.importorskip("torch")
    V, C, L = config.vocab_size, config.n_embd, config.n_layer
    Vp = -(-V // 128) * 128
    header = np.zeros(256, dtype="<i4")
    header[:8] = (20240326, {"float32": 3, "bfloat16": 5}[dtype], config.block_size, V, L,
                  config.n_head, C, Vp)
    pad = np.zeros((Vp - V, C), np.float32) if padding_rows is None else padding_rows
    tensors = [np.concatenate([params["transformer.wte.weight"], pad]),
               params["transformer.wpe.weight"]]
    for name in LAYER_TENSORS:
        for i in range(L):
            t = params[f"transformer.h.{i}.{name}"]
            tensors.append(t.T if t.ndim == 2 else t)  # Conv1D (in, out) -> nn.Linear (out, in)
    tensors += [params["transformer.ln_f.weight"], params["transformer.ln_f.bias"]]

    def raw(t):
        t = torch.from_numpy(np.ascontiguousarray(t, dtype=np.float32))
        if dtype == "bfloat16":
            t = t.to(torch.bfloat16).view(torch.int16)
        return t.numpy().tobytes()

    return header.tobytes() + b"".join(raw(t) for t in tensors)


def bf16(params):
    """The params as a bf16 file holds them: rounded by torch's cast, widened back."""
    torch = pytest.importorskip("torch")
    return {k: torch.from_numpy(v).to(torch.bfloat16).float().numpy() for k, v in params.items()}


def random_params(config, seed=0):
    """GPT-2's init plus noise everywhere (biases, LayerNorms): a misplaced tensor shows."""
    rng = np.random.default_rng(seed)
    return {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32)
            for k, v in init_params(config, seed).items()}


@pytest.fixture(scope="module")
def llmc(tmp_path_factory):
    """(folder, params, path of the float32 llm.c file): named as no llm.c file is, so that
    only its magic can tell what it is."""
    tmp = tmp_path_factory.mktemp("llmc")
    params = random_params(CFG, seed=5)
    path = tmp / "weights.dat"
    path.write_bytes(llmc_file_bytes(CFG, params))
    (tmp / "text.txt").write_text(TEXT)
    return tmp, params, path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ------------------------------------------------------------------------------ from_pretrained


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_file_written_as_llmc_writes_it_loads_with_the_source_models_logits(tmp_path, dtype):
    params = random_params(CFG, seed=1)
    rng = np.random.default_rng(2)
    garbage = rng.normal(0, 1, (50304 - GPT2_VOCAB_SIZE, CFG.n_embd)).astype(np.float32)
    path = tmp_path / "model_00000020.bin"  # as llm.c's trainer names its checkpoints
    # a trainer's file may hold anything in the padded rows: they are no tokens
    path.write_bytes(llmc_file_bytes(CFG, params, dtype, padding_rows=garbage))
    model = gpt2np.from_pretrained(path)
    assert model.config == CFG and model.params["transformer.wte.weight"].dtype == np.float32
    source = GPT(CFG, params=params if dtype == "float32" else bf16(params))
    idx = rng.integers(0, GPT2_VOCAB_SIZE, (2, CFG.block_size))
    np.testing.assert_array_equal(model.forward(idx)[0], source.forward(idx)[0])
    wide = gpt2np.from_pretrained(str(path), dtype="float64")  # any dtype, as every source
    for key, value in source.params.items():
        np.testing.assert_array_equal(wide.params[key], value.astype(np.float64), err_msg=key)


def test_an_llmc_file_is_known_by_its_magic_not_its_name(llmc, tmp_path):
    _, params, path = llmc
    # named like a training checkpoint, it is still read as what its bytes say
    ckpt_named = tmp_path / "ckpt.safetensors"
    ckpt_named.write_bytes(path.read_bytes())
    np.testing.assert_array_equal(gpt2np.from_pretrained(ckpt_named).params["transformer.wpe.weight"],
                                  params["transformer.wpe.weight"])
    # a .bin that is not llm.c's: the error names both file kinds a file may be
    (tmp_path / "gpt2_124M.bin").write_bytes(b"\0" * 2048)
    with pytest.raises(OSError, match="not a gpt2np training checkpoint, nor an llm.c model file"):
        gpt2np.from_pretrained(tmp_path / "gpt2_124M.bin")


@pytest.mark.parametrize("damage, words", [
    (lambda raw: raw[:-2], "truncated"),
    (lambda raw: raw[:4] + (4).to_bytes(4, "little") + raw[8:], "llm.c model version 4"),
    (lambda raw: raw[:12] + (0).to_bytes(4, "little") + raw[16:], "vocab_size (V) = 0"),
])
def test_a_damaged_file_is_one_error_line_naming_it(llmc, tmp_path, capsys, damage, words):
    _, _, path = llmc
    bad = tmp_path / "bad.bin"
    bad.write_bytes(damage(path.read_bytes()))
    assert generate_cmd.main(["--model", str(bad), "--max-new-tokens", "1"]) == 1
    line = one_line_error(capsys)
    assert str(bad) in line and words in line


# ------------------------------------------------------------------------------ each command


def test_generate_samples_an_llmc_file(llmc, capsys):
    _, params, path = llmc
    assert generate_cmd.main(["--model", str(path), "--prompt", "ROMEO:", "--num-samples", "2",
                              "--max-new-tokens", "6", "--seed", "7"]) == 0
    samples = capsys.readouterr().out.split("--- sample ")[1:]
    enc = get_encoding()
    want = GPT(CFG, params=params).generate(np.array([enc.encode("ROMEO:")] * 2), 6, top_k=50,
                                            seed=7)
    assert [s.split("\n", 1)[1].rstrip("\n") for s in samples] == [enc.decode(r.tolist())
                                                                   for r in want]


def test_eval_scores_an_llmc_file(llmc):
    tmp, params, path = llmc
    out = tmp / "loss.json"
    assert eval_cmd.main(["--model", str(path), "--task", "loss", "--data", str(tmp / "text.txt"),
                          "--json", str(out), "--no-progress"]) == 0
    got = json.loads(out.read_text())
    want = token_loss(GPT(CFG, params=params), load_eval_tokens(tmp / "text.txt"), progress=False)
    assert got["n_tokens"] == len(encode(TEXT)) - 1 == want.n_tokens
    assert got["loss"] == want.loss


def test_gradcheck_checks_an_llmc_file(llmc, capsys):
    tmp, params, path = llmc
    out = tmp / "gc.json"
    assert gradcheck_cmd.main(["--model", str(path), "--text", str(tmp / "text.txt"), "-B", "2",
                               "-T", "8", "--fd", "1", "--json", str(out)]) == 0
    assert "gradients OK" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert list(report["tensors"]) == list(param_shapes(CFG))
    x, y = batch_from_text(tmp / "text.txt", 2, 8)
    _, loss = GPT(CFG, dtype="float64", params=params).forward(x, y)
    assert report["loss"] == pytest.approx(float(loss), rel=1e-14)


def test_train_starts_from_an_llmc_file(llmc, tmp_path, capsys):
    if not shakespeare_path().is_file():
        pytest.skip(f"tiny Shakespeare not at {shakespeare_path()} (set GPT2NP_DATA)")
    _, params, path = llmc
    run = tmp_path / "run"
    flags = tiny_flags(run, tmp_path / "cache", init_from=str(path), max_steps=1, n_layer=None,
                       n_head=None, n_embd=None)
    assert train_cmd.main(flags) == 0
    first = json.loads((run / "log.jsonl").read_text().splitlines()[0])
    tokens = load_tokens(shakespeare_path(), cache=tmp_path / "cache")
    x, y = BatchLoader(split(tokens)[0], TINY["batch_size"], TINY["block_size"]).next_batch()
    _, loss = GPT(CFG, params=params).forward(x, y)
    assert first["train_loss"] == pytest.approx(float(loss), rel=1e-6)  # it started from the file
    assert load_checkpoint(run / "ckpt.safetensors").state["model_config"]["n_layer"] == 2


def test_export_takes_an_llmc_file_as_src(llmc, tmp_path, capsys):
    _, params, path = llmc
    assert export_cmd.main([str(path), str(tmp_path / "hf")]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    back = gpt2np.from_pretrained(tmp_path / "hf")
    assert back.config == CFG
    for key, value in params.items():
        np.testing.assert_array_equal(back.params[key], value, err_msg=key)


# ------------------------------------------------------------------------------ export --format llmc


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_an_llmc_file_exported_as_llmc_is_the_bytes_llmc_writes(llmc, tmp_path, dtype):
    _, params, path = llmc
    r = export(path, tmp_path / "out", format="llmc", dtype=dtype)
    name = "gpt2_0.81M.bin" if dtype == "float32" else "gpt2_0.81M_bf16.bin"
    assert r["files"] == [name, "gpt2_tokenizer.bin"] and r["model_file"] == name
    got = (tmp_path / "out" / name).read_bytes()
    assert got == llmc_file_bytes(CFG, params, dtype)
    if dtype == "float32":
        assert got == path.read_bytes()


def test_an_exported_run_holds_exactly_its_float32_params_in_llmcs_layout(tiny_run, tmp_path,
                                                                           capsys):
    dest = tmp_path / "llmc"
    assert export_cmd.main([str(tiny_run), str(dest), "--format", "llmc"]) == 0
    out = capsys.readouterr().out
    ckpt = load_checkpoint(tiny_run / "ckpt.safetensors")
    config = GPTConfig.from_dict(ckpt.state["model_config"])
    assert sorted(p.name for p in dest.iterdir()) == ["gpt2_0.81M.bin", "gpt2_tokenizer.bin"]
    assert "V=50257 in Vp=50304 rows" in out and "train_gpt2cu -e" in out
    model_file = dest / "gpt2_0.81M.bin"
    assert model_file.read_bytes() == llmc_file_bytes(config, ckpt.params)  # the run's float32
    got_config, got = read_llmc(model_file)
    assert got_config == config
    for key, value in ckpt.params.items():
        assert value.dtype == np.float32
        np.testing.assert_array_equal(got[key], value, err_msg=key)
    # the tokenizer file decodes the run's ids as gpt2np does
    assert (dest / "gpt2_tokenizer.bin").read_bytes()[:16] == np.array(
        [20240328, 2, 50257, 50256], dtype="<i4").tobytes()
    # bf16: the run's params rounded by torch's cast, as llm.c's train_gpt2.py writes them
    assert export_cmd.main([str(tiny_run), str(tmp_path / "bf16"), "--format", "llmc",
                            "--dtype", "bfloat16"]) == 0
    assert (tmp_path / "bf16" / "gpt2_0.81M_bf16.bin").read_bytes() == \
        llmc_file_bytes(config, ckpt.params, "bfloat16")


@pytest.mark.parametrize("vocab_size, V, Vp, tokenizer", [
    (50304, 50257, 50304, True),  # train's --vocab-size 50304: every row kept, V is GPT-2's
    (50257, 50257, 50304, True),  # GPT-2's: padded with zero rows
    (300, 300, 384, False),  # not GPT-2's BPE: no tokenizer file
])
def test_the_vocabulary_is_padded_as_llmc_pads_it(tmp_path, vocab_size, V, Vp, tokenizer):
    config = CFG.replace(vocab_size=vocab_size)
    params = random_params(config, seed=3)
    save_pretrained(GPT(config, params=params), tmp_path / "src")
    r = export(tmp_path / "src", tmp_path / "out", format="llmc")
    header = read_llmc_header(tmp_path / "out" / r["model_file"])
    assert (header.vocab_size, header.padded_vocab_size) == (V, Vp) == \
        (r["llmc_header"].vocab_size, r["llmc_header"].padded_vocab_size)
    wte = np.fromfile(tmp_path / "out" / r["model_file"], dtype="<f4", count=Vp * CFG.n_embd,
                      offset=1024).reshape(Vp, CFG.n_embd)
    np.testing.assert_array_equal(wte[:vocab_size], params["transformer.wte.weight"])
    assert not wte[vocab_size:].any()
    assert (tmp_path / "out" / "gpt2_tokenizer.bin").exists() == tokenizer
    assert r["vocab_size"] == vocab_size  # every row, as the params count says
    assert r["params"] == sum(int(np.prod(s)) for s in param_shapes(config).values())


def test_llmc_model_names_are_llmcs():
    def size(preset):
        config = GPTConfig(**PRESETS[preset])
        return sum(int(np.prod(s)) for s in param_shapes(config).values())

    assert llmc_model_name(size("gpt2"), "float32") == "gpt2_124M.bin"  # train_gpt2.c's default
    assert llmc_model_name(size("gpt2"), "bfloat16") == "gpt2_124M_bf16.bin"  # train_gpt2cu's
    assert llmc_model_name(size("gpt2-medium"), "float32") == "gpt2_355M.bin"
    assert llmc_model_name(size("gpt2-xl"), "bfloat16") == "gpt2_1558M_bf16.bin"
    assert llmc_model_name(807_392, "float32") == "gpt2_0.81M.bin"
    assert llmc_model_name(1_234, "float32") == "gpt2_0.0012M.bin"


@pytest.mark.parametrize("args, words", [
    (["--dtype", "float16"], "llm.c's model files are float32 or bfloat16"),
    (["--keep-padded-vocab"], "--keep-padded-vocab is for --format hf"),
])
def test_what_llmc_has_no_file_for_is_refused_before_anything_is_read(llmc, tmp_path, capsys,
                                                                      args, words):
    _, _, path = llmc
    dest = tmp_path / "out"
    assert export_cmd.main([str(path), str(dest), "--format", "llmc", *args]) == 2
    assert words in one_line_error(capsys)
    assert not dest.exists()
    with pytest.raises(UsageError, match=words):  # the library says the same
        export(tmp_path / "no such source", dest, format="llmc",
               **{"dtype": "float16"} if "--dtype" in args else {"keep_padded_vocab": True})
    with pytest.raises(SystemExit):
        export_cmd.build_parser().parse_args([str(path), str(dest), "--format", "gguf"])
    with pytest.raises(UsageError, match="unknown export format 'gguf'"):
        export(path, dest, format="gguf")


def test_llmc_export_is_atomic_and_replaces_only_an_earlier_export(llmc, tmp_path, monkeypatch):
    _, params, path = llmc
    dest = tmp_path / "out"

    def boom(*a, **k):
        raise OSError("disk full")

    # a failure after the model file is written leaves no DEST and no temporary folder
    monkeypatch.setattr(export_module, "write_llmc_tokenizer", boom)
    with pytest.raises(OSError, match="disk full"):
        export(path, dest, format="llmc")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.undo()
    export(path, dest, format="llmc")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(path, dest, format="llmc", dtype="bfloat16")
    assert sorted(p.name for p in dest.iterdir()) == ["gpt2_0.81M.bin", "gpt2_tokenizer.bin"]
    # one rule for both formats: --overwrite replaces an earlier export of either
    export(path, dest, format="llmc", dtype="bfloat16", overwrite=True)
    assert sorted(p.name for p in dest.iterdir()) == ["gpt2_0.81M_bf16.bin", "gpt2_tokenizer.bin"]
    export(path, dest, overwrite=True)
    assert (dest / "config.json").is_file() and not (dest / "gpt2_tokenizer.bin").exists()
    export(path, dest, format="llmc", overwrite=True)
    assert sorted(p.name for p in dest.iterdir()) == ["gpt2_0.81M.bin", "gpt2_tokenizer.bin"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # nothing left beside it
    # never replaced: llm.c's files with anything else (an llm.c checkout), a training run
    checkout = tmp_path / "llm.c"
    checkout.mkdir()
    (checkout / "gpt2_124M.bin").write_bytes(path.read_bytes())
    (checkout / "train_gpt2.c").write_text("int main() { return 0; }\n")
    with pytest.raises(FileExistsError, match="does not look like an exported model"):
        export(path, checkout, format="llmc", overwrite=True)
    assert (checkout / "train_gpt2.c").exists() and (checkout / "gpt2_124M.bin").exists()
    run = tmp_path / "run"
    run.mkdir()
    (run / "ckpt.safetensors").write_bytes(b"run")
    (run / "gpt2_124M.bin").write_bytes(path.read_bytes())
    with pytest.raises(FileExistsError, match="training run"):
        export(path, run, format="llmc", overwrite=True)


def test_the_export_command_says_how_llmc_loads_it(llmc, tmp_path, capsys):
    _, _, path = llmc
    code = export_cmd.main([str(path), str(tmp_path / "o"), "--format", "llmc", "--dtype",
                            "bfloat16"])
    out = capsys.readouterr().out
    assert code == 0 and "as bfloat16" in out
    assert f"./train_gpt2cu -e {str(tmp_path / 'o' / 'gpt2_0.81M_bf16.bin')!r}" in out
    assert "gpt2_tokenizer.bin" in out and "PRECISION=FP32" not in out
