"""Where the tests find tiny Shakespeare: $GPT2NP_DATA (CI sets it), else the shared copy
beside the project (../shared/data). Tests that need it skip with this path in the reason
when it is absent; .ci/run makes its absence a failure in CI."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]  # the project's root


def shakespeare_path() -> Path:
    env = os.environ.get("GPT2NP_DATA")
    if env:
        return Path(env)
    return ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
