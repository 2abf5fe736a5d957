"""examples/train_gpt2.py (the 124M recipe) and HellaSwag during training, on tiny shapes.

The dry run trains a 2-layer model on random token shards for 4 steps, scoring HellaSwag
items the test writes at both evals; the last logged acc_norm must be what `gpt2np eval`
says of the run's final checkpoint.
"""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from gpt2np.commands import eval as eval_cmd
from gpt2np.evals import references as R
from gpt2np.config import GPTConfig
from gpt2np.train.outputs import LOSS_PANEL, Panel, plot
from gpt2np.data.shards import write_shard
from test_hellaswag import make_items, write_items
from tiny_run import tiny_flags

ROOT = Path(__file__).resolve().parents[1]


def load_script():
    spec = importlib.util.spec_from_file_location("train_gpt2", ROOT / "examples" / "train_gpt2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return load_script()


def make_shards(folder, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir()
    for i, n in enumerate((1000, 1500, 1500)):
        split = "val" if i == 0 else "train"
        write_shard(str(folder / f"tok_{split}_{i:06d}.npy"),
                    rng.integers(0, 50257, n).astype(np.uint16))
    return folder


def test_cpu_dry_run_logs_hellaswag_equal_to_a_standalone_eval(script, tmp_path):
    data = make_shards(tmp_path / "shards")
    hs = write_items(tmp_path / "hs.jsonl", make_items(12, seed=3))
    out = tmp_path / "run"
    # the shared tiny run, 2 layers on 2 x 32 tokens; the recipe fills in the rest
    assert script.main(tiny_flags(out, data_shards=str(data), hellaswag=str(hs), n_layer=2,
                                  n_embd=32, block_size=32, batch_size=2, total_batch_size=128,
                                  max_steps=4, eval_interval=2, eval_batches=2,
                                  warmup_steps=1, backend="numpy")) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [1, 3]  # after steps 2 and 4
    assert all(0 <= r["hellaswag_acc_norm"] <= 1 and 0 <= r["hellaswag_acc"] <= 1 for r in evals)
    assert not any("hellaswag_acc_norm" in r for r in records if "val_loss" not in r)
    # the recipe's defaults went through where the test set nothing: a padded vocabulary
    from gpt2np import from_pretrained

    assert from_pretrained(out).config.vocab_size == 50304
    got = eval_cmd.main(["--model", str(out), "--task", "hellaswag", "--data", str(hs), "--json",
                  str(tmp_path / "hs.json"), "--no-progress"])
    assert got == 0
    standalone = json.loads((tmp_path / "hs.json").read_text())
    assert standalone["n"] == 12
    assert standalone["acc_norm"] == evals[-1]["hellaswag_acc_norm"]
    assert standalone["acc"] == evals[-1]["hellaswag_acc"]
    assert (out / "loss.png").stat().st_size > 0


def test_recipe_defaults_fill_only_what_is_unset(script, tmp_path, monkeypatch):
    monkeypatch.setattr(script, "has_gpu", lambda: False)
    data = str(make_shards(tmp_path / "shards"))

    def flags(argv):
        args = script.recipe_argv(argv)
        return {k: v for k, v in zip(args, args[1:]) if k.startswith("--")}

    got = flags(["--data-shards", data, "--no-hellaswag"])
    want = {"--n-layer": "12", "--n-head": "12", "--n-embd": "768", "--vocab-size": "50304",
            "--block-size": "1024", "--batch-size": "64", "--total-batch-size": "524288",
            "--lr": "0.0006", "--min-lr": "6e-05", "--warmup-steps": "715",
            "--max-steps": "19073", "--weight-decay": "0.1", "--grad-clip": "1.0",
            "--eval-interval": "250", "--eval-batches": "20", "--save-interval": "5000",
            "--backend": "numpy", "--precision": "fp32", "--out-dir": "out/gpt2-124m"}
    assert {k: got.get(k) for k in want} == want
    assert "--hellaswag" not in got
    # the user's flags win; a GPU means cupy with bf16 matmuls
    monkeypatch.setattr(script, "has_gpu", lambda: True)
    got = flags(["--data-shards", data, "--no-hellaswag", "--batch-size", "16", "--out-dir", "x"])
    assert (got["--batch-size"], got["--out-dir"], got["--backend"], got["--precision"]) == \
        ("16", "x", "cupy", "bf16")
    assert script.recipe_argv(["--data-shards", data, "--no-hellaswag", "--batch-size", "16",
                               "--out-dir", "x"]).count("--batch-size") == 1
    got = flags(["--data-shards", data, "--no-hellaswag", "--backend", "numpy"])
    assert got["--backend"] == "numpy" and "--precision" not in got
    # a resumed run keeps its checkpoint's settings: the recipe adds none of them
    got = flags(["--no-hellaswag", "--resume"])  # (the checkpoint knows its shard folder)
    assert not set(got) & {"--n-layer", "--lr", "--batch-size", "--backend", "--max-steps"}
    # the HellaSwag file: found in the cache when not given
    cache = tmp_path / "gpt2np" / "hellaswag"
    cache.mkdir(parents=True)
    write_items(cache / "hellaswag_val.jsonl", make_items(2))
    monkeypatch.setenv("GPT2NP_CACHE", str(tmp_path / "gpt2np"))
    assert flags(["--data-shards", data])["--hellaswag"] == \
        str(tmp_path / "gpt2np" / "hellaswag" / "hellaswag_val.jsonl")


def test_help_shows_the_recipe_defaults(script):
    text = " ".join(script.build_parser(dict(backend="cupy", precision="bf16")).format_help().split())
    for shown in ("--n-layer N transformer blocks (default 12)",
                  "--min-lr MIN_LR final learning rate of the cosine (default 6e-05)",
                  "--backend {numpy,cupy,torch} engine (default cupy)",
                  "--out-dir DIR log, plot, checkpoint and samples (default out/gpt2-124m)",
                  "--seed N init and data seed (default 0)"):  # not the recipe's: gpt2np train's
        assert shown in text
    assert script.build_parser().parse_args([]).out_dir == "out/gpt2-124m"


def test_data_shards_is_required_and_the_error_shows_the_prepare_command(script, capsys):
    with pytest.raises(SystemExit) as e:
        script.main(["--no-hellaswag"])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith("error: --data-shards is required")
    assert "gpt2np prepare --dataset HuggingFaceFW/fineweb-edu" in last


def test_reference_lines_for_gpt2_sized_runs_on_fineweb_edu(tmp_path):
    assert R.is_gpt2_124m(GPTConfig(vocab_size=50304))
    assert not R.is_gpt2_124m(GPTConfig(n_layer=2))
    plain = make_shards(tmp_path / "corpus")
    assert not R.is_fineweb_edu(str(plain)) and not R.is_fineweb_edu(None)
    assert R.is_fineweb_edu(str(make_shards(tmp_path / "edu_fineweb10B")))
    (plain / "meta.json").write_text(json.dumps({"source": {"dataset": "HuggingFaceFW/fineweb-edu"},
                                                 "shards": []}))
    assert R.is_fineweb_edu(str(plain))


def test_overlay_panels_draw_on_the_loss_panel(tmp_path):
    seen = {}

    def spy(ax, records):
        seen["ylabel"] = ax.get_ylabel()
        R.LossReference().draw(ax, records)
        seen["lines"] = [tuple(line.get_ydata()) for line in ax.get_lines()]

    records = [{"step": i, "train_loss": 5.0 - i, "lr": 1e-3, "val_loss": 5.5 - i}
               for i in range(3)]
    hs_panel = Panel(("hellaswag_acc_norm",), lambda ax, recs: seen.setdefault("hs", True))
    plot(records, tmp_path / "loss.png", [LOSS_PANEL, Panel(("val_loss",), spy, overlay=True),
                                          hs_panel])
    assert seen["ylabel"] == "cross-entropy loss" and "hs" not in seen  # no HellaSwag data yet
    assert (3.2924, 3.2924) in seen["lines"]
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_training_evaluators_follow_the_run(tmp_path):
    from types import SimpleNamespace

    edu = str(make_shards(tmp_path / "edu_fineweb10B"))
    hs = str(write_items(tmp_path / "hs.jsonl", make_items(2)))
    cfg = SimpleNamespace(hellaswag=None, data_shards=None, device="cpu")
    run = dict(block_size=64, data_shards=edu, backend="numpy", vocab_size=50304)
    big = SimpleNamespace(n_layer=12, n_head=12, n_embd=768, **run)
    small = SimpleNamespace(n_layer=2, n_head=2, n_embd=32, **run)
    # a resumed GPT-2-sized run on FineWeb-Edu (the folder from its settings): the loss line
    assert [type(e).__name__ for e in R.training_evaluators(cfg, big, None)] == ["LossReference"]
    assert R.training_evaluators(cfg, small, None) == []
    cfg.hellaswag = hs
    evs = R.training_evaluators(cfg, small, None)
    assert [type(e).__name__ for e in evs] == ["HellaSwagEvaluator"] and not evs[0].references
    assert R.training_evaluators(cfg, big, None)[0].references
