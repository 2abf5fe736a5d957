"""`gpt2np eval`: HellaSwag and loss over a tiny saved model, 2 gloo ranks == one."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from gpt2np import GPT, GPTConfig, save_pretrained
from gpt2np.commands import eval as eval_cmd
from gpt2np.evals import loss as E
from gpt2np.evals import hellaswag as H
from gpt2np.data.shards import write_shard
from gpt2np.data.tokenizer import encode
from test_hellaswag import make_items, write_items

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = GPTConfig(block_size=16, vocab_size=50257, n_layer=2, n_head=2, n_embd=16)
TEXT = ("First Citizen: Before we proceed any further, hear me speak.\nAll: Speak, speak.\n"
        "First Citizen: You are all resolved rather to die than to famish?\n") * 3


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A float64 tiny GPT saved as a model folder, a text file, a shard folder, HellaSwag."""
    tmp = tmp_path_factory.mktemp("eval")
    model = GPT(CFG, dtype="float64", seed=7)
    save_pretrained(model, tmp / "model")
    (tmp / "text.txt").write_text(TEXT)
    rng = np.random.default_rng(0)
    os.makedirs(tmp / "shards")
    for i, n in enumerate((70, 90, 40)):  # two val shards (read in order) and a train shard
        name = f"tok_{'val' if i < 2 else 'train'}_{i:06d}.npy"
        write_shard(str(tmp / "shards" / name), rng.integers(0, 50257, n).astype(np.uint16))
    write_items(tmp / "hs.jsonl", make_items(7, seed=11))
    return tmp, model


def reference_loss(model, tokens, T):
    """Mean cross-entropy through the model's own training loss, window by window."""
    total, n = 0.0, 0
    for s in range(0, len(tokens) - 1, T):
        x = np.asarray(tokens[s:s + T + 1], dtype=np.int64)
        _, loss = model.forward(x[None, :-1], x[None, 1:])
        total += float(loss) * (len(x) - 1)
        n += len(x) - 1
    return total / n, n


def run_json(args, tmp, name):
    out = tmp / f"{name}.json"
    assert eval_cmd.main([*args, "--json", str(out), "--no-progress"]) == 0
    return json.loads(out.read_text())


def test_hellaswag_command_matches_the_library(saved, capsys):
    tmp, model = saved
    got = run_json(["--model", str(tmp / "model"), "--task", "hellaswag", "--data",
                    str(tmp / "hs.jsonl"), "--dtype", "float64"], tmp, "hs")
    ref = H.evaluate(model, tmp / "hs.jsonl", progress=False)
    assert got["task"] == "hellaswag" and got["n"] == 7
    assert (got["acc"], got["acc_norm"]) == (ref.acc, ref.acc_norm)
    assert f"acc_norm {ref.acc_norm:.4f} ({ref.correct_norm}/7)" in capsys.readouterr().out
    limited = run_json(["--model", str(tmp / "model"), "--task", "hellaswag", "--data",
                        str(tmp / "hs.jsonl"), "--limit", "3"], tmp, "hs3")
    assert limited["n"] == 3


@pytest.mark.parametrize("data", ["text.txt", "shards", "shards/tok_val_000000.npy"])
def test_loss_matches_the_training_loss(saved, data):
    tmp, model = saved
    got = run_json(["--model", str(tmp / "model"), "--task", "loss", "--data", str(tmp / data),
                    "--dtype", "float64"], tmp, "loss")
    if data == "text.txt":
        tokens = encode(TEXT)
    elif data == "shards":  # the val split: both val shards, in order, and no train shard
        tokens = np.concatenate([np.load(tmp / "shards" / f"tok_val_00000{i}.npy") for i in (0, 1)])
    else:
        tokens = np.load(tmp / data)
    loss, n = reference_loss(model, tokens, CFG.block_size)
    assert got["task"] == "loss" and got["n_tokens"] == n == len(tokens) - 1
    assert got["loss"] == pytest.approx(loss, rel=1e-10)
    assert got["ppl"] == pytest.approx(np.exp(loss), rel=1e-10)


def test_loss_limit_and_batching(saved):
    tmp, model = saved
    tokens = encode(TEXT)
    one = E.token_loss(model, tokens, limit=2, progress=False)
    assert one.n_tokens == 2 * CFG.block_size
    ref, _ = reference_loss(model, tokens[:2 * CFG.block_size + 1], CFG.block_size)
    assert one.loss == pytest.approx(ref, rel=1e-10)
    # a budget for one window per forward gives the same sum as all windows at once
    small = E.token_loss(model, tokens, progress=False, logits_budget=1)
    big = E.token_loss(model, tokens, progress=False, logits_budget=10 ** 10)
    assert small.n_tokens == big.n_tokens and small.loss == pytest.approx(big.loss, rel=1e-12)


def test_torch_backend_agrees(saved):
    tmp, _ = saved
    common = ["--model", str(tmp / "model"), "--dtype", "float64"]
    for task, data in (("hellaswag", "hs.jsonl"), ("loss", "text.txt")):
        args = [*common, "--task", task, "--data", str(tmp / data)]
        a = run_json(args, tmp, "np")
        b = run_json([*args, "--backend", "torch", "--device", "cpu"], tmp, "torch")
        for key, value in a.items():
            want = pytest.approx(value, rel=1e-10) if isinstance(value, float) else value
            assert b[key] == want


@pytest.mark.parametrize("args, code, message", [
    (["--task", "loss"], 2, "--task loss needs --data"),
    (["--task", "hellaswag", "--limit", "0"], 2, "expected an integer > 0"),
    (["--task", "loss", "--data", "nowhere.txt"], 1, "no such file or shard folder"),
    (["--task", "hellaswag", "--device", "cpu"], 2, "--device is for --backend torch"),
])
def test_bad_command_lines_end_in_one_error_line(saved, capsys, args, code, message):
    tmp, _ = saved
    try:
        got = eval_cmd.main(["--model", str(tmp / "model"), *args])
    except SystemExit as e:  # argparse rejects a bad flag value itself
        got = e.code
    assert got == code
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1]


def test_missing_model_is_one_error_line(tmp_path, capsys):
    assert eval_cmd.main(["--model", str(tmp_path / "nothing"), "--task", "hellaswag"]) == 1
    assert capsys.readouterr().err.startswith("error: ")


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_ranks_equal_one_process(saved):
    """torchrun's environment on loopback: rank r scores items (windows) i % 2 == r, the
    counts are summed, rank 0 alone writes the JSON; the result is the one process's."""
    tmp, _ = saved
    for task, data in (("hellaswag", "hs.jsonl"), ("loss", "text.txt")):
        args = ["--model", str(tmp / "model"), "--task", task, "--data", str(tmp / data),
                "--dtype", "float64"]
        one = run_json(args, tmp, f"one_{task}")
        out = tmp / f"two_{task}.json"
        port = _free_port()
        procs = []
        for r in range(2):
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(r),
                       WORLD_SIZE="2", LOCAL_RANK=str(r), LOCAL_WORLD_SIZE="2",
                       GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "gpt2np", "eval", *args, "--json", str(out), "--no-progress"],
                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=240)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        assert outs[0].count(": ") >= 1 and "acc" not in outs[1] and "loss:" not in outs[1]
        two = json.loads(out.read_text())
        for key, value in one.items():
            assert two[key] == (pytest.approx(value, rel=1e-12) if isinstance(value, float)
                                else value), key


def test_text_is_read_as_training_reads_it(tmp_path):
    """CRLF kept (tokens equal gpt2np.data.shakespeare.load_tokens'), a binary file refused by name."""
    from gpt2np.data.shakespeare import load_tokens

    crlf = tmp_path / "crlf.txt"
    crlf.write_bytes(TEXT.replace("\n", "\r\n").encode())
    ids = E.load_eval_tokens(crlf)
    assert np.array_equal(ids, load_tokens(crlf, cache=tmp_path / "cache"))
    assert not np.array_equal(ids, E.load_eval_tokens(_write(tmp_path / "lf.txt", TEXT)))
    binary = tmp_path / "b.txt"
    binary.write_bytes(b"abc\0def")
    with pytest.raises(ValueError, match="b.txt looks like a binary file"):
        E.load_eval_tokens(binary)


def _write(path, text):
    path.write_bytes(text.encode())
    return path
