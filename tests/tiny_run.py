"""A tiny training run (1 layer, 16 dims, 8 steps on tiny Shakespeare, ~1 s) for the tests
of what a run's out-dir is used for: loading, sampling, exporting. Only the stable surface of
gpt2np.train.loop is used (TrainConfig, train)."""
from pathlib import Path

import pytest

from testdata import shakespeare_path


def train_tiny(out: Path, cache: Path, **kw) -> Path:
    from gpt2np.train.loop import TrainConfig, train

    data = shakespeare_path()
    if not data.is_file():
        pytest.skip(f"tiny Shakespeare not found at {data} (set GPT2NP_DATA)")
    base = dict(data=str(data), cache_dir=str(cache), out_dir=str(out), n_layer=1, n_head=2,
                n_embd=16, block_size=16, batch_size=4, max_steps=8, lr=1e-2, warmup_steps=2,
                eval_interval=4, eval_batches=1, num_samples=0, progress=False)
    base.update(kw)
    result = train(TrainConfig(**base))
    assert result.status == "done", result
    assert (out / "ckpt.safetensors").is_file()
    return out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    """The out-dir of one tiny run, shared by a test module (treat it as read-only)."""
    root = tmp_path_factory.mktemp("tiny_run")
    return train_tiny(root / "run", root / "cache")
