"""Run the project's CUDA kernels on the CPU: compile a .cu source as C++ with cuda_sim.h
(blocks in turn, threads as coroutines switched at barriers) and launch its kernels through
ctypes with the call signature of cupy's RawKernel: kernel(grid, block, args)."""
from __future__ import annotations

import ctypes
import hashlib
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

HEADER = Path(__file__).with_name("cuda_sim.h")
_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+(?:__launch_bounds__\([^)]*\)\s+)?void\s+'
                     r'(?:__launch_bounds__\([^)]*\)\s+)?(\w+)\s*\(([^)]*)\)', re.S)
_DYNAMIC_SMEM = re.compile(r"extern\s+__shared__\s+(?:__align__\(\d+\)\s+)?([\w ]+?)\s+(\w+)\s*\[\s*\]\s*;")
_SCALARS = {
    "int": ctypes.c_int, "unsigned": ctypes.c_uint, "unsigned int": ctypes.c_uint,
    "long long": ctypes.c_longlong, "long long int": ctypes.c_longlong,
    "unsigned long long": ctypes.c_ulonglong, "size_t": ctypes.c_size_t,
    "float": ctypes.c_float, "double": ctypes.c_double, "bool": ctypes.c_bool,
}


def available() -> bool:
    return shutil.which("g++") is not None


def kernel_signatures(source: str) -> dict[str, list[tuple[str, str]]]:
    """name -> [(C type, parameter name)] of every extern "C" __global__ kernel."""
    sigs = {}
    for name, params in _KERNEL.findall(source):
        out = []
        for p in (p.strip() for p in params.split(",") if p.strip()):
            m = re.match(r"(.*?)(\w+)\s*$", p, re.S)
            out.append((" ".join(m.group(1).split()), m.group(2)))
        sigs[name] = out
    return sigs


def _ctype(ctype: str):
    if "*" in ctype:
        return ctypes.c_void_p
    base = " ".join(w for w in ctype.split() if w not in ("const", "__restrict__", "volatile"))
    if base not in _SCALARS:
        raise TypeError(f"cuda_sim: no ctypes mapping for kernel parameter type {ctype!r}")
    return _SCALARS[base]


class SimKernel:
    def __init__(self, fn, name, params):
        self.name = name
        self.params = params
        self.argtypes = [_ctype(t) for t, _ in params]
        fn.argtypes = [ctypes.c_uint] * 6 + [ctypes.c_size_t] + self.argtypes
        fn.restype = ctypes.c_int
        self._fn = fn

    def __call__(self, grid, block, args, shared_mem=0):
        grid = tuple(grid) + (1,) * (3 - len(grid))
        block = tuple(block) + (1,) * (3 - len(block))
        if len(args) != len(self.argtypes):
            raise TypeError(f"kernel {self.name} takes {len(self.argtypes)} arguments "
                            f"({', '.join(n for _, n in self.params)}), got {len(args)}")
        cargs = []
        for a, ct, (ctype, pname) in zip(args, self.argtypes, self.params):
            if ct is ctypes.c_void_p:
                if not isinstance(a, np.ndarray):
                    raise TypeError(f"kernel {self.name}: parameter {pname} ({ctype}) needs an "
                                    f"array, got {type(a).__name__}")
                cargs.append(ctypes.c_void_p(a.ctypes.data))
            else:
                if isinstance(a, np.ndarray) and a.ndim > 0:
                    raise TypeError(f"kernel {self.name}: parameter {pname} ({ctype}) is a "
                                    f"scalar, got an array of shape {a.shape}")
                cargs.append(ct(a.item() if hasattr(a, "item") else a))
        rc = self._fn(*(int(g) for g in grid), *(int(b) for b in block), int(shared_mem), *cargs)
        if rc:
            raise RuntimeError(f"cuda_sim: kernel {self.name} failed (code {rc}: "
                               f"{ {1: 'deadlock', 2: 'bad launch'}.get(rc, 'fault') }); see stderr")


class SimModule:
    """cupy.RawModule's interface over a C++ build of the CUDA source."""

    def __init__(self, code: str | None = None, options=(), path: str | None = None,
                 **unused):
        if code is None:
            code = Path(path).read_text()
        self.code = code
        self.signatures = kernel_signatures(code)
        self._lib = ctypes.CDLL(str(_build(code, self.signatures)))

    def get_function(self, name):
        if name not in self.signatures:
            raise AttributeError(f"cuda_sim: no kernel {name!r} in this module "
                                 f"(has {sorted(self.signatures)})")
        return SimKernel(getattr(self._lib, f"sim_launch_{name}"), name, self.signatures[name])


def _build(code: str, signatures) -> Path:
    wrappers = []
    for name, params in signatures.items():
        decl = ", ".join(f"{t} {n}" for t, n in params)
        names = ", ".join(n for _, n in params)
        wrappers.append(
            f'extern "C" int sim_launch_{name}(unsigned gx, unsigned gy, unsigned gz, '
            f'unsigned bx, unsigned by, unsigned bz, size_t smem{", " if decl else ""}{decl}) {{\n'
            f'    return sim::launch({{gx, gy, gz}}, {{bx, by, bz}}, smem, [=]() {{ {name}({names}); }});\n'
            f'}}\n')
    # dynamic shared memory: a pointer to the launch's buffer instead of an extern array
    code = _DYNAMIC_SMEM.sub(r"\1* \2 = reinterpret_cast<\1*>(sim::dynamic_smem);", code)
    src = code + "\n// ---- cuda_sim launchers\n" + "".join(wrappers)
    key = hashlib.sha256((src + HEADER.read_text()).encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "gpt2np_cuda_sim"
    folder.mkdir(exist_ok=True)
    lib = folder / f"{key}.so"
    if not lib.exists():
        cu = folder / f"{key}.cpp"
        cu.write_text(src)
        tmp = folder / f"{key}.{id(src)}.tmp.so"
        cmd = ["g++", "-std=c++20", "-O1", "-g", "-fPIC", "-shared", "-w", "-ffp-contract=off",
               "-include", str(HEADER),
               str(cu), "-o", str(tmp)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"cuda_sim: g++ could not build the kernels:\n{done.stderr[-4000:]}")
        tmp.replace(lib)  # atomic: parallel test runs never load half a file
    return lib
