"""TensorRT (either flavour) and cuda-python faked at their Python boundary, so the TensorRT backend runs on a CPU.

``install(monkeypatch, engine, flavour)`` puts a fake ``tensorrt`` (or ``tensorrt_rtx_bindings``, with TensorRT-RTX's
runtime config: built-in CUDA graphs, a runtime cache) and ``cuda.bindings.runtime`` into ``sys.modules``.  Device memory
is host memory here (``cudaMalloc`` returns the address of a numpy buffer, so the backend's copies move real
bytes); the fake engine reports the I/O tensors of a binding plan, and its ``execute_async_v3`` reads the token ids
and ``past_length`` where the backend put them and writes logits whose argmax is ``(token + 1) % vocab``, plus each
row's new KV entries (filled with the token id).  Everything of the backend above that boundary -- profiles,
shapes, addresses, the KV scatter, the logits copy, graph capture and replay bookkeeping -- is its real code.
"""
from __future__ import annotations

import ctypes
import sys
import types
from enum import Enum

import numpy as np
from specrt.runtime.tensorrt_plan import Binding

VERSION = "10.99.0"  # the fake TensorRT 10
RTX_VERSION = "1.99.0"  # the fake TensorRT-RTX


class cudaError_t(Enum):
    cudaSuccess = 0


class cudaMemcpyKind(Enum):
    cudaMemcpyHostToDevice = 1
    cudaMemcpyDeviceToHost = 2
    cudaMemcpyDeviceToDevice = 3


OK = cudaError_t.cudaSuccess
_capture: list | None = None  # work recorded by an open stream capture (replayed by cudaGraphLaunch)


def _do(work) -> None:
    """Run stream work now, or record it while a capture is open (a captured graph replays it)."""
    if _capture is not None:
        _capture.append(work)
    else:
        work()


class cudaStreamCaptureMode(Enum):
    cudaStreamCaptureModeThreadLocal = 1


class FakeCudart(types.ModuleType):
    """The cuda-python calls the backend makes; each returns (err, *result)."""

    def __init__(self):
        super().__init__("cuda.bindings.runtime")
        self.cudaError_t, self.cudaMemcpyKind, self.cudaStreamCaptureMode = (cudaError_t, cudaMemcpyKind,
                                                                             cudaStreamCaptureMode)
        self.buffers: dict[int, np.ndarray] = {}  # keeps every "device" allocation alive
        self.copies = 0
        self.graph_launches = 0

    def _alloc(self, nbytes: int) -> int:
        buf = np.zeros(max(1, nbytes), np.uint8)
        self.buffers[buf.ctypes.data] = buf
        return buf.ctypes.data

    def cudaSetDevice(self, device):
        return (OK,)

    def cudaGetDeviceProperties(self, device):
        return OK, types.SimpleNamespace(major=9, minor=0, name=b"fake")

    def cudaGetDeviceCount(self):
        return OK, 1

    def cudaMalloc(self, nbytes):
        return OK, self._alloc(nbytes)

    def cudaMallocHost(self, nbytes):
        return OK, self._alloc(nbytes)

    def cudaMemset(self, ptr, value, nbytes):
        ctypes.memset(ptr, value, nbytes)
        return (OK,)

    def cudaStreamCreate(self):
        return OK, 1

    def cudaStreamSynchronize(self, stream):
        return (OK,)

    def cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        _do(lambda: ctypes.memmove(dst, src, nbytes))
        self.copies += 1
        return (OK,)

    def cudaMemcpy2DAsync(self, dst, dpitch, src, spitch, width, height, kind, stream):
        def copy():
            for row in range(height):
                ctypes.memmove(dst + row * dpitch, src + row * spitch, width)
        _do(copy)
        self.copies += 1
        return (OK,)

    # graphs: a capture records the stream's work, an instantiated graph replays it
    def cudaStreamBeginCapture(self, stream, mode):
        global _capture
        _capture = []
        return (OK,)

    def cudaStreamEndCapture(self, stream):
        global _capture
        work, _capture = _capture, None
        return OK, work

    def cudaGraphInstantiate(self, graph, flags):
        return OK, list(graph)

    def cudaGraphExecUpdate(self, exec_graph, graph):
        exec_graph[:] = graph
        return OK, None

    def cudaGraphLaunch(self, exec_graph, stream):
        for work in exec_graph:
            work()
        self.graph_launches += 1
        return (OK,)

    def cudaGraphExecDestroy(self, exec_graph):
        return (OK,)

    def cudaGraphDestroy(self, graph):
        return (OK,)

    def cudaGetErrorName(self, err):
        return OK, err.name.encode()


class DataType(Enum):
    INT64 = "int64"
    INT32 = "int32"
    FLOAT = "float32"
    HALF = "float16"
    BF16 = "bfloat16"


class TensorIOMode(Enum):
    INPUT = 1
    OUTPUT = 2


class TensorLocation(Enum):
    DEVICE = 1
    HOST = 2


class FakeContext:
    def __init__(self, engine: FakeEngine):
        self.engine, self.addresses, self.shapes, self.profile, self.runs = engine, {}, {}, None, 0

    def set_tensor_address(self, name, ptr):
        if name not in self.engine.tensors:
            return False
        self.addresses[name] = int(ptr)
        return True

    def set_optimization_profile_async(self, index, stream):
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        self.shapes[name] = tuple(shape)
        return True

    def _array(self, name: str, count: int, dtype) -> np.ndarray:
        return np.ctypeslib.as_array((ctypes.c_byte * (count * np.dtype(dtype).itemsize)).from_address(
            self.addresses[name])).view(dtype)

    def execute_async_v3(self, stream):
        shapes = dict(self.shapes)  # as set for this enqueue (a replay runs with the shapes of its capture)
        _do(lambda: self._execute(shapes))
        return True

    def _execute(self, shapes):
        e, plan = self.engine, self.engine.plan
        ids_name = next(b.name for b in plan if b.name.endswith("input_ids"))
        n = shapes[ids_name][1]
        ids = self._array(ids_name, n, np.int64).copy()
        logits = next(b for b in plan if not b.is_input and len(b.shape) == 3 and b.shape[-1] == e.vocab)
        out = self._array(logits.name, n * e.vocab, np.float32).reshape(n, e.vocab)
        out[:] = 0.0
        out[np.arange(n), (ids + 1) % e.vocab] = 1.0
        for b in plan:  # new KV entries [1, kvh, n, hd]: the row's token id
            if not b.is_input and b is not logits:
                _, kvh, _, hd = b.shape
                kv = self._array(b.name, kvh * n * hd, np.dtype(b.dtype))
                kv.reshape(kvh, n, hd)[:] = ids[None, :, None]
        self.runs += 1


class CudaGraphStrategy(Enum):
    DISABLED = 0
    WHOLE_GRAPH_CAPTURE = 1


class FakeRuntimeCache:
    def __init__(self):
        self.data = b"jit:"

    def serialize(self):
        return self.data + b"kernels"

    def deserialize(self, blob):
        self.data = bytes(blob)
        return True


class FakeRuntimeConfig:
    def __init__(self):
        self.cuda_graph_strategy, self.cache = CudaGraphStrategy.DISABLED, None

    def create_runtime_cache(self):
        return FakeRuntimeCache()

    def set_runtime_cache(self, cache):
        self.cache = cache
        return True


class FakeEngine:
    def __init__(self, plan: list[Binding], vocab: int):
        self.plan, self.vocab = plan, vocab
        self.tensors = {b.name: b for b in plan}
        self.num_io_tensors = len(plan)
        self.contexts: list[FakeContext] = []

    def create_runtime_config(self):  # TensorRT-RTX only (the fake TensorRT 10 module has no CudaGraphStrategy)
        return FakeRuntimeConfig()

    def get_tensor_name(self, i):
        return self.plan[i].name

    def get_tensor_dtype(self, name):
        return DataType(self.tensors[name].dtype)

    def get_tensor_mode(self, name):
        return TensorIOMode.INPUT if self.tensors[name].is_input else TensorIOMode.OUTPUT

    def is_shape_inference_io(self, name):
        return self.tensors[name].on_host

    def get_tensor_location(self, name):
        return TensorLocation.HOST if self.tensors[name].on_host else TensorLocation.DEVICE

    def create_execution_context(self, config=None):
        context = FakeContext(self)
        context.config = config
        self.contexts.append(context)
        return context


def fake_tensorrt(engine: FakeEngine, flavour: str = "tensorrt") -> types.ModuleType:
    trt = types.ModuleType("tensorrt" if flavour == "tensorrt" else "tensorrt_rtx_bindings")
    trt.__version__ = VERSION if flavour == "tensorrt" else RTX_VERSION
    trt.DataType, trt.TensorIOMode, trt.TensorLocation = DataType, TensorIOMode, TensorLocation
    if flavour == "tensorrt-rtx":
        trt.CudaGraphStrategy = CudaGraphStrategy

    class Logger:
        WARNING = 2

        def __init__(self, level=None):
            pass

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return engine

    trt.Logger, trt.Runtime = Logger, Runtime
    return trt


def install(monkeypatch, engine: FakeEngine, flavour: str = "tensorrt") -> FakeCudart:
    """The fakes in ``sys.modules`` for this test; returns the CUDA fake (its counters)."""
    cudart = FakeCudart()
    cuda = types.ModuleType("cuda")
    bindings = types.ModuleType("cuda.bindings")
    cuda.bindings, bindings.runtime = bindings, cudart
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    name = "tensorrt" if flavour == "tensorrt" else "tensorrt_rtx_bindings"
    monkeypatch.setitem(sys.modules, name, fake_tensorrt(engine, flavour))
    return cudart
