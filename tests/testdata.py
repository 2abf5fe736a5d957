"""Where the tests find tiny Shakespeare: $GPT2NP_DATA (.ci/run sets it), else gpt2np's cache
(where `gpt2np train` downloads it). Tests that need it skip, naming the path, when it is absent;
.ci/run makes its absence a failure."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the project's root


def shakespeare_path() -> Path:
    env = os.environ.get("GPT2NP_DATA")
    if env:
        return Path(env)
    from gpt2np.data.shakespeare import DATA_FILENAME
    from gpt2np.files import cache_dir

    return cache_dir() / DATA_FILENAME
