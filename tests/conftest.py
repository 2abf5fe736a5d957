import os
import sys

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))  # for `import gradcheck`

# "ci" (default): bounded examples, no deadline (2 shared cores make timings noisy).
# "dev": more examples for a deeper local search: HYPOTHESIS_PROFILE=dev pytest
# Neither keeps an example database: a failure is not replayed by every later run (one unlucky
# draw would look like a permanent failure until someone deleted .hypothesis/); it prints
# its falsifying example and the @reproduce_failure line that replays it on purpose.
settings.register_profile("ci", max_examples=15, deadline=None, print_blob=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=200, deadline=None, print_blob=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def _has_gpu():
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


HAS_GPU = _has_gpu()
# GPT2NP_SIM_GPU=1: without a GPU, run the `gpu` tests on the CPU stand-in for CuPy and the
# CUDA simulator (tests/cuda_sim) instead of skipping them. Slow, and blind to what only a
# real GPU shows, but it runs the same test code over the same kernels.
SIM_GPU = not HAS_GPU and os.environ.get("GPT2NP_SIM_GPU") == "1"


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs CuPy and an NVIDIA GPU (or GPT2NP_SIM_GPU=1)")
    too_slow = pytest.mark.skip(reason="too slow on the CUDA simulator (GPU only)")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU and not SIM_GPU:
            item.add_marker(skip)
        elif SIM_GPU and "sim_slow" in item.keywords and not os.environ.get("GPT2NP_SIM_SLOW"):
            item.add_marker(too_slow)


@pytest.fixture(autouse=True)
def _simulated_gpu(request, monkeypatch):
    if SIM_GPU and request.node.get_closest_marker("gpu"):
        from cuda_sim import fake_cupy

        fake_cupy.install(monkeypatch)
        yield
        fake_cupy.clear_caches()
    else:
        yield
