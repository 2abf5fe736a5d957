"""Every CUDA source in gpt2np/backends/cuda compiles, on the CPU: NVRTC needs no GPU.

Each gpt2np/backends/cuda/*.cu (new files are picked up by the glob) is compiled as CuPy's
RawModule compiles it (NVRTC, CuPy's options, no include paths) to cubin for sm_80 (A100) and
sm_90 (H100); a failure shows NVRTC's log. Then every kernel name the Python wrappers look
up must be an entry point of the compiled code: the names in any module-level KERNEL_NAMES
in gpt2np/backends/ (a tuple of names, or a dict of file name -> names), and any string literal
passed to get_kernel(...) or get_function(...). Kernels themselves run only in the GPU tests
(tests/test_cupy_kernels.py).
"""
import ast
import functools
import glob
import os
import re

import pytest

from gpt2np.backends.cupy_kernels import read_source

nvrtc = pytest.importorskip("cuda.bindings.nvrtc")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUDA_DIR = os.path.join(ROOT, "gpt2np", "backends", "cuda")
CU_FILES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(CUDA_DIR, "*.cu")))
ARCHS = ("sm_80", "sm_90")
# as CuPy's RawModule compiles: load_module's -std=c++17, and what CuPy adds (not the arch)
OPTIONS = ("-std=c++17", "-ftz=true", "--device-as-default-execution-space")
OK = nvrtc.nvrtcResult.NVRTC_SUCCESS


def _call(fn, *args):
    """Call an NVRTC function; return its outputs, raise on an error code."""
    err, *out = fn(*args)
    if err != OK:
        raise AssertionError(f"{fn.__name__} failed: {err}")
    return out


def _read(size_fn, get_fn, prog):
    (size,) = _call(size_fn, prog)
    # a fresh, writable buffer: NVRTC writes into it. Never `b" " * size`: for size 1 that
    # is CPython's shared one-byte b" " object, and overwriting it corrupts every b" " in
    # the process (tiktoken's BPE tables among them)
    buf = bytearray(size)
    _call(get_fn, prog, buf)
    return bytes(buf).rstrip(b"\0")


@functools.lru_cache(maxsize=None)
def compile_cu(filename, arch, extra=()):
    """NVRTC-compile gpt2np/backends/cuda/<filename> for `arch`; return (cubin, ptx text, log).
    Fails the test with NVRTC's log when it does not compile."""
    src = read_source(filename).encode()  # as load_module hands it to CuPy
    try:
        (prog,) = _call(nvrtc.nvrtcCreateProgram, src, filename.encode(), 0, [], [])
    except (RuntimeError, OSError) as e:  # cuda-bindings present, the NVRTC library not
        pytest.fail(f"cannot load NVRTC ({e}); `pip install nvidia-cuda-nvrtc`")
    try:
        opts = [o.encode() for o in OPTIONS + (f"--gpu-architecture={arch}",) + tuple(extra)]
        (err,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        log = _read(nvrtc.nvrtcGetProgramLogSize, nvrtc.nvrtcGetProgramLog, prog).decode(errors="replace")
        if err != OK:
            pytest.fail(f"{filename} does not compile for {arch} ({err}):\n{log}")
        cubin = _read(nvrtc.nvrtcGetCUBINSize, nvrtc.nvrtcGetCUBIN, prog)
        ptx = _read(nvrtc.nvrtcGetPTXSize, nvrtc.nvrtcGetPTX, prog).decode()
        return cubin, ptx, log
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def entries(filename, arch="sm_90"):
    """The kernel entry points (extern "C" names as written) in a compiled .cu file."""
    return set(re.findall(r"\.entry\s+(\w+)\s*\(", compile_cu(filename, arch)[1]))


def wrapper_kernel_names():
    """{.cu file name or None (any file): kernel names} that gpt2np/backends/ Python code looks up,
    read from the source (no imports: the modules may need CuPy)."""
    wanted = {}
    for path in sorted(glob.glob(os.path.join(ROOT, "gpt2np", "backends", "**", "*.py"), recursive=True)):
        with open(path, encoding="utf-8") as f:
            src = f.read()
        for node in ast.parse(src).body:
            if (isinstance(node, ast.Assign) and len(node.targets) == 1
                    and getattr(node.targets[0], "id", None) == "KERNEL_NAMES"):
                value = ast.literal_eval(node.value)
                if isinstance(value, dict):
                    for cu, names in value.items():
                        wanted.setdefault(cu, set()).update(names)
                else:
                    wanted.setdefault(None, set()).update(value)
        literal = re.findall(r"""get_(?:kernel|function)\(\s*["'](\w+)["']""", src)
        wanted.setdefault(None, set()).update(literal)
    return wanted


def test_the_kernel_sources_are_found():
    assert "kernels.cu" in CU_FILES


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("filename", CU_FILES)
def test_cuda_source_compiles(filename, arch):
    cubin, ptx, _ = compile_cu(filename, arch)
    assert cubin and ".entry" in ptx, f"{filename}: no kernels in the compiled code"


def test_every_kernel_the_wrappers_use_is_defined():
    wanted = wrapper_kernel_names()
    assert wanted.get(None), "found no KERNEL_NAMES or get_kernel(...) names in gpt2np/backends/"
    everywhere = set().union(*(entries(cu) for cu in CU_FILES))
    missing = sorted(wanted.pop(None) - everywhere)
    assert not missing, f"kernels looked up but defined in no gpt2np/backends/cuda/*.cu: {missing}"
    for cu, names in wanted.items():
        assert cu in CU_FILES, f"KERNEL_NAMES names {cu}, which is not in gpt2np/backends/cuda"
        missing = sorted(names - entries(cu))
        assert not missing, f"kernels looked up but not defined in {cu}: {missing}"


def test_compiling_leaves_python_objects_intact():
    # NVRTC writes logs and PTX into buffers we hand it; they must be our own (a shared
    # interned bytes object, once overwritten, broke the tokenizer for the whole test run)
    for filename in CU_FILES:
        compile_cu(filename, ARCHS[0])
    assert bytes([32])[0] == 32 and b" ".decode() == " "


def test_sources_are_self_contained_after_pasting_headers():
    # CuPy gets one source text (its compile cache is keyed by it): every `#include "x.cuh"`
    # pasted in, once
    for cu in CU_FILES:
        src = read_source(cu)
        assert '#include "' not in src, cu
    src = read_source("flash_attention.cu")
    assert src.count("unsigned short f32_to_bf16_bits(float f)") == 1
    with pytest.raises(FileNotFoundError, match="nope.cu"):
        read_source("nope.cu")


# Kernels allowed a stack frame on sm_90: flash attention's backward at head size 128 holds
# more fragments than the 255 registers a thread may have (GPT-2's head size is 64).
STACK_ALLOWED = {"flash_backward_dkdv_d128"}


@pytest.mark.parametrize("filename", CU_FILES)
def test_kernels_keep_their_arrays_in_registers(filename):
    # ptxas's report (-v): a kernel whose register arrays (flash attention's fragments and
    # score tiles) are indexed with run-time values gets a stack frame in local memory,
    # many times slower. Guards against loops that stop unrolling.
    log = compile_cu(filename, "sm_90", ("--ptxas-options=-v",))[2]
    frames = {}
    name = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            name = m.group(1)
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores", line)
        if m and name:
            frames[name] = (int(m.group(1)), int(m.group(2)))
    assert frames, f"no ptxas report for {filename}:\n{log[-2000:]}"
    heavy = {k: v for k, v in frames.items() if v != (0, 0) and k not in STACK_ALLOWED}
    assert not heavy, f"{filename}: kernels with a stack frame or spills (bytes): {heavy}"
