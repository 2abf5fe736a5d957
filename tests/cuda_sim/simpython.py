"""`python` with CuPy replaced by the CPU stand-in (fake_cupy + the CUDA simulator), for
shell scripts that run the GPU programs, e.g. examples/gpu_check.sh on a machine without a
GPU (tests/test_gpu_check.py):

    python tests/cuda_sim/simpython.py examples/bench.py --backend cupy ...   # a script
    python tests/cuda_sim/simpython.py -m pytest -q tests/test_cupy.py       # a module

A script runs in this process after fake_cupy is installed, as `python script` would run
it (sys.argv, __main__, its folder first on sys.path). `-m MODULE` runs the real python with
GPT2NP_SIM_GPU=1: pytest's conftest then simulates the `gpu` tests itself, and other
modules (pip) need no GPU.
"""
import os
import runpy
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]


class _Patch:
    """monkeypatch's two methods that fake_cupy.install uses, without the undo."""

    @staticmethod
    def setitem(mapping, key, value):
        mapping[key] = value

    @staticmethod
    def setattr(obj, name, value):
        setattr(obj, name, value)


def main(argv):
    if not argv or argv[0].startswith("-") and argv[0] != "-m":
        sys.exit("usage: simpython.py SCRIPT [ARGS...] | -m MODULE [ARGS...]")
    if argv[0] == "-m":
        os.environ["GPT2NP_SIM_GPU"] = "1"
        os.execv(sys.executable, [sys.executable, *argv])
    script = Path(argv[0])
    sys.path[0] = str(script.resolve().parent)  # as `python script` puts it
    sys.path += [str(TESTS), str(TESTS.parent)]  # cuda_sim, and backends for fake_cupy
    from cuda_sim import fake_cupy

    fake_cupy.install(_Patch())
    sys.argv = [str(script), *argv[1:]]
    runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
