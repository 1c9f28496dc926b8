"""GPU tests: skipped, with the reason, where there is no CUDA GPU or no TensorRT (either flavour).  Run them with
scripts/gpu_check.sh on a GPU machine.  NEVER RUN YET: no GPU was lent to the tasks that wrote them."""
from __future__ import annotations

import importlib.util

import pytest
from specrt.runtime import tensorrt_lib

HAVE_TRT = bool(tensorrt_lib.available())
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
                               reason="needs a CUDA GPU with TensorRT-RTX or TensorRT, and cuda-python (CI has no GPU)")


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_trt
@pytest.mark.parametrize("name", ["close_concat", "close_bucketed"])
def test_tensorrt_greedy_equals_cpu(tmp_path, engines, name):
    import shutil

    from specrt.export.tensorrt_build import build_engines
    from specrt.runtime import Engine

    d = tmp_path / "engine"
    shutil.copytree(engines[name], d)  # TensorRT builds the concat-style exports only
    build_engines(d)
    cpu = Engine.load(d)
    gpu = Engine.load(d, backend="tensorrt")
    for k in (1, 2, 4, 8):
        assert gpu.generate([5, 17, 33], max_new_tokens=30, k=k).token_ids == \
            cpu.generate([5, 17, 33], max_new_tokens=30, k=k).token_ids
    if name == "close_bucketed":  # shapes fixed per bucket: steps are CUDA-graph replays
        seq = gpu.default_sequence
        assert seq.target.graphs.stats.replays > 0 and seq.draft.graphs.stats.replays > 0


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_trt
@pytest.mark.parametrize("name", ["close_concat", "close_bucketed"])
def test_engine_tensors_int64_and_shape_tensor_status(tmp_path, engines, name):
    """What the review could not check without hardware: after parsing, input_ids and past_length are still
    INT64, past_length is a host shape tensor in the concat graph and device data in the bucketed one."""
    import shutil

    from specrt.export.tensorrt_build import build_engines
    from specrt.runtime.manifest import load_manifest
    from specrt.runtime.trt_backend import TrtModel

    d = tmp_path / "engine"
    shutil.copytree(engines[name], d)
    build_engines(d)
    model = TrtModel(load_manifest(d).target, (1, 2, 4, 8))  # loading runs check_engine_tensors
    e, trt = model.engine, model.trt
    assert e.get_tensor_dtype("input_ids") == trt.DataType.INT64 and e.get_tensor_dtype("past_length") == trt.DataType.INT64
    assert bool(e.is_shape_inference_io("past_length")) is (name == "close_concat")
    if name == "close_bucketed":
        assert e.is_shape_inference_io("bucket_length")


@pytest.mark.gpu
@pytest.mark.tensorrt
@needs_trt
def test_graph_replay_equals_eager_after_another_bucket_ran(tmp_path, engines):
    """A captured graph replays the same logits as eager execution, even after steps of another bucket (and
    another profile) ran in between."""
    import shutil

    import numpy as np
    from specrt.export.tensorrt_build import build_engines
    from specrt.runtime.manifest import load_manifest
    from specrt.runtime.ort_backend import OrtModelStep
    from specrt.runtime.trt_backend import TrtModel

    d = tmp_path / "engine"
    shutil.copytree(engines["close_bucketed"], d)
    build_engines(d)
    spec = load_manifest(d).target
    gpu, cpu = TrtModel(spec, (1, 2, 4, 8)).new_step(), OrtModelStep(spec)
    ids = np.arange(5, 60) % 300
    for model in (gpu, cpu):
        model.prefill(ids[:10])
    for pos in (10, 10, 10, 10):  # warm-up, capture, replays in bucket 16, width 5
        out = gpu.forward(ids[pos:pos + 5], pos).copy()
        gpu.set_length(pos)
    gpu.extend(ids[10:40], 10)  # another bucket (32, 64) and the prefill profile
    cpu.extend(ids[10:40], 10)
    gpu.set_length(10)
    cpu.set_length(10)
    replayed = gpu.forward(ids[10:15], 10).copy()
    assert gpu.graphs.stats.replays >= 2
    np.testing.assert_allclose(replayed, out, atol=1e-4)
    np.testing.assert_allclose(replayed, cpu.forward(ids[10:15], 10), atol=2e-3)
