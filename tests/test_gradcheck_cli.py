"""`gpt2np gradcheck`: passes on a correct model, lists every tensor, fails naming the tensors
whose backward a test perturbs, and says clearly what is wrong with bad input."""
import json

import numpy as np
import pytest

from gpt2np import GPT, GPTConfig, cli, save_pretrained
from gpt2np.commands import gradcheck as gradcheck_cmd
from gpt2np.evals import gradcheck as G
from gpt2np import layers as L

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n") * 3


CFG = GPTConfig(block_size=16, vocab_size=50257, n_layer=2, n_head=2, n_embd=16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # GPT-2's vocabulary (real text's token ids), everything else tiny
    folder = tmp_path_factory.mktemp("model")
    save_pretrained(GPT(CFG, dtype="float64", seed=3), folder)
    return folder


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "t.txt"
    path.write_text(TEXT)
    return path


def run(model_dir, text_file, tmp_path, *extra):
    out = tmp_path / "gc.json"
    code = gradcheck_cmd.main(["--model", str(model_dir), "--text", str(text_file), "-B", "2", "-T", "8",
                   "--fd", "2", "--json", str(out), *extra])
    return code, (json.loads(out.read_text()) if out.exists() else None)


def test_passes_and_lists_every_tensor(model_dir, text_file, tmp_path, capsys):
    code, report = run(model_dir, text_file, tmp_path)
    printed = capsys.readouterr().out
    names = list(GPT(CFG).params)
    assert code == 0
    assert list(report["tensors"]) == names and list(report["fd"]) == names
    assert all(name in printed for name in names)
    assert report["worst_rel_err"] <= 1e-9
    assert all(report["fd"][k] <= report["fd_tol"][k] for k in names)
    assert report["worst_fd_ratio"] <= 1 and report["worst_fd_err"] == max(report["fd"].values())
    assert report["worst_rel_err"] == max(report["tensors"].values())
    assert report["failures"] == [] and "gradients OK" in printed
    assert abs(report["loss"] - report["torch_loss"]) < 1e-12


def test_fails_naming_the_tensors_whose_backward_is_wrong(model_dir, text_file, tmp_path,
                                                          capsys, monkeypatch):
    real = L.layernorm_backward

    def off_by_a_millionth(dout, cache):  # the LayerNorm gain's gradient, slightly wrong
        dx, dweight, dbias = real(dout, cache)
        return dx, dweight * (1 + 1e-6), dbias

    monkeypatch.setattr(L.REFERENCE_OPS, "layernorm_backward", off_by_a_millionth)
    code, report = run(model_dir, text_file, tmp_path)
    err = capsys.readouterr().err
    gains = ["transformer.h.0.ln_1.weight", "transformer.h.0.ln_2.weight",
             "transformer.h.1.ln_1.weight", "transformer.h.1.ln_2.weight",
             "transformer.ln_f.weight"]
    assert code == 1
    assert report["failures"] == gains  # exactly the perturbed tensors, nothing upstream
    assert all(name in err for name in gains)
    assert all(1e-7 < report["tensors"][g] < 1e-5 for g in gains)
    assert all(report["fd"][g] > 1e-7 for g in gains)  # the finite differences see it too
    assert all(report["fd"][k] <= report["fd_tol"][k] for k in report["fd"] if k not in gains)


@pytest.mark.parametrize("off_by", [1e-2, 1e-5])
def test_finite_differences_alone_catch_a_wrong_gradient(model_dir, text_file, off_by):
    # the torch comparison is not the only judge: a gradient off by 1e-5 relative fails the
    # fd check, and every correct one passes it
    m = GPT(CFG, dtype="float64", seed=3)
    x, y = G.batch_from_text(text_file, 1, 8)
    m.forward(x, y)
    grads = {k: np.array(g) for k, g in m.backward().items()}
    wrong = "transformer.h.1.mlp.c_fc.weight"
    grads[wrong] *= 1 + off_by
    errors, tolerances = G.finite_differences(m, x, y, grads, k=3)
    assert errors[wrong] > tolerances[wrong]
    assert all(errors[k] <= tolerances[k] for k in errors if k != wrong)


def test_fd_tolerance_adds_the_rounding_to_the_measured_truncation():
    # a quadratic has no truncation error: D(h) = D(2h) up to rounding
    estimate, truncation = G.central_difference(lambda v: 3.0 * v * v + v, 0.25)
    assert abs(estimate - 2.5) < 1e-9 and truncation < 1e-9
    # a cubic: D(h) = f' + h^2 f'''/6 exactly, and the allowance is three times that
    estimate, truncation = G.central_difference(lambda v: v ** 3, 0.5, h=1e-2)
    assert np.isclose(estimate - 0.75, 1e-4) and np.isclose(truncation, 3e-4)
    assert G.fd_tolerance(3e-4, 10.0, h=1e-2) == 3e-4 + G.FD_ROUNDING * G.EPS * 10.0 / 1e-2
    assert G.fd_ratio(0.0, 0.0) == 0 and G.fd_ratio(1.0, 0.0) == np.inf
    assert G.fd_ratio(float("nan"), 1.0) == np.inf and G.fd_ratio(1.0, 4.0) == 0.25


def test_shards_and_the_console_script(model_dir, tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    ids = np.random.default_rng(0).integers(0, 50257, 200).astype(np.uint16)
    np.save(shards / "tok_val_000000.npy", ids)
    code = cli.main(["gradcheck", "--model", str(model_dir), "--data-shards", str(shards),
                     "-T", "4", "--fd", "0"])
    out = capsys.readouterr().out
    assert code == 0 and "gradients OK" in out
    x, y = G.batch_from_shards(shards, 2, 4)
    assert np.array_equal(x.reshape(-1), ids[:8]) and np.array_equal(y.reshape(-1), ids[1:9])


@pytest.mark.parametrize("extra, status, message", [
    (["-T", "17"], 2, "longer than the model's block size 16"),
    (["-B", "0"], 2, "expected an integer > 0"),
    (["-B", "40", "-T", "16"], 1, "fewer than B*T+1"),
    (["--data-shards", "x"], 2, "not allowed with argument"),
])
def test_bad_input_is_one_clear_line(model_dir, text_file, extra, status, message, capsys):
    try:
        code = gradcheck_cmd.main(["--model", str(model_dir), "--text", str(text_file), "--fd", "0", *extra])
    except SystemExit as e:  # argparse's own exit for a bad flag
        code = e.code
    assert code == status
    err = capsys.readouterr().err
    assert message in err and err.strip().splitlines()[-1].startswith("error:")


def test_a_vocabulary_that_cannot_read_gpt2_tokens(text_file, tmp_path, capsys):
    small = tmp_path / "small"
    save_pretrained(GPT(CFG.replace(vocab_size=300)), small)
    assert gradcheck_cmd.main(["--model", str(small), "--text", str(text_file), "--fd", "0"]) == 1
    assert "does not read GPT-2 tokens" in capsys.readouterr().err



def test_a_training_run_is_a_model_too(text_file, tmp_path, capsys):
    from gpt2np.commands.train import main as train_main
    from testdata import shakespeare_path

    if not shakespeare_path().is_file():
        pytest.skip(f"tiny Shakespeare not at {shakespeare_path()} (set GPT2NP_DATA)")
    run = tmp_path / "run"
    assert train_main(["--data", str(shakespeare_path()), "--cache-dir", str(tmp_path / "c"),
                       "--out-dir", str(run), "--n-layer", "1", "--n-head", "2", "--n-embd", "8",
                       "--block-size", "8", "--batch-size", "2", "--max-steps", "2",
                       "--eval-batches", "1", "--num-samples", "0", "--no-progress"]) == 0
    capsys.readouterr()
    assert gradcheck_cmd.main(["--model", str(run), "--text", str(text_file), "--fd", "1"]) == 0
    out = capsys.readouterr().out
    assert "batch B=1 T=8" in out and "gradients OK" in out  # T: the run's block size


def test_the_batch_is_the_texts_first_tokens_and_binary_is_refused(tmp_path):
    from gpt2np.data.tokenizer import encode

    long_text = tmp_path / "long.txt"
    long_text.write_bytes((TEXT * 200 + "é\n").encode())  # longer than the prefix first read
    x, y = G.batch_from_text(long_text, 2, 8)
    ids = encode(TEXT * 200 + "é\n")[:17]
    assert x.ravel().tolist() == ids[:16] and y.ravel().tolist() == ids[1:17]
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"\0" * 50)
    with pytest.raises(ValueError, match="looks like a binary file"):
        G.batch_from_text(binary, 1, 4)
