"""gpt2np prepare: nothing written through a planted link, one prepare per folder, its own
outputs never taken as inputs, a dead worker an error (never a hang), SIGTERM a clean stop,
--doc-sep split in linear time."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpt2np import files
from gpt2np.commands.prepare import main
from gpt2np.data import prepare as P
from gpt2np.data.prepare import prepare

ROOT = Path(__file__).resolve().parents[1]

# tokenizers for worker processes, importable by them (tok_helpers.py in a test's folder)
HELPERS = '''
import os, signal, time


class Enc:
    name, eot_token = "test", 0

    def __init__(self, mode):
        self.mode = mode

    def encode_ordinary(self, text):
        if self.mode == "die" and text == "die":
            os.kill(os.getpid(), signal.SIGKILL)  # as the OOM killer would
        if self.mode == "slow":
            time.sleep(0.05)
        return [ord(c) % 50000 + 1 for c in text]


def dying():
    return Enc("die")


def slow():
    return Enc("slow")
'''


def _run_script(tmp_path, body: str, **kw):
    (tmp_path / "tok_helpers.py").write_text(HELPERS)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    script = "import sys\nimport tok_helpers\nfrom gpt2np.cli import run_main\n" + \
             "from gpt2np.data.prepare import prepare\n" + body
    return subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def _tree(folder: Path) -> dict:
    return {p.name: (os.readlink(p) if p.is_symlink() else p.read_bytes())
            for p in sorted(folder.iterdir())}


def _corpus(tmp_path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("one document<|endoftext|>and another one, a little longer" * 20)
    return path


def _prepared(tmp_path) -> Path:
    out = tmp_path / "out"
    prepare([str(_corpus(tmp_path))], str(out), shard_size=100, workers=1, progress=False,
            doc_sep="<|endoftext|>")
    return out


# ------------------------------------------------------------------ nothing outside the folder


def test_planted_links_in_the_folder_are_never_written_through(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("mine")
    planted = ["meta.json.tmp", f"meta.json.{os.getpid()}.tmp", "meta.json.00c0ffee.tmp",
               "shard_val_000000.npy.tmp", f"shard_train_000001.npy.{os.getpid()}.tmp"]
    for name in planted:
        (out / name).symlink_to(victim)
    prepare([str(_corpus(tmp_path))], str(out), shard_size=100, workers=1, progress=False)
    assert victim.read_text() == "mine"
    names = sorted(os.listdir(out))
    assert not set(planted) & set(names)  # the links (only the links) are gone
    assert "meta.json" in names and not any(os.path.islink(out / n) for n in names)


def test_a_prepare_while_another_writes_the_folder_is_refused(tmp_path):
    out = _prepared(tmp_path)
    before = _tree(out)
    with files.FolderLock(out, "--out-dir"):
        for overwrite in (False, True):
            with pytest.raises(files.FolderInUseError,
                               match=f"--out-dir {out} is in use by another gpt2np process "
                                     f"\\(pid {os.getpid()}"):
                prepare([str(_corpus(tmp_path))], str(out), shard_size=100, workers=1,
                        progress=False, overwrite=overwrite)
        assert _tree(out) == {**before, files.LOCK_NAME: (out / files.LOCK_NAME).read_bytes()}
    assert _tree(out) == before


@pytest.mark.parametrize("name", ["meta.json", "shard_train_000001.npy"])
def test_an_input_that_prepare_would_replace_is_refused(tmp_path, capsys, name):
    out = _prepared(tmp_path)
    before = _tree(out)
    for spelling in (str(out / name), str(out / ".." / "out" / name)):
        assert main(["--input", spelling, "--out-dir", str(out), "--overwrite"]) == 1
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: input {spelling} is a file that prepare writes"), err
    assert _tree(out) == before


def test_an_empty_doc_sep_is_refused_before_anything_is_removed(tmp_path, capsys):
    out = _prepared(tmp_path)
    before = _tree(out)
    rc = main(["--input", str(_corpus(tmp_path)), "--out-dir", str(out), "--overwrite",
               "--doc-sep", ""])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --doc-sep must be a "
                                                           "non-empty string"), err
    assert _tree(out) == before


# ------------------------------------------------------------------ workers: no hang, no leftovers


def test_a_worker_that_dies_is_an_error_not_a_hang(tmp_path):
    out = tmp_path / "out"
    proc = _run_script(tmp_path, (
        f"docs = ['a b c'] * 40 + ['die'] + ['d e f'] * 40\n"
        f"sys.exit(run_main(lambda argv: prepare([], {str(out)!r}, documents=docs, workers=2, "
        f"chunksize=4, shard_size=50, progress=False, encoding_factory=tok_helpers.dying)))\n"))
    _, err = proc.communicate(timeout=300)  # (a hang guard only)
    lines = err.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, err
    assert lines[0].startswith("error: a tokenizer process died") and "--workers" in lines[0]
    assert not out.exists()  # no half corpus, not even the folder


def _children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(c) for c in path.read_text().split()} if path.exists() else set()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_stops_prepare_cleanly(tmp_path):
    """No tracebacks (the workers do not see a broken pipe), no half corpus, no workers left."""
    if not Path(f"/proc/{os.getpid()}/task").is_dir():
        pytest.skip("needs /proc to see the worker processes")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    proc = _run_script(tmp_path, (
        f"docs = ('document %d' % i for i in range(100000))\n"
        f"sys.exit(run_main(lambda argv: prepare([], {str(out)!r}, documents=docs, workers=2, "
        f"chunksize=2, shard_size=200, progress=False, encoding_factory=tok_helpers.slow)))\n"))
    deadline = time.monotonic() + 300  # a hang guard only
    while not any(n.startswith("shard_train") for n in os.listdir(out)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "prepare never wrote a shard"
        time.sleep(0.1)
    workers = _children(proc.pid)
    assert len(workers) == 2
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and err.strip() == "error: terminated (SIGTERM)"
    assert sorted(os.listdir(out)) == ["notes.txt"]
    assert not [pid for pid in workers if _alive(pid)]


def test_workers_end_when_their_parent_is_killed(tmp_path):
    if not Path(f"/proc/{os.getpid()}/task").is_dir():
        pytest.skip("needs /proc to see the worker processes")
    out = tmp_path / "out"
    proc = _run_script(tmp_path, (
        f"docs = ('document %d' % i for i in range(100000))\n"
        f"prepare([], {str(out)!r}, documents=docs, workers=2, chunksize=2, shard_size=200, "
        f"progress=False, encoding_factory=tok_helpers.slow)\n"))
    deadline = time.monotonic() + 300
    while len(_children(proc.pid)) < 2 or not out.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "prepare never started its workers"
        time.sleep(0.1)
    workers = _children(proc.pid)
    proc.kill()  # kill -9: nothing of the parent runs
    proc.communicate(timeout=120)
    while [pid for pid in workers if _alive(pid)]:
        assert time.monotonic() < deadline, "the workers outlived their parent"
        time.sleep(0.2)


# ------------------------------------------------------------------ --doc-sep


@given(pieces=st.lists(st.text(alphabet="ab<|>\r\n", max_size=12), max_size=8),
       sep=st.sampled_from(["<|>", "a", "\r\n", "<|endoftext|>", "aab"]),
       chunk=st.integers(1, 9))
def test_split_stream_equals_str_split(tmp_path_factory, pieces, sep, chunk):
    text = sep.join(pieces)
    path = tmp_path_factory.mktemp("split") / "doc.txt"
    path.write_bytes(text.encode("utf-8"))
    got = list(P._split_stream(str(path), sep, chunk))
    assert got == [p for p in text.split(sep) if p]


def test_split_stream_searches_each_character_once(tmp_path, monkeypatch):
    """A document far longer than a chunk (the quadratic case: each chunk re-searched the
    whole document so far): every text searched is at most a chunk plus len(sep) - 1."""
    sep, chunk, n = "<|endoftext|>", 1000, 200_000
    path = tmp_path / "long.txt"
    path.write_text("short" + sep + "x" * n + sep + "end")
    searched = []
    real = P._cut
    monkeypatch.setattr(P, "_cut", lambda text, s: (searched.append(len(text)), real(text, s))[1])
    docs = list(P._split_stream(str(path), sep, chunk))
    assert [len(d) for d in docs] == [5, n, 3]
    assert max(searched) <= chunk + len(sep) - 1
    assert sum(searched) <= path.stat().st_size + len(searched) * (len(sep) - 1)


def test_meta_json_says_where_a_dataset_came_from(tmp_path):
    out = tmp_path / "out"
    meta = prepare([], str(out), documents=["a text"], workers=1, progress=False,
                   shard_size=100, info={"source": "somewhere"})
    on_disk = json.loads((out / "meta.json").read_text())
    assert meta == on_disk and list(on_disk)[0] == "source" and on_disk["complete"]
