"""gpt2np export never loses what is in DEST: --overwrite replaces only a folder holding
nothing but an export's files; a DEST that cannot be replaced whole is refused before any
work, naming what is in the way; SIGTERM leaves no temporary folder."""
from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import gpt2np
from gpt2np import GPT, GPTConfig
from gpt2np.commands.export import main
from gpt2np.io import export as ex
from hostile import tree_of

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    folder = tmp_path_factory.mktemp("export-src") / "model"
    gpt2np.save_pretrained(GPT(GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=2,
                                         n_embd=16), seed=3), folder)
    return folder


def _no_work(monkeypatch):
    def loaded(*a, **k):
        raise AssertionError("DEST must be checked before the model is loaded")

    monkeypatch.setattr(ex, "from_pretrained", loaded)


def _plant(dest: Path, entry: str, victim: Path):
    """An earlier export in dest, plus one entry that is not an export's."""
    dest.mkdir()
    for name in ex.EXPORT_FILES:
        (dest / name).write_text(f"exported {name}")
    if entry == "src/":  # a project's source folder
        (dest / "src").mkdir()
        (dest / "src" / "main.py").write_text("print('mine')")
    elif entry == "config.json -> victim":  # an export's name, but a link
        (dest / "config.json").unlink()
        (dest / "config.json").symlink_to(victim)
    elif entry == "vocab.json/":  # an export's name, but a folder
        (dest / "vocab.json").unlink()
        (dest / "vocab.json").mkdir()
        (dest / "vocab.json" / "x").write_text("mine")
    else:
        (dest / entry).write_text("mine")
    return entry.split(" ")[0].rstrip("/")


FOREIGN = ["src/", "notes.txt", "pytorch_model.bin", "README.md", ".hidden", "tokenizer.json",
           "model.safetensors.index.json", "config.json -> victim", "vocab.json/"]


@pytest.mark.parametrize("entry", FOREIGN)
def test_overwrite_refuses_any_folder_holding_more_than_an_export(tmp_path, src, monkeypatch,
                                                                  capsys, entry):
    victim = tmp_path / "victim"
    victim.write_text("mine")
    dest = tmp_path / "dest"
    name = _plant(dest, entry, victim)
    before = tree_of(tmp_path)
    _no_work(monkeypatch)
    assert main([str(src), str(dest), "--overwrite"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {dest} does not look like an exported "
                                               f"model: it holds {name!r}"), err
    assert tree_of(tmp_path) == before


def test_overwrite_replaces_a_folder_of_export_files_only(tmp_path, src):
    dest = tmp_path / "dest"
    dest.mkdir()
    for name in ("config.json", "model.safetensors"):  # (what save_pretrained writes)
        (dest / name).write_text("old")
    r = ex.export(src, dest, overwrite=True)
    assert sorted(os.listdir(dest)) == sorted(ex.EXPORT_FILES) == r["files"]
    assert os.listdir(tmp_path) == ["dest"]  # nothing left beside it


def test_dest_a_link_the_current_folder_or_under_a_file_is_refused_first(tmp_path, src,
                                                                         monkeypatch, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (real / "config.json").write_text("{}")
    (tmp_path / "link").symlink_to(real)
    (tmp_path / "file").write_text("mine")
    inside = tmp_path / "exported"
    inside.mkdir()
    (inside / "config.json").write_text("{}")
    before = tree_of(tmp_path)
    _no_work(monkeypatch)
    monkeypatch.chdir(inside)
    cases = {str(tmp_path / "link"): "is a symbolic link",
             ".": "is the current folder",
             "..": "is the current folder (or holds it)",
             str(tmp_path / "file" / "hf"): "is not a folder you can write in"}
    for dest, message in cases.items():
        assert main([str(src), dest, "--overwrite"]) == 1, dest
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
        assert dest in err[0]
    assert tree_of(tmp_path) == before


def _export_stopped_while_writing(src, dest, sig):
    """Run `gpt2np export src dest` in a child, send it `sig` once its temporary folder holds
    every file, and return the child's (returncode, stderr)."""
    script = (
        "import sys, time\n"
        "import gpt2np.io.export as ex\n"
        "real = ex.save_pretrained\n"
        "def slow(model, folder, **kw):\n"
        "    real(model, folder, **kw)\n"
        "    open(folder / 'ready', 'w').close()\n"
        "    time.sleep(300)\n"
        "ex.save_pretrained = slow\n"
        "from gpt2np.commands.export import main\n"
        f"sys.exit(main([{str(src)!r}, {str(dest)!r}]))\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300  # a hang guard only
    while not glob.glob(str(dest.parent / f".{dest.name}.*.tmp" / "ready")):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the export never started writing"
        time.sleep(0.1)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def test_sigterm_during_an_export_leaves_no_temporary_folder(tmp_path, src):
    code, err = _export_stopped_while_writing(src, tmp_path / "hf", signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    assert err.strip() == "error: terminated (SIGTERM)"
    assert os.listdir(tmp_path) == []  # no DEST, no temporary folder


def test_the_next_export_removes_what_a_killed_one_left(tmp_path, src):
    dest = tmp_path / "hf"
    code, _ = _export_stopped_while_writing(src, dest, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert len(glob.glob(str(tmp_path / ".hf.*.tmp"))) == 1  # what kill -9 leaves
    assert main([str(src), str(dest)]) == 0
    assert os.listdir(tmp_path) == ["hf"]


def test_only_unfinished_folders_of_dest_that_no_process_holds_are_removed(tmp_path, src):
    import fcntl

    from gpt2np.files import UNFINISHED

    def folder(name, mark=True):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(b"part of a file")
        if mark:
            (tmp_path / name / UNFINISHED).touch()
        return tmp_path / name

    folder(".hf.k1ll3d00.tmp")  # a killed export's: goes
    live = folder(".hf.l1ve0000.tmp")  # an export that is still writing: stays
    folder(".hf.userdata.tmp", mark=False)  # named alike, not ours: stays
    folder(".other.k1ll3d00.tmp")  # another DEST's: stays
    (tmp_path / ".hf.xyz00000.old").mkdir()  # a swap's: may hold the only old copy
    (tmp_path / ".hf.xyz00000.old" / "hf").mkdir()
    outside = folder("elsewhere")
    os.symlink(outside, tmp_path / ".hf.l1nk0000.tmp")  # a link: never followed
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        before = tree_of(tmp_path)
        assert main([str(src), str(tmp_path / "hf")]) == 0
    finally:
        os.close(fd)
    after = tree_of(tmp_path)
    gone = {k for k in before if k.startswith(".hf.k1ll3d00.tmp")}
    assert gone and not gone & set(after)
    assert {k: v for k, v in before.items() if k not in gone} == \
        {k: v for k, v in after.items() if k in before}


def test_an_export_on_a_filesystem_without_locks_is_written_unmarked(tmp_path, src,
                                                                      monkeypatch):
    import errno
    import fcntl

    def unsupported(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", unsupported)
    (tmp_path / ".hf.k1ll3d00.tmp").mkdir()  # unheld or not, nothing can tell: it stays
    assert main([str(src), str(tmp_path / "hf")]) == 0
    assert sorted(os.listdir(tmp_path)) == [".hf.k1ll3d00.tmp", "hf"]
    assert "model.safetensors" in os.listdir(tmp_path / "hf")
