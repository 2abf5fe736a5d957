"""The tiny training run the tests share: a 1-layer, 16-dim model on 4x16 batches of tiny
Shakespeare for 8 steps (a step takes milliseconds). A test changes what it needs by keyword
(data_shards=DIR trains on token shards instead of tiny Shakespeare):

  tiny_config(out, cache, **kw)  the run as a TrainConfig (gpt2np.train.loop.train's input)
  tiny_flags(out, cache, **kw)   the same run as `gpt2np train` flags
  as_flags(cfg)                  any TrainConfig as `gpt2np train` flags
  train_tiny(out, cache, **kw)   train it (it must finish); returns out
  tiny_run                       a module-scoped fixture: one finished run's out-dir
"""
from pathlib import Path

import pytest

from gpt2np.train.loop import train
from gpt2np.train.settings import SETTINGS, TrainConfig
from testdata import shakespeare_path

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, batch_size=4, max_steps=8, lr=1e-2,
            warmup_steps=2, eval_interval=4, eval_batches=1, num_samples=0, progress=False)


def tiny_config(out=None, cache=None, **kw) -> TrainConfig:
    base = dict(TINY)
    if out is not None:
        base["out_dir"] = str(out)
    if cache is not None:
        base["cache_dir"] = str(cache)
    if "data" not in kw and kw.get("data_shards") is None:
        data = shakespeare_path()
        if not data.is_file():
            pytest.skip(f"tiny Shakespeare not found at {data} (set GPT2NP_DATA)")
        base["data"] = str(data)
    base.update(kw)
    return TrainConfig(**base)


def as_flags(cfg: TrainConfig) -> list[str]:
    """The command line of cfg: a flag for every setting that differs from an unset one."""
    args = []
    for s in SETTINGS:
        value = getattr(cfg, s.name)
        if value is None or (not s.stored and value == s.default):
            continue  # unset: the command line's default is the same
        if s.type is not bool:
            args += [s.flag, str(value)]
        elif value != s.default:  # a switch: --name, or --no-name for one on by default
            args.append(s.flag if value else "--no-" + s.flag[2:])
    return args


def tiny_flags(out=None, cache=None, **kw) -> list[str]:
    return as_flags(tiny_config(out, cache, **kw))


def train_tiny(out: Path, cache: Path, **kw) -> Path:
    result = train(tiny_config(out, cache, **kw))
    assert result.status == "done", result
    assert (out / "ckpt.safetensors").is_file()
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The out-dir of one tiny run, shared by a test module (treat it as read-only)."""
    root = tmp_path_factory.mktemp("tiny_run")
    return train_tiny(root / "run", root / "cache")
