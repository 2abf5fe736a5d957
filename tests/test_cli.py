"""Bad command lines of `generate` and `export`: every one exits != 0 with a last stderr line
`error: ...` and no traceback (exit 2 for a bad flag, 1 for a bad input)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2np import GPT, GPTConfig, save_pretrained
from gpt2np.commands import export as export_cmd
from gpt2np.commands import generate as generate_cmd

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (root / "empty").mkdir()
    (root / "notes.txt").write_text("not a model")
    # a model of 40 tokens: GPT-2's BPE encodes prompts past its vocabulary
    save_pretrained(GPT(GPTConfig(block_size=8, vocab_size=40, n_layer=1, n_head=1, n_embd=4)),
                    root / "small")
    (root / "full").mkdir()
    (root / "full" / "keep.txt").write_text("x")
    return root


def _run(main, argv, capsys):
    try:
        code = main(argv)
    except SystemExit as e:  # argparse exits on a bad flag
        code = e.code
    err = capsys.readouterr().err
    return code, err


GENERATE_BAD_FLAGS = [
    ["--num-samples", "0"], ["--num-samples", "-2"], ["--num-samples", "x"],
    ["--max-new-tokens", "-1"], ["--top-k", "-1"], ["--top-k", "2.5"],
    ["--temperature", "-0.5"], ["--temperature", "nan"], ["--temperature", "inf"],
    ["--seed", "one"], ["--backend", "jax"], ["--dtype", "float16"], ["--bogus"],
]
EXPORT_BAD_FLAGS = [[], ["only-src"], ["a", "b", "--dtype", "float64"], ["a", "b", "--bogus"],
                    ["", "b"]]


@pytest.mark.parametrize("argv", GENERATE_BAD_FLAGS, ids=" ".join)
def test_generate_bad_flags(argv, capsys):
    code, err = _run(generate_cmd.main, argv, capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error:"), err


@pytest.mark.parametrize("argv", EXPORT_BAD_FLAGS, ids=lambda a: " ".join(a) or "nothing")
def test_export_bad_flags(argv, capsys):
    code, err = _run(export_cmd.main, argv, capsys)
    assert code == 2 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error:"), err


@pytest.mark.parametrize("case,names", [
    ("no model folder", ["--model", "{root}/empty"]),
    ("a text file", ["--model", "{root}/notes.txt"]),
    ("missing", ["--model", "{root}/nope/deeper"]),
    ("prompt past the vocabulary", ["--model", "{root}/small", "--prompt", "Hello world"]),
])
def test_generate_bad_inputs(paths, case, names, capsys):
    argv = [a.format(root=paths) for a in names] + ["--max-new-tokens", "1"]
    code, err = _run(generate_cmd.main, argv, capsys)
    assert code == 1 and "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error:"), err
    key = {"no model folder": "is no model", "a text file": "not a gpt2np training checkpoint",
           "missing": "no such folder", "prompt past the vocabulary": "vocab_size 40"}[case]
    assert key in last


@pytest.mark.parametrize("src,dest,key", [
    ("{root}/empty", "{root}/x1", "is no model"),
    ("{root}/small", "{root}/notes.txt", "is a file"),
    ("{root}/small", "{root}/full", "--overwrite"),
])
def test_export_bad_inputs(paths, src, dest, key, capsys):
    code, err = _run(export_cmd.main, [src.format(root=paths), dest.format(root=paths)], capsys)
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("error:") and key in err
    assert not (paths / "x1").exists() and (paths / "full" / "keep.txt").exists()


def test_through_the_gpt2np_command(paths):
    """The same through `python -m gpt2np` (the gpt2np console script) in a fresh process."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("GPT2NP_DEBUG", None)
    for argv, code in ((["generate", "--top-k", "-1"], 2),
                       (["export", str(paths / "empty"), str(paths / "x2")], 1)):
        p = subprocess.run([sys.executable, "-m", "gpt2np", *argv], capture_output=True,
                           text=True, env=env, cwd=ROOT, timeout=300)
        assert p.returncode == code and "Traceback" not in p.stderr, p.stderr
        assert p.stderr.strip().splitlines()[-1].startswith("error:"), p.stderr


def test_a_multi_line_library_message_becomes_one_readable_line(capsys, monkeypatch):
    from gpt2np import cli
    from gpt2np.data.shakespeare import DataNotFoundError, find_data

    monkeypatch.delenv("GPT2NP_DATA", raising=False)

    def impl(argv):
        find_data(None, cache=argv[0], allow_download=False, flag="--text")

    assert cli.run_main(impl, [str(Path("/nonexistent-cache"))]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: tiny Shakespeare not found")
    # the options keep their separation, and the command's own flag is named
    assert "ways: --text PATH a local copy of the text; GPT2NP_DATA=PATH" in err[0]
    with pytest.raises(DataNotFoundError, match="--text nope: no such file"):
        find_data("nope", flag="--text")
