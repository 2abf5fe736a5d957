"""gpt2np export: a training run (or any model source) as a folder transformers
loads with the same logits and GPT-2's tokenizer; dtypes; a padded vocabulary; atomic DEST."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel

import gpt2np
from gpt2np import GPT, GPTConfig
from gpt2np.commands.export import main
from gpt2np.io.export import export
from gpt2np.config import GPT2_VOCAB_SIZE
from gpt2np.data.tokenizer import get_encoding
from tiny_run import tiny_run  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]


def hf_logits(folder, idx, dtype=torch.float32):
    model = GPT2LMHeadModel.from_pretrained(folder, dtype=dtype).eval()
    with torch.no_grad():
        return model(torch.from_numpy(idx)).logits.float().numpy()


def test_exported_run_loads_in_transformers(tiny_run, tmp_path):
    """The README's step: `gpt2np export OUT_DIR DEST`, then transformers."""
    dest = tmp_path / "hf"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "gpt2np", "export", str(tiny_run), str(dest)],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stderr
    assert sorted(os.listdir(dest)) == ["config.json", "generation_config.json", "merges.txt",
                                        "model.safetensors", "tokenizer_config.json", "vocab.json"]
    model = gpt2np.from_pretrained(tiny_run)
    idx = np.random.default_rng(0).integers(0, GPT2_VOCAB_SIZE, (2, model.config.block_size))
    ours, _ = model.forward(idx)
    theirs = hf_logits(dest, idx)
    assert theirs.shape == ours.shape
    np.testing.assert_allclose(theirs, ours, rtol=0, atol=1e-5)
    # the folder is self-contained: GPT-2's tokenizer and generation settings come with it
    text = "ROMEO:\nIs the day so young? <|endoftext|> naïve 1234"
    tok = AutoTokenizer.from_pretrained(dest)
    assert tok.encode(text) == get_encoding().encode(text, allowed_special="all")
    gen = json.loads((dest / "generation_config.json").read_text())
    assert gen["eos_token_id"] == gen["bos_token_id"] == 50256


def _padded_folder(tmp_path):
    """An HF folder of a random 50304-row model (as train's --vocab-size 50304 makes)."""
    cfg = GPTConfig(block_size=8, vocab_size=50304, n_layer=1, n_head=2, n_embd=8)
    model = GPT(cfg, seed=0)
    rng = np.random.default_rng(1)
    for p in model.params.values():
        p += rng.normal(0, 0.1, p.shape).astype(p.dtype)
    gpt2np.save_pretrained(model, tmp_path / "padded")
    return model, tmp_path / "padded"


def test_padded_vocabulary_is_cropped_unless_kept(tmp_path):
    model, src = _padded_folder(tmp_path)
    idx = np.random.default_rng(0).integers(0, GPT2_VOCAB_SIZE, (2, 8))
    ours, _ = model.forward(idx)
    r = export(src, tmp_path / "cropped")
    assert r["vocab_size"] == GPT2_VOCAB_SIZE
    assert json.loads((tmp_path / "cropped" / "config.json").read_text())["vocab_size"] == GPT2_VOCAB_SIZE
    np.testing.assert_allclose(hf_logits(tmp_path / "cropped", idx), ours[..., :GPT2_VOCAB_SIZE], atol=1e-5)
    export(src, tmp_path / "kept", keep_padded_vocab=True)
    assert not (tmp_path / "kept" / "vocab.json").exists()  # not GPT-2's tokenizer's size
    np.testing.assert_allclose(hf_logits(tmp_path / "kept", idx), ours, atol=1e-5)


@pytest.mark.parametrize("dtype,torch_dtype", [("float16", torch.float16), ("bfloat16", torch.bfloat16)])
def test_half_precision_exports(tmp_path, dtype, torch_dtype):
    """The weights are the float32 ones rounded as torch rounds them; both readers agree."""
    model, src = _padded_folder(tmp_path)
    export(src, tmp_path / dtype, dtype=dtype)
    hf = GPT2LMHeadModel.from_pretrained(tmp_path / dtype, dtype=torch_dtype)
    back = gpt2np.from_pretrained(tmp_path / dtype)  # widened to float32
    for name, want in model.state_dict().items():
        want = torch.from_numpy(want[:GPT2_VOCAB_SIZE] if "wte" in name else want).to(torch_dtype)
        assert hf.state_dict()[name].dtype == torch_dtype
        assert torch.equal(hf.state_dict()[name], want), name
        np.testing.assert_array_equal(back.params[name], want.float().numpy())


def test_dest_is_written_atomically_and_never_clobbered(tmp_path, monkeypatch):
    _, src = _padded_folder(tmp_path)
    dest = tmp_path / "out"
    # a failure while writing leaves no DEST and no temporary folder
    import gpt2np.io.export as ex

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(ex, "_write_tokenizer", boom)
    with pytest.raises(OSError, match="disk full"):
        export(src, dest)
    assert sorted(os.listdir(tmp_path)) == ["padded"]
    monkeypatch.undo()
    export(src, dest)
    before = (dest / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--overwrite"):
        export(src, dest, dtype="float16")
    assert (dest / "model.safetensors").read_bytes() == before
    export(src, dest, dtype="float16", overwrite=True)  # an earlier export is replaced
    assert json.loads((dest / "config.json").read_text())["dtype"] == "float16"
    assert sorted(os.listdir(tmp_path)) == ["out", "padded"]
    # never replaced: a folder that is no export, a training run, the source itself
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="does not look like an exported model"):
        export(src, other, overwrite=True)
    (other / "ckpt.safetensors").write_bytes(b"run")
    with pytest.raises(FileExistsError, match="training run"):
        export(src, other, overwrite=True)
    with pytest.raises(FileExistsError, match="would replace SRC"):
        export(src, src, overwrite=True)
    assert (other / "notes.txt").read_text() == "keep me" and (src / "model.safetensors").exists()


def test_export_command_prints_what_it_wrote(tmp_path, capsys):
    _, src = _padded_folder(tmp_path)
    assert main([str(src), str(tmp_path / "hf"), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "as bfloat16" in out and "cropped from 50304 to 50257" in out
    assert "GPT2LMHeadModel.from_pretrained" in out
