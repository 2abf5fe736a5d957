"""A newcomer's first hour: the install the README gives, the main job without torch, hub
names that fail at once and say what to do offline, and the small things a user notices
(--version, defaults in --help, prepare's messages, one cache for every download, a test
suite that never replays an old failure)."""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpt2np import GPT, GPTConfig, save_pretrained
from testdata import shakespeare_path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
# the packages that only the tests (and --backend torch, and prepare --dataset) use
TEST_ONLY = ("torch", "transformers", "datasets", "hypothesis", "pytest")


def _run(code: str, *, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", **(env or {})}
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)


# ------------------------------------------------------------------------ the install


def test_the_package_itself_needs_no_torch():
    deps = re.search(r"^dependencies = \[(.*?)^\]", (ROOT / "pyproject.toml").read_text(),
                     re.M | re.S).group(1)
    names = re.findall(r'^\s*"([A-Za-z0-9_.-]+)', deps, re.M)
    assert names and not set(names) & set(TEST_ONLY), names


def test_the_readme_installs_the_cpu_torch_before_the_test_extra():
    quick = README.read_text().split("## Quick start", 1)[1].split("\n## ", 1)[0]
    install = re.search(r"```bash\n(.*?)\n", quick).group(1)
    torch_cmd, extra = [c.strip() for c in install.split("&&")]
    assert torch_cmd == "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    assert extra == 'pip install -e ".[test]"'
    assert "pip install -e .`" in quick and "no torch" in quick  # what the package alone gives


BLOCKER = """
import importlib.abc, sys
TRIED = []
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked}:
            TRIED.append(name)
            raise ImportError(f"{{name}} is not installed (blocked by the test)")
sys.meta_path.insert(0, Block())
"""


def test_train_generate_eval_export_run_without_torch(tmp_path):
    """The main job on an install without torch (or transformers, datasets): every import
    of them fails, and none is even tried."""
    data = shakespeare_path()
    if not data.is_file():
        pytest.skip(f"tiny Shakespeare not at {data} (set GPT2NP_DATA)")
    code = BLOCKER.format(blocked=set(TEST_ONLY)) + f"""
from gpt2np.cli import main
steps = [
    ["train", "--data", {str(data)!r}, "--cache-dir", "cache", "--n-layer", "1", "--n-head", "2",
     "--n-embd", "16", "--block-size", "16", "--batch-size", "2", "--max-steps", "2",
     "--eval-batches", "1", "--num-samples", "1", "--sample-tokens", "4", "--no-progress"],
    ["generate", "--model", "out/shakespeare", "--prompt", "ROMEO:", "--max-new-tokens", "3",
     "--num-samples", "1"],
    ["eval", "--model", "out/shakespeare", "--task", "loss", "--data", {str(data)!r},
     "--limit", "2", "--no-progress"],
    ["export", "out/shakespeare", "out/hf"],
]
for argv in steps:
    assert main(argv) == 0, argv
print("TRIED", TRIED)
"""
    done = _run(code, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "TRIED []" in done.stdout, done.stdout[-2000:]
    assert (tmp_path / "out" / "hf" / "model.safetensors").is_file()


def test_the_blocker_blocks(tmp_path):
    done = _run(BLOCKER.format(blocked={"json"}) + "\nimport json\n", cwd=tmp_path)
    assert done.returncode != 0 and "blocked by the test" in done.stderr


# ------------------------------------------------------------------------ hub names


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens there once the socket is closed


# time.sleep raises: a retry or a backoff of huggingface_hub would end the run with "slept"
NO_SLEEP = """
import time
def _sleep(seconds):
    raise SystemExit(f"slept {{seconds}}s: a retry")
time.sleep = _sleep
from gpt2np.cli import main
raise SystemExit(main({argv!r}))
"""


@pytest.mark.parametrize("argv", [["generate"], ["generate", "--model", "gpt2"],
                                  ["gradcheck", "--model", "gpt2"],
                                  ["export", "gpt2-medium", "out/x"],
                                  ["eval", "--model", "openai-community/gpt2", "--task", "loss",
                                   "--data", "x.txt"]], ids=" ".join)
@pytest.mark.parametrize("network", ["HF_HUB_OFFLINE", "unreachable"])
def test_a_hub_name_offline_is_one_line_at_once(argv, network, tmp_path):
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": ""}
    if network == "HF_HUB_OFFLINE":
        env["HF_HUB_OFFLINE"] = "1"
    else:  # the hub's address answers nothing: the connection is refused at once
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    done = _run(NO_SLEEP.format(argv=argv), cwd=tmp_path, env=env, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    line = lines[0]
    assert line.startswith("error: 'openai-community/gpt2") and "not in the Hugging Face cache" in line
    assert "out/shakespeare" in line and "HF_HUB_CACHE" in line  # what to do instead
    if network == "HF_HUB_OFFLINE":
        assert "offline: HF_HUB_OFFLINE is set" in line and "set 'local_files_only'" not in line
    else:
        assert "cannot be reached" in line and "HF_HUB_OFFLINE=1" in line


def _hub_cache(hub_cache: Path, repo_id: str, src: Path):
    """src's files laid out as huggingface_hub's cache (snapshot of one commit, refs/main)."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in src.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())


def test_an_unreachable_hub_falls_back_to_the_cache(tmp_path):
    model = GPT(GPTConfig(block_size=8, vocab_size=50, n_layer=1, n_head=2, n_embd=8), seed=1)
    save_pretrained(model, tmp_path / "src")
    _hub_cache(tmp_path / "hf" / "hub", "someone/tiny", tmp_path / "src")
    code = NO_SLEEP.split("from gpt2np.cli")[0].format() + """
import numpy as np, gpt2np
logits, _ = gpt2np.from_pretrained("someone/tiny").forward(np.arange(8)[None])
np.save("logits.npy", logits)
"""
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "",
           "HF_ENDPOINT": f"http://127.0.0.1:{_closed_port()}"}
    done = _run(code, cwd=tmp_path, env=env, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    np.testing.assert_array_equal(np.load(tmp_path / "logits.npy"), model.forward(np.arange(8)[None])[0])


@pytest.mark.parametrize("name", ["out/nothing", "./nothing", "~/nothing-here", "a/b/c",
                                  "out/nothing/", "run/ckpt.safetensors", "/abs/model"])
def test_a_path_is_never_sent_to_the_hub(name, tmp_path, monkeypatch):
    import huggingface_hub

    import gpt2np

    def no_hub(*args, **kwargs):
        raise AssertionError(f"asked the hub about {name!r}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()  # a run folder's parent: "out/nothing" is a mistyped run
    with pytest.raises(OSError, match="no such folder"):
        gpt2np.from_pretrained(name)


def test_what_looks_like_a_path(tmp_path, monkeypatch):
    from gpt2np.io.pretrained import looks_like_path

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    assert all(map(looks_like_path, ["out/x", "./x", "../x", "~/x", "/x", "a/b/c", "a\\b", "a/",
                                     "x.safetensors", "a/config.json"]))
    assert not any(map(looks_like_path, ["gpt2", "openai-community/gpt2", "someone/model-v1.5"]))


# ------------------------------------------------------------------------ the command line


def test_version(capsys):
    from importlib import metadata

    from gpt2np import cli

    assert cli.main(["--version"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"gpt2np {metadata.version('gpt2np')} (numpy {np.__version__}")
    assert cli.main(["-V"]) == 0 and capsys.readouterr().out == out


def _parsers():
    import importlib

    from gpt2np.cli import COMMANDS

    return {name: importlib.import_module(module).build_parser()
            for name, (module, _) in COMMANDS.items()}


@pytest.mark.parametrize("name", list(_parsers()))
def test_help_shows_every_default_and_the_command_name(name):
    import argparse

    parser = _parsers()[name]
    text = parser.format_help()
    assert text.startswith(f"usage: gpt2np {name} ")
    for action in parser._actions:
        if action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
            continue  # no default, or a switch (given or not)
        assert action.help and "default" in action.help, \
            f"gpt2np {name} {action.option_strings[-1]}: its help shows no default ({action.default!r})"


def test_prepare_refusal_speaks_in_flags_and_its_bar_in_si_units(tmp_path, capsys):
    from gpt2np.commands import prepare as prepare_cmd

    text = tmp_path / "a.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 4000)  # ~40k tokens
    argv = ["--input", str(text), "--out-dir", str(tmp_path / "shards"), "--shard-size", "20000",
            "--workers", "1"]
    assert prepare_cmd.main(argv) == 0
    bar = capsys.readouterr().err
    assert " tokens/s" in bar and "k/20.0k" in bar, bar
    assert not re.search(r"\d{6,}", bar.replace(str(tmp_path), "")), bar  # no 353597291.13
    assert prepare_cmd.main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "pass --overwrite" in err and "overwrite=True" not in err, err


# ------------------------------------------------------------------------ one cache


def _valid_hellaswag(path: Path):
    from gpt2np.evals import hellaswag

    path.parent.mkdir(parents=True, exist_ok=True)
    item = {"ctx": "A man", "endings": ["a", "b", "c", "d"], "label": 0}
    path.write_text(json.dumps(item) + "\n")
    return hellaswag.parse_items(path.read_text().splitlines()) and path


def _recipe():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_gpt2", ROOT / "examples" / "train_gpt2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hellaswag_lives_in_the_one_cache(tmp_path, monkeypatch):
    from gpt2np.evals import hellaswag

    def offline(target):
        raise OSError("no network")

    monkeypatch.setattr(hellaswag, "_download", offline)
    env_cache, flag_cache = tmp_path / "env", tmp_path / "flag"
    monkeypatch.setenv("GPT2NP_CACHE", str(env_cache))
    in_env = _valid_hellaswag(env_cache / "hellaswag" / "hellaswag_val.jsonl")
    in_flag = _valid_hellaswag(flag_cache / "hellaswag" / "hellaswag_val.jsonl")
    assert hellaswag.find_hellaswag() == in_env  # $GPT2NP_CACHE, as tiny Shakespeare's
    recipe = _recipe()
    argv = recipe.recipe_argv(["--data-shards", "d"])
    assert argv[argv.index("--hellaswag") + 1] == str(in_env)
    argv = recipe.recipe_argv(["--data-shards", "d", "--cache-dir", str(flag_cache)])
    assert argv[argv.index("--hellaswag") + 1] == str(in_flag)  # --cache-dir wins
    assert "--hellaswag" not in recipe.recipe_argv(["--data-shards", "d", "--no-hellaswag"])


def test_the_recipe_offline_names_its_own_flags(tmp_path, monkeypatch, capsys):
    from gpt2np.evals import hellaswag

    def offline(target):
        raise OSError("no network")

    monkeypatch.setattr(hellaswag, "_download", offline)
    monkeypatch.setenv("GPT2NP_CACHE", str(tmp_path / "empty"))
    assert _recipe().main(["--data-shards", str(tmp_path), "--max-steps", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--hellaswag PATH" in err and "--no-hellaswag" in err and "--data " not in err, err


# ------------------------------------------------------------------------ the test suite


def test_no_profile_replays_an_old_failure():
    from hypothesis import settings

    for profile in ("ci", "dev"):
        assert settings.get_profile(profile).database is None, profile


def _block_case():
    """The block and input on which a fixed 1e-6 relative finite-difference tolerance failed
    (B=2, T=4, n_head=1, hs=3, seed 6250548, as tests/test_layers.py::test_block draws it):
    one LayerNorm row is nearly constant (std 0.012), so the loss is sharply curved there."""
    from gpt2np.layers import REFERENCE_OPS as ops
    from gpt2np.model import block_backward, block_forward

    B, T, n_head, hs, seed = 2, 4, 1, 3, 6250548
    rng = np.random.default_rng(seed)
    C = n_head * hs
    shapes = {"ln_1.weight": (C,), "ln_1.bias": (C,), "attn.c_attn.weight": (C, 3 * C),
              "attn.c_attn.bias": (3 * C,), "attn.c_proj.weight": (C, C), "attn.c_proj.bias": (C,),
              "ln_2.weight": (C,), "ln_2.bias": (C,), "mlp.c_fc.weight": (C, 4 * C),
              "mlp.c_fc.bias": (4 * C,), "mlp.c_proj.weight": (4 * C, C), "mlp.c_proj.bias": (C,)}
    p = {k: rng.standard_normal(s) * (0.5 if k.endswith("weight") else 0.1) for k, s in shapes.items()}
    x = rng.standard_normal((B, T, C))
    out, cache = block_forward(ops, x, p, n_head)
    dout = rng.standard_normal(out.shape)
    dx, _ = block_backward(ops, dout, cache)
    return (lambda xx: block_forward(ops, xx, p, n_head)[0]), x, dout, dx


def test_finite_differences_pass_a_sharply_curved_correct_gradient_and_fail_a_wrong_one():
    from gradcheck import assert_fd_close, finite_diff, rel_error

    f, x, dout, dx = _block_case()
    est, _ = finite_diff(f, x, dout)
    assert rel_error(dx, est) > 1e-6  # what a fixed tolerance of 1e-6 could not accept
    assert assert_fd_close(f, x, dout, dx, name="block dx") <= 1 / 3 + 1e-3  # truncation: 1/3
    # any entry off by 1e-5 of the largest gradient fails, even in the curved row (whose
    # truncation allowance is ~3e-6 of it); elsewhere the allowance is ~3e-8: 1e-7 fails
    for i, off in [(i, 1e-5) for i in range(dx.size)] + [(21, 1e-7)]:
        wrong = dx.copy()
        wrong.reshape(-1)[i] += off * np.abs(dx).max()
        with pytest.raises(AssertionError, match="block dx vs finite differences"):
            assert_fd_close(f, x, dout, wrong, name="block dx")


def test_finite_differences_where_the_output_is_a_cancellation():
    """GELU's far tail and a confident cross-entropy: outputs far smaller than the terms
    they are computed from, whose rounding the tolerance's scale includes."""
    from gpt2np import layers as L
    from gradcheck import assert_fd_close

    x = np.array([-30.0, -8.0, -5.0, -4.5, 0.3, 2.0])
    dout = np.linspace(-1.0, 1.0, x.size)
    out, cache = L.gelu_forward(x)
    assert assert_fd_close(lambda v: L.gelu_forward(v)[0], x, dout, L.gelu_backward(dout, cache)) <= 1
    logits = np.array([[[2.31305953, -9.12210062]]])  # the target's p is 1 - 1e-5
    targets = np.array([[0]])
    loss, cache = L.cross_entropy_forward(logits, targets)
    grad = L.cross_entropy_backward(0.18905338, cache)
    assert assert_fd_close(lambda v: np.asarray(L.cross_entropy_forward(v, targets)[0]), logits,
                           np.array(0.18905338), grad) <= 1
