"""GPU tests: skipped, with the reason, where there is no CUDA GPU or no TensorRT.  Run them with
scripts/gpu_check.sh on a GPU machine."""
from __future__ import annotations

import importlib.util

import pytest

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
HAVE_CUDA = importlib.util.find_spec("cuda") is not None


def _gpu_count() -> int:
    if not HAVE_CUDA:
        return 0
    try:
        from cuda.bindings import runtime as cudart

        err, n = cudart.cudaGetDeviceCount()
        return n if err == cudart.cudaError_t.cudaSuccess else 0
    except Exception:  # noqa: BLE001 -- any failure here means "no usable GPU"
        return 0


needs_trt = pytest.mark.skipif(not (HAVE_TRT and _gpu_count()),
                               reason="needs a CUDA GPU with TensorRT + cuda-python (not installable on CPU CI)")


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_trt
@pytest.mark.parametrize("name", ["close_concat", "close_bucketed"])
def test_tensorrt_greedy_equals_cpu(tmp_path, engines, name):
    import shutil

    from specrt.export.tensorrt_build import build_engines
    from specrt.runtime import Engine
    from specrt.runtime.manifest import load_manifest
    from specrt.runtime.trt_backend import TrtModelStep

    d = tmp_path / "engine"
    shutil.copytree(engines[name], d)  # TensorRT builds the concat-style exports only
    build_engines(d)
    cpu = Engine.load(d)
    gpu = Engine.load(d)
    m = load_manifest(d)
    gpu.target, gpu.draft = TrtModelStep(m.target, m.k_values), TrtModelStep(m.draft, m.k_values)
    for k in (1, 2, 4, 8):
        assert gpu.generate([5, 17, 33], max_new_tokens=30, k=k).token_ids == \
            cpu.generate([5, 17, 33], max_new_tokens=30, k=k).token_ids
    if name == "close_bucketed":  # shapes fixed per bucket: steps are CUDA-graph replays
        assert gpu.target.graphs.stats.replays > 0 and gpu.draft.graphs.stats.replays > 0
