"""A training run's --out-dir: one run at a time, no run's files lost to another, nothing a
killed run left behind kept forever, errors that say what can work.

Each test builds the hostile out-dir (a run still going, an earlier run's files, a killed
save's temporary, a planted link, a full disk) and checks that nothing else changed."""
from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gpt2np import files
from gpt2np.commands.train import main
from gpt2np.io.checkpoint import load_checkpoint
from gpt2np.train import loop as T
from gpt2np.train import outputs as run_outputs
from gpt2np.train.loop import TrainError, train
from testdata import shakespeare_path
from tiny_run import as_flags, tiny_config

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory):
    if not shakespeare_path().is_file():
        pytest.skip(f"tiny Shakespeare not at {shakespeare_path()} (set GPT2NP_DATA)")
    return tmp_path_factory.mktemp("token-cache")


def _tree(folder: Path) -> dict:
    return {p.name: (os.readlink(p) if p.is_symlink() else p.read_bytes())
            for p in sorted(folder.iterdir())}


def _steps(out):
    return [json.loads(line)["step"] for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in "\n".join(err), err
    return err[-1]


# ------------------------------------------------------------------ one run per out-dir


def test_a_second_run_or_a_resume_while_a_run_goes_on_is_refused(tmp_path, token_cache, capsys):
    """Two runs in one out-dir would interleave log.jsonl and race for the checkpoint: the
    second (fresh, --overwrite or --resume) is refused, naming the folder and the holder."""
    out = tmp_path / "run"
    cfg = tiny_config(out, token_cache, max_steps=100_000, eval_interval=100_000, save_interval=2)
    proc = subprocess.Popen([sys.executable, "-m", "gpt2np", "train", *as_flags(cfg)], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 300  # a hang guard only
        while not ((out / "ckpt.safetensors").exists() and len(_steps(out)) >= 3):
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the run never checkpointed"
            time.sleep(0.1)
        for extra in ({}, {"overwrite": True}, {"resume": True}):
            assert main(as_flags(tiny_config(out, token_cache, **extra))) == 2
            line = _error_line(capsys)
            assert f"--out-dir {out} is in use by another gpt2np process (pid {proc.pid}" in line
    finally:
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, output
    steps = _steps(out)
    assert steps == list(range(len(steps)))  # one run's log, never two interleaved
    assert load_checkpoint(out / "ckpt.safetensors").state["step"] == len(steps)
    assert not (out / files.LOCK_NAME).exists()  # released with the run
    res = train(tiny_config(out, token_cache, resume=True, stop_after=1))  # now it may go on
    assert res.status == "stopped" and _steps(out) == list(range(len(steps) + 1))


def test_a_killed_run_leaves_no_lock_behind(tmp_path, token_cache):
    """kill -9 of the holder: the kernel drops the lock, the next run starts."""
    out = tmp_path / "run"
    script = ("import os, signal\nfrom gpt2np import files\n"
              f"lock = files.FolderLock({str(out)!r}, '--out-dir')\n"
              "os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", script], env=ENV, timeout=120)
    assert proc.returncode == -9 and (out / files.LOCK_NAME).exists()  # the file stays ...
    res = train(tiny_config(out, token_cache, max_steps=2))  # ... but holds nothing
    assert res.status == "done" and not (out / files.LOCK_NAME).exists()


def test_the_lock_file_is_never_written_through_a_link(tmp_path, token_cache, capsys):
    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("mine")
    (out / files.LOCK_NAME).symlink_to(victim)
    assert main(as_flags(tiny_config(out, token_cache))) == 2
    line = _error_line(capsys)
    assert f"{out / files.LOCK_NAME}" in line and "symbolic link" in line
    assert victim.read_text() == "mine" and sorted(os.listdir(out)) == [files.LOCK_NAME]


# ------------------------------------------------------------------ a fresh run replaces nothing


@pytest.mark.parametrize("name", [n for n in T.OUT_FILES if n != "ckpt.safetensors"])
def test_a_fresh_run_never_replaces_an_earlier_runs_files(tmp_path, token_cache, capsys, name):
    """Any file a run writes (every name the run knows, so a new one is covered too),
    without a checkpoint beside it: refused without --overwrite, nothing touched."""
    out = tmp_path / "run"
    out.mkdir()
    (out / name).write_bytes(b"an earlier run's")
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    assert main(as_flags(tiny_config(out, token_cache))) == 2
    line = _error_line(capsys)
    assert f"--out-dir {out} holds an earlier run's {name}" in line and "--overwrite" in line
    assert _tree(out) == before


def test_overwrite_killed_before_its_first_save_leaves_nothing_to_resume(tmp_path, token_cache,
                                                                         monkeypatch):
    """--overwrite removes the earlier run (checkpoint first) when it starts: a kill before
    its first save leaves no old checkpoint for --resume to continue under the new log."""
    out = tmp_path / "run"
    train(tiny_config(out, token_cache, max_steps=3, diagnostics=1, num_samples=1,
                      sample_tokens=2))
    old = sorted(os.listdir(out))
    assert set(old) == set(T.OUT_FILES)  # the earlier run wrote every file there is
    (out / "notes.txt").write_text("mine")

    def killed(self, step, engine, loader):
        raise KeyboardInterrupt  # (as kill -9 would, before anything is saved)

    monkeypatch.setattr(run_outputs.Checkpointer, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(out, token_cache, overwrite=True, max_steps=8, save_interval=2))
    monkeypatch.undo()
    assert sorted(os.listdir(out)) == ["log.jsonl", "notes.txt"]  # the new run's log only
    assert _steps(out) == [0, 1]
    with pytest.raises(TrainError, match="no checkpoint"):
        train(tiny_config(out, token_cache, resume=True))


@pytest.mark.parametrize("flag", ["data", "hellaswag", "init_from"])
def test_an_input_the_run_would_replace_is_refused(tmp_path, token_cache, flag):
    out = tmp_path / "run"
    train(tiny_config(out, token_cache, max_steps=2, num_samples=1, sample_tokens=2))
    before = _tree(out)
    value = {"data": out / "samples.txt", "hellaswag": out / "log.jsonl", "init_from": out}[flag]
    with pytest.raises(TrainError, match=f"--{flag.replace('_', '-')} .*which the run replaces"):
        train(tiny_config(out, token_cache, overwrite=True, **{flag: str(value)}))
    assert _tree(out) == before


# ------------------------------------------------------------------ what a killed run left


def test_a_resume_removes_what_a_killed_save_left(tmp_path, token_cache):
    out = tmp_path / "run"
    train(tiny_config(out, token_cache, max_steps=3))
    left = ["ckpt.safetensors.0123abcd.tmp", "ckpt.safetensors.4242.tmp",
            "log.jsonl.89abcdef.tmp", "loss.png.tmp"]
    kept = ["notes.0123abcd.tmp", "data.json.0123abcd.tmp", "ckpt.safetensors.bak"]
    for name in left + kept:
        (out / name).write_bytes(b"x" * 1000)
    (out / "diagnostics.jsonl.0000ffff.tmp").symlink_to(tmp_path / "victim")  # a planted link
    (tmp_path / "victim").write_text("mine")
    res = train(tiny_config(out, token_cache, resume=True, max_steps=4))
    assert res.status == "done" and res.step == 4
    names = set(os.listdir(out))
    assert not names & {*left, "diagnostics.jsonl.0000ffff.tmp"} and set(kept) <= names
    assert (tmp_path / "victim").read_text() == "mine"


# ------------------------------------------------------------------ errors that say what works


def test_the_first_checkpoint_failing_says_to_start_again(tmp_path, token_cache, monkeypatch,
                                                          capsys):
    real = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)  # the disk fills while the checkpoint is written
    out = tmp_path / "run"
    assert main(as_flags(tiny_config(out, token_cache, save_interval=2))) == 1
    line = _error_line(capsys)
    assert line.startswith(f"error: cannot write the checkpoint {out / 'ckpt.safetensors'}")
    assert "No space left on device" in line and "nothing to resume" in line
    assert "start the run again with --overwrite" in line and "continue with --resume" not in line
    assert not any(n.startswith("ckpt") for n in os.listdir(out))  # no temporary left either
    monkeypatch.setattr(os, "fsync", real)
    assert main(as_flags(tiny_config(out, token_cache, overwrite=True))) == 0  # as it said
