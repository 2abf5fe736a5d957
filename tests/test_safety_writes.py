"""Nothing written outside the file named, nothing lost: gpt2np.files' one writer, and the
outputs that commands check before any work.

Every form of the writer is run against the same hostile folders: links planted at every
name a temporary could have had, a link or a folder at the target, a failure (a full disk,
Ctrl-C) in the middle. A structural test keeps every module writing through it."""
from __future__ import annotations

import ast
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gpt2np import files
from gpt2np.errors import UsageError
from hostile import tree_of

ROOT = Path(__file__).resolve().parents[1]


def _writers(tmp_path):
    """Every way the project writes a file: name -> write(path, text)."""
    src = tmp_path / "copy-source.txt"

    def copy(path, text):
        src.write_bytes(text.encode())
        files.copy_file(src, path)

    return {
        "write_bytes": lambda p, t: files.write_bytes(p, t.encode()),
        "write_bytes_fsync": lambda p, t: files.write_bytes(p, t.encode(), fsync=True),
        "write_text": files.write_text,
        "write_json": lambda p, t: files.write_json(p, t),
        "write_file": lambda p, t: files.write_file(p, lambda f: f.write(t.encode())),
        "replace_atomically": lambda p, t: files.replace_atomically(
            p, lambda tmp: tmp.write_text(t)),
        "copy_file": copy,
    }


WRITERS = list(_writers(Path("/")))


@pytest.mark.parametrize("how", WRITERS)
def test_planted_links_are_never_written_through(tmp_path, how):
    """Links at the target and at every temporary name an earlier writer used (<name>.tmp,
    <name>.<pid>.tmp): the victims stay as they were, the target becomes a plain file."""
    victims = tmp_path / "victims"
    victims.mkdir()
    out = tmp_path / "out"
    out.mkdir()
    planted = ["meta.json.tmp", f"meta.json.{os.getpid()}.tmp", "meta.json.0000abcd.tmp",
               "meta.json"]
    for i, name in enumerate(planted):
        (victims / f"v{i}").write_text(f"victim {i}")
        (out / name).symlink_to(victims / f"v{i}")
    before = tree_of(victims)
    _writers(tmp_path)[how](out / "meta.json", '"new"')
    assert tree_of(victims) == before
    assert not (out / "meta.json").is_symlink() and "new" in (out / "meta.json").read_text()
    # the planted temporaries are untouched: links to the victims still
    assert sorted(p.name for p in out.iterdir()) == sorted(planted)


class _FailingFile:
    """An open file whose first write puts one byte down, then fails with `error`."""

    def __init__(self, f, error):
        self.f, self.error = f, error

    def write(self, data):
        self.f.write(data[:1])
        raise self.error

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


@pytest.mark.parametrize("how", WRITERS)
def test_a_failure_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, how):
    """A full disk and Ctrl-C (SIGTERM takes the same path) in the middle of any write."""
    path = tmp_path / "log.jsonl"
    path.write_text("old\n")
    real_fdopen = os.fdopen
    for error in (OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()):
        monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _FailingFile(
            real_fdopen(fd, *a, **k), error))
        # (a library that writes the path itself)
        monkeypatch.setattr(Path, "write_text", lambda self, t: _FailingFile(
            open(self, "wb"), error).write(t.encode()))
        with pytest.raises(type(error)) as caught:
            _writers(tmp_path)[how](path, "new")
        monkeypatch.undo()
        assert path.read_text() == "old\n"
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["log.jsonl"] + (
            ["copy-source.txt"] if how == "copy_file" else []))
        if isinstance(error, OSError):  # the error names the file and what to do
            assert isinstance(caught.value, files.WriteError)
            assert caught.value.errno == errno.ENOSPC
            assert str(caught.value) == (f"cannot write {path}: No space left on device; free "
                                         "space there, or write elsewhere")


def test_a_real_full_disk_names_the_file(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    with pytest.raises(files.WriteError, match="cannot write /dev/full: No space left on device"):
        files.append_text("/dev/full", "x\n")


@pytest.mark.parametrize("how", WRITERS)
def test_a_folder_at_the_target_is_refused_before_writing(tmp_path, how):
    (tmp_path / "out.json").mkdir()
    (tmp_path / "out.json" / "keep").write_text("keep")
    with pytest.raises(files.WriteError, match=r"out.json: Is a directory; it is a folder"):
        _writers(tmp_path)[how](tmp_path / "out.json", "x")
    assert (tmp_path / "out.json" / "keep").read_text() == "keep"
    assert sorted(p.name for p in tmp_path.iterdir() if "copy-source" not in p.name) == ["out.json"]


def test_append_never_follows_a_link(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("mine")
    (tmp_path / "log.jsonl").symlink_to(victim)
    with pytest.raises(files.WriteError, match="log.jsonl: .*symbolic link"):
        files.append_text(tmp_path / "log.jsonl", "{}\n")
    assert victim.read_text() == "mine"
    files.append_text(tmp_path / "new.jsonl", "a\n")
    files.append_text(tmp_path / "new.jsonl", "b\n")
    assert (tmp_path / "new.jsonl").read_text() == "a\nb\n"


def test_a_failed_folder_names_the_folder_not_the_temporary(tmp_path):
    dest = tmp_path / "hf"

    def full(folder):
        files.write_text(folder / "config.json", "{}")
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "model.safetensors"))

    with pytest.raises(files.WriteError) as caught:
        files.replace_folder(dest, full)
    assert str(caught.value).startswith(f"cannot write {dest}/model.safetensors: No space")
    assert os.listdir(tmp_path) == []
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C / SIGTERM while building
        files.replace_folder(dest, lambda folder: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert os.listdir(tmp_path) == []


def test_a_folder_that_cannot_take_the_old_ones_place_puts_it_back(tmp_path, monkeypatch):
    dest = tmp_path / "hf"
    files.replace_folder(dest, lambda f: (f / "a").write_text("old"))
    real = os.replace
    calls = []

    def second_fails(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:  # the new folder into place
            raise OSError(errno.EXDEV, "Invalid cross-device link", str(src), str(dst))
        return real(src, dst)

    monkeypatch.setattr(os, "replace", second_fails)
    with pytest.raises(OSError):
        files.replace_folder(dest, lambda f: (f / "a").write_text("new"))
    monkeypatch.undo()
    assert (dest / "a").read_text() == "old" and os.listdir(tmp_path) == ["hf"]


# ------------------------------------------------------------------ every module writes through it

# calls that write a file by its name, outside gpt2np.files: module functions, methods of any
# object, plain functions, and open() in a writing mode ...
_MODULE_WRITES = {("os", "replace"), ("os", "rename"), ("os", "link"), ("os", "symlink"),
                  ("shutil", "copy"), ("shutil", "copyfile"), ("shutil", "copy2"),
                  ("shutil", "copytree"), ("shutil", "move"), ("tempfile", "mkstemp"),
                  ("tempfile", "mkdtemp"), ("tempfile", "NamedTemporaryFile"), ("np", "save"),
                  ("np", "savez"), ("numpy", "save")}
_METHOD_WRITES = {"write_text", "write_bytes", "savefig", "tofile", "touch", "symlink_to",
                  "hardlink_to"}
_FUNCTION_WRITES = {"save_file", "mkstemp", "mkdtemp", "copyfile"}
# ... unless they write a writer callback's temporary file (`tmp`), the open file it is
# given (`f`), or memory (`buf`), or are the writer's own (`files.write_bytes`)
_EXEMPT = {"tmp", "f", "buf", "files"}


def _raw_writes(source: str, where: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source, where)):
        if not isinstance(node, ast.Call):
            continue
        func, args = node.func, node.args
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(
            func.value, ast.Name) else None
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        target = args[0].id if args and isinstance(args[0], ast.Name) else None
        mode = next((a.value for a in args[1:2] if isinstance(a, ast.Constant)), None)
        mode = next((k.value.value for k in node.keywords if k.arg == "mode"
                     and isinstance(k.value, ast.Constant)), mode)
        if isinstance(func, ast.Attribute):
            writes = (owner, name) in _MODULE_WRITES or name in _METHOD_WRITES
        else:
            writes = name in _FUNCTION_WRITES or (
                name == "open" and isinstance(mode, str) and bool(set(mode) & set("wax+")))
        if writes and target not in _EXEMPT and owner not in _EXEMPT:
            found.append((node.lineno, f"{where}:{node.lineno} {name}"))
    return [hit for _, hit in sorted(found)]


def test_every_module_writes_through_the_one_writer():
    found = [hit for p in sorted((ROOT / "gpt2np").rglob("*.py")) if p.name != "files.py"
             for hit in _raw_writes(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == [], "write through gpt2np.files instead"


def test_the_scan_sees_raw_writes():
    source = ("import numpy as np, os, shutil\n"
              "def f(path, x):\n"
              "    open(path, 'w').write('x')\n"
              "    path.write_text('x')\n"
              "    np.save(path, x)\n"
              "    os.replace(path, path)\n"
              "    shutil.copyfile(path, path)\n"
              "    open(path, mode='ab')\n"
              "    fig.savefig(path)\n"
              "    open(tmp, 'wb')  # a writer callback: fine\n"
              "    tmp.write_text('x')  # the same\n"
              "    np.save(buf, x)  # memory\n"
              "    s.replace('a', 'b')  # a string\n"
              "    replace(cfg, rank=1)  # dataclasses.replace\n"
              "    open(path)  # reading\n")
    assert [h.split()[1] for h in _raw_writes(source, "probe")] == [
        "open", "write_text", "save", "replace", "copyfile", "open", "savefig"]


# ------------------------------------------------------------------ outputs checked before the work


def test_check_output_refuses_what_cannot_be_written_or_is_an_input(tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text("text")
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (tmp_path / "link.txt").symlink_to(data)
    os.link(data, tmp_path / "hard.txt")
    inputs = [("--data", data), ("--model", model), ("--model", "gpt2")]  # (a hub id)
    bad = {
        tmp_path: "is a folder",
        tmp_path / "missing" / "r.json": "there is no folder",
        data: "is the input --data",
        tmp_path / "model" / ".." / "corpus.txt": "is the input --data",
        tmp_path / "link.txt": "is the input --data",
        tmp_path / "hard.txt": "is the input --data",
        model / "config.json": "already exists in the folder of the input --model",
    }
    for path, message in bad.items():
        with pytest.raises(UsageError, match=message):
            files.check_output(path, "--json", inputs)
    assert data.read_text() == "text" and (model / "config.json").read_text() == "{}"
    for ok in (tmp_path / "r.json", model / "new.json"):  # a new file, even in an input folder
        assert files.check_output(ok, "--json", inputs) == ok
    earlier = model / "eval.json"
    earlier.write_text("{}")
    assert files.check_output(earlier, "--json", inputs, earlier_output=lambda p: True) == earlier


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    from gpt2np import GPT, GPTConfig, save_pretrained

    tmp = tmp_path_factory.mktemp("safety-eval")
    save_pretrained(GPT(GPTConfig(block_size=16, vocab_size=50257, n_layer=1, n_head=2, n_embd=16),
                        seed=1), tmp / "model")
    (tmp / "corpus.txt").write_text("First Citizen: speak.\n" * 20)
    (tmp / "hs.jsonl").write_text('{"ctx": "a", "endings": ["b", "c", "d", "e"], "label": 0}\n')
    return tmp


def _snapshot(folder):
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_eval_refuses_an_output_that_is_an_input_before_any_work(model_folder, monkeypatch,
                                                                  capsys):
    from gpt2np.commands import eval as eval_cmd

    def no_work(*a, **k):
        raise AssertionError("the output must be checked before the model is loaded")

    monkeypatch.setattr(eval_cmd, "load_model", no_work)
    t = model_folder
    loss = ["--model", str(t / "model"), "--task", "loss", "--data", str(t / "corpus.txt")]
    hs = ["--model", str(t / "model"), "--task", "hellaswag", "--data", str(t / "hs.jsonl")]
    cases = [
        (loss, t / "corpus.txt", "is the input --data"),
        (loss, t / "model" / ".." / "corpus.txt", "is the input --data"),
        (hs, t / "hs.jsonl", "is the input --data"),
        (loss, t / "model" / "config.json", "in the folder of the input --model"),
        (loss, t / "model" / "model.safetensors", "in the folder of the input --model"),
        (loss, t / "model", "is a folder"),
        (loss, t / "nowhere" / "r.json", "there is no folder"),
    ]
    before = _snapshot(t)
    for args, out, message in cases:
        assert eval_cmd.main([*args, "--json", str(out)]) == 2, out
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: --json") and message in err[0], err
    assert _snapshot(t) == before


def test_eval_may_replace_its_own_earlier_result_in_the_model_folder(model_folder):
    from gpt2np.commands import eval as eval_cmd

    t = model_folder
    earlier = t / "model" / "eval.json"
    earlier.write_text(json.dumps({"task": "loss", "model": "x", "loss": 1.0}))
    try:
        assert eval_cmd.check_json_output(earlier, t / "corpus.txt", t / "model") == earlier
        (t / "model" / "notes.json").write_text('{"mine": 1}')  # not an eval result
        with pytest.raises(UsageError, match="in the folder of the input --model"):
            eval_cmd.check_json_output(t / "model" / "notes.json", t / "corpus.txt", t / "model")
    finally:
        earlier.unlink()
        (t / "model" / "notes.json").unlink(missing_ok=True)


def test_gradcheck_json_is_checked_before_any_work(model_folder, capsys):
    from gpt2np.commands import gradcheck

    t = model_folder
    before = _snapshot(t)
    for out, message in ((t / "corpus.txt", "is the input --text"), (t, "is a folder"),
                         (t / "no" / "gc.json", "there is no folder")):
        rc = gradcheck.main(["--model", str(t / "model"), "--text", str(t / "corpus.txt"),
                             "--json", str(out)])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and message in err[0], err
    assert _snapshot(t) == before


def test_a_killed_writer_leaves_a_temporary_that_is_recognised(tmp_path):
    """kill -9 in the middle of a write: the target is intact and what is left names it."""
    (tmp_path / "ckpt.safetensors").write_bytes(b"old")
    script = ("import os, signal, sys\nfrom gpt2np import files\n"
              "def die(f):\n    f.write(b'half')\n    f.flush()\n"
              "    os.kill(os.getpid(), signal.SIGKILL)\n"
              f"files.write_file({str(tmp_path / 'ckpt.safetensors')!r}, die, fsync=True)\n")
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, timeout=120)
    assert proc.returncode == -9
    left = sorted(p.name for p in tmp_path.iterdir())
    assert len(left) == 2 and (tmp_path / "ckpt.safetensors").read_bytes() == b"old"
    assert files.temp_target(left[1]) == "ckpt.safetensors"
    (tmp_path / "notes.tmp").write_text("mine")
    assert files.remove_temporaries(tmp_path, {"ckpt.safetensors"}.__contains__) == [left[1]]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.safetensors", "notes.tmp"]


# ------------------------------------------------------------------ holding a folder


def test_a_folder_lock_is_exclusive_and_leaves_nothing(tmp_path):
    out = tmp_path / "run"
    with files.FolderLock(out, "--out-dir") as lock:
        assert (out / files.LOCK_NAME).read_text().startswith(f"pid {os.getpid()}: ")
        with pytest.raises(files.FolderInUseError, match=f"--out-dir {out} is in use .*pid "
                                                         f"{os.getpid()}"):
            files.FolderLock(out, "--out-dir")  # (this process too: a lock per open file)
    assert not out.exists()  # it made the folder and left it empty: removed
    lock.release()  # (twice is harmless)
    out.mkdir()
    (out / "keep").write_text("x")
    with files.FolderLock(out):
        pass
    assert os.listdir(out) == ["keep"]


def test_a_filesystem_without_locks_warns_and_goes_on(tmp_path, monkeypatch):
    import fcntl

    def unsupported(fd, op):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", unsupported)
    with pytest.warns(UserWarning, match="cannot lock .*nothing keeps a second gpt2np"):
        with files.FolderLock(tmp_path / "run"):
            pass
