"""TensorRT implementation of the backend contract (``runtime/backend.py``), on TensorRT 10 or TensorRT-RTX.
NOT YET RUN ON HARDWARE: no GPU was lent to the tasks that wrote it.  Its Python runs on the CPU in the tests with
TensorRT and CUDA faked at their boundary (``tests/fake_cuda.py``); plans are built for real there.

Written against the TensorRT 10 Python API that both flavours share (``deserialize_cuda_engine``,
``set_optimization_profile_async``, ``set_input_shape``, ``set_tensor_address``, ``execute_async_v3``), TensorRT-RTX's
runtime config (built-in CUDA graphs, runtime cache) and NVIDIA cuda-python (``cuda.bindings.runtime``).

Design: device-resident KV buffers allocated once at ``buffer_shape`` (fixed addresses); per-width
input/output buffers sized from the largest profile.  After a step, the n new KV entries are copied
device-to-device into the buffers at ``pos`` (cudaMemcpy2DAsync per layer: O(n)).  Only the logits
come back to the host -- the loop needs them to decide (an on-device argmax/acceptance kernel would
shrink that to the accepted length: future work).

Two kinds of export (``kv_cache.attention``):

* ``concat``: attention reads exactly ``past_length`` entries, a host shape tensor, so shapes change
  every step and steps run eagerly (no graphs).
* ``concat-bucketed``: shapes depend only on n and ``bucket_length`` (a host shape tensor, constant
  per bucket); ``past_length`` is device data.  TensorRT-RTX captures and replays each shape's work itself
  (``CudaGraphStrategy.WHOLE_GRAPH_CAPTURE``).  On TensorRT 10 each step's work -- token ids and ``past_length``
  copied from pinned host memory, then ``execute_async_v3`` -- is captured once per (stage, k, n,
  bucket) and replayed through ``cuda_graphs.GraphCache``: a replayed copy reads the pinned host
  memory as it is at replay time, so one graph serves every context inside its bucket.  The KV
  scatter (its destination moves with ``pos``) and the logits copy run after the replay.
"""
from __future__ import annotations

import ctypes
import logging

import numpy as np
from specrt.runtime import tensorrt_lib
from specrt.runtime.backend import Model, ModelStep, Tree
from specrt.runtime.cuda_graphs import CudartOps, GraphCache, check
from specrt.runtime.errors import EngineDirError
from specrt.runtime.manifest import ModelSpec
from specrt.runtime.tensorrt_plan import (
    EngineTensor,
    aligned_host_buffer,
    binding_plan,
    check_engine_compat,
    check_engine_tensors,
    graph_key,
    recorded_profiles,
    select_profile,
)

log = logging.getLogger(__name__)


def _pinned(cudart, count: int) -> np.ndarray:
    """int64 host array in page-locked memory (what a captured H2D copy may read at replay)."""
    ptr = check(cudart.cudaMallocHost(count * 8))
    return np.ctypeslib.as_array((ctypes.c_int64 * count).from_address(int(ptr)))


class TrtModel(Model):
    """A deserialized TensorRT plan on one CUDA device, shared by every sequence that runs it (each sequence has
    its own execution context, stream and device buffers: ``TrtModelStep``).  The plan's own flavour is loaded
    (``runtime/tensorrt_lib.py``); TensorRT-RTX plans get its built-in CUDA graphs where shapes are fixed (bucketed
    exports) and a runtime cache of their just-in-time compilation, kept beside the plan."""

    def __init__(self, spec: ModelSpec, k_values: tuple[int, ...], device: int = 0, cuda_graphs: bool = True):
        record = spec.raw.get("tensorrt")
        if not record:
            raise EngineDirError(f"{spec.role} has no TensorRT plan; build one with `specrt build DIR`")
        lib = tensorrt_lib.load(record.get("flavour", "tensorrt"))
        try:
            from cuda.bindings import runtime as cudart
        except ImportError as e:
            raise EngineDirError(f"the TensorRT backend needs cuda-python ({e}): pip install cuda-python, or use the "
                                 "onnxruntime backend") from None
        try:  # every allocation, stream and graph below lives on this device
            check(cudart.cudaSetDevice(device))
            props = check(cudart.cudaGetDeviceProperties(device))
        except RuntimeError as e:  # no GPU, no driver: a CPU-only machine
            raise EngineDirError(f"the TensorRT backend runs plans on an NVIDIA GPU, and CUDA device {device} is not "
                                 f"usable here ({e}); use the onnxruntime backend (the CPU)") from None
        note = check_engine_compat(record, lib.flavour, lib.version, (props.major, props.minor))
        if note:
            log.warning("%s: %s", spec.role, note)
        self.lib, self.trt, self.cudart, self.spec, self.device = lib, lib.module, cudart, spec, device
        trt = lib.module
        self.logger = trt.Logger(trt.Logger.WARNING)
        plan = spec.path.parent / record["file"]
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(plan.read_bytes())
        if self.engine is None:
            raise EngineDirError(f"{lib.flavour} could not deserialize {record['file']}; rebuild with `specrt build`")
        self.profiles = recorded_profiles(record)  # as built (a lean plan has no 1-row target profile)
        missing = [k for k in k_values if spec.role == "target"
                   and not any(p.stage == "verify" and p.k == k for p in self.profiles)]
        if missing:
            raise EngineDirError(f"{record['file']} has no verification profile for k = {missing}; rebuild it with "
                                 "`specrt build DIR --force`")
        self.n_max = max(p.n_max for p in self.profiles)
        self.plan = {b.name: b for b in binding_plan(spec, self.n_max)}
        check_engine_tensors(self._engine_tensors(), list(self.plan.values()))
        # TensorRT-RTX: its own CUDA graphs where every shape is fixed per bucket (ours need TensorRT 10), and its
        # just-in-time kernels cached beside the plan across runs
        self.cuda_graphs = cuda_graphs  # False: every pass eager (to measure what the graphs buy)
        self.builtin_graphs = cuda_graphs and lib.has_cuda_graphs and bool(spec.kv.bucket_length)
        self.runtime_cache_path = plan.with_name(plan.name + ".runtime_cache") if lib.has_cuda_graphs else None
        self._runtime_cache = None

    def execution_context(self):
        """A new execution context (TensorRT-RTX: with its runtime config -- CUDA graphs, the runtime cache)."""
        if not self.lib.has_cuda_graphs:
            return self.engine.create_execution_context()
        config = self.engine.create_runtime_config()
        if self.builtin_graphs:
            config.cuda_graph_strategy = self.trt.CudaGraphStrategy.WHOLE_GRAPH_CAPTURE
        if self._runtime_cache is None:
            self._runtime_cache = config.create_runtime_cache()
            if self.runtime_cache_path.is_file():
                self._runtime_cache.deserialize(self.runtime_cache_path.read_bytes())
        config.set_runtime_cache(self._runtime_cache)
        return self.engine.create_execution_context(config)

    def save_runtime_cache(self) -> None:
        """Write what TensorRT-RTX compiled just in time beside the plan (next runs start warm); best effort."""
        if self._runtime_cache is None:
            return
        try:
            self.runtime_cache_path.write_bytes(bytes(self._runtime_cache.serialize()))
        except OSError as e:  # a read-only engine directory: the next run compiles again
            log.warning("could not save the runtime cache %s: %s", self.runtime_cache_path, e)

    def new_step(self, max_step: int = 65) -> TrtModelStep:
        """``max_step`` is planned by the plan's profiles (``k_values``): every width up to the largest profile's
        has its buffers already."""
        return TrtModelStep(self)

    def _engine_tensors(self) -> list[EngineTensor]:
        trt, e = self.trt, self.engine
        dtypes = {trt.DataType.INT64: "int64", trt.DataType.INT32: "int32", trt.DataType.FLOAT: "float32",
                  trt.DataType.HALF: "float16", trt.DataType.BF16: "bfloat16"}
        out = []
        for i in range(e.num_io_tensors):
            name = e.get_tensor_name(i)
            out.append(EngineTensor(name, dtypes.get(e.get_tensor_dtype(name), str(e.get_tensor_dtype(name))),
                                    e.get_tensor_mode(name) == trt.TensorIOMode.INPUT, bool(e.is_shape_inference_io(name)),
                                    e.get_tensor_location(name) == trt.TensorLocation.HOST))
        return out



class TrtModelStep(ModelStep):
    """One sequence on a ``TrtModel``: an execution context, a stream, and device-resident buffers allocated
    once (fixed addresses, as CUDA graphs need)."""

    def __init__(self, model: TrtModel):
        self.model, self.spec, self.trt, self.cudart = model, model.spec, model.trt, model.cudart
        cudart, spec = model.cudart, model.spec
        check(cudart.cudaSetDevice(model.device))
        self.context = model.execution_context()
        self.stream = check(cudart.cudaStreamCreate())
        self.profiles, self.plan = model.profiles, model.plan
        n_max = model.n_max
        self.device_ptr = {}
        for b in self.plan.values():
            if not b.on_host:
                ptr = check(cudart.cudaMalloc(b.nbytes))
                check(cudart.cudaMemset(ptr, 0, b.nbytes))
                self.device_ptr[b.name] = ptr
        self.host_logits = np.empty((n_max, spec.vocab_size), dtype=np.float32)
        self._length = 0
        self._profile = -1
        self._profile_switched = False
        self._profiles_run: set[int] = set()
        for name, ptr in self.device_ptr.items():
            self._set_address(name, ptr)
        self.bucketed = bool(spec.kv.bucket_length)
        if self.bucketed:
            self.host_ids = _pinned(cudart, n_max)
            self.host_past = _pinned(cudart, 1)
            # shape tensor, read by TensorRT at enqueue; its address must be 256-byte aligned
            self.host_bucket = aligned_host_buffer(1)
            self._set_address(spec.kv.bucket_length, self.host_bucket.ctypes.data)
            # ours where TensorRT-RTX's built-in graphs do not run (TensorRT 10)
            self.graphs = None if model.builtin_graphs or not model.cuda_graphs else GraphCache(CudartOps(), self.stream)
        else:
            self.host_ids = np.zeros(n_max, dtype=np.int64)
            self.host_past = aligned_host_buffer(1)  # shape tensor
            self._set_address(spec.kv.past_length, self.host_past.ctypes.data)

    def _set_address(self, name: str, ptr: int) -> None:
        if not self.context.set_tensor_address(name, int(ptr)):
            raise EngineDirError(f"TensorRT refused the address of {name!r} ({int(ptr):#x}) for {self.spec.role}")

    @property
    def max_context(self) -> int:
        return self.spec.kv.buffer_shape[2]

    @property
    def vocab_size(self) -> int:
        return self.spec.vocab_size

    @property
    def length(self) -> int:
        return self._length

    def set_length(self, length: int) -> None:
        if not 0 <= length <= self._length:
            raise ValueError(f"cache length must be in [0, {self._length}], got {length}")
        self._length = length

    def extend(self, token_ids: np.ndarray, pos: int) -> np.ndarray:
        logits = None
        chunk = max(p.n_max for p in self.profiles if p.stage == "prefill")
        for start in range(0, len(token_ids), chunk):
            logits = self._run(token_ids[start:start + chunk], pos + start, prefill=True)
        return logits[-1]

    def forward(self, token_ids: np.ndarray, pos: int, *, tree: Tree | None = None,
                inputs: dict[str, np.ndarray] | None = None, last_only: bool = False) -> np.ndarray:
        """``last_only`` is allowed and ignored: every row's logits come back.  Trees and a head's inputs are not
        (``supports_tree`` is False: TensorRT builds the concat graphs, which take chains only)."""
        if tree is not None:
            raise EngineDirError(f"{self.spec.role}: TensorRT engines take chain passes only (no tree graph)")
        if inputs:
            raise EngineDirError("feature-head engines run on ONNX Runtime only: TensorRT builds the concat "
                                 "graphs, and a feature head needs the in-place one")
        return self._run(token_ids, pos, prefill=False)

    def _run(self, token_ids: np.ndarray, pos: int, prefill: bool) -> np.ndarray:
        cudart, kv = self.cudart, self.spec.kv
        n = len(token_ids)
        assert 0 <= pos <= self._length and pos + n <= self.max_context
        profile = select_profile(self.profiles, n, pos, self.max_context, prefill)
        if profile != self._profile:
            if not self.context.set_optimization_profile_async(profile, self.stream):
                raise RuntimeError(f"TensorRT refused optimization profile {profile} for {self.spec.role}")
            self._profile = profile
            self._profile_switched = True  # applied at the next enqueue: run that one eagerly
        self.host_ids[:n] = token_ids
        self.host_past[0] = pos
        if not self.context.set_input_shape(kv.input_ids, (1, n)):
            raise RuntimeError(f"TensorRT refused input shape (1, {n}) of {kv.input_ids!r} under profile {profile} "
                               f"{self.profiles[profile]}")
        h2d = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice

        def enqueue() -> None:
            check(cudart.cudaMemcpyAsync(self.device_ptr[kv.input_ids], self.host_ids.ctypes.data, n * 8, h2d,
                                         self.stream))
            if self.bucketed:
                check(cudart.cudaMemcpyAsync(self.device_ptr[kv.past_length], self.host_past.ctypes.data, 8, h2d,
                                             self.stream))
            if not self.context.execute_async_v3(self.stream):
                raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.spec.role} ({n} tokens at {pos})")

        first_use = profile not in self._profiles_run
        if self.bucketed:
            key = graph_key(self.spec.role, self.profiles[profile], n, pos, self.max_context, kv.context_buckets)
            self.host_bucket[0] = key[-1]
            if self.graphs is not None:
                self.graphs.run(key, enqueue, fresh=self._profile_switched)
            else:
                enqueue()
        else:
            enqueue()
        self._profile_switched = False
        _, kvh, max_ctx, hd = kv.buffer_shape
        item = 4 if self.spec.dtype == "float32" else 2
        row = hd * item
        for new, buf in zip(kv.new_keys + kv.new_values, kv.key_buffers + kv.value_buffers):
            # [1, kvh, n, hd] -> buffer[:, :, pos:pos+n, :]: one 2-D copy, kvh rows of n*hd elements
            check(cudart.cudaMemcpy2DAsync(self.device_ptr[buf] + pos * row, max_ctx * row,
                                           self.device_ptr[new], n * row, n * row, kvh,
                                           cudart.cudaMemcpyKind.cudaMemcpyDeviceToDevice, self.stream))
        out = self.host_logits[:n]
        check(cudart.cudaMemcpyAsync(out.ctypes.data, self.device_ptr[kv.logits], out.nbytes,
                                     cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.stream))
        check(cudart.cudaStreamSynchronize(self.stream))  # the loop needs these logits to decide
        self._length = pos + n
        if first_use:  # TensorRT-RTX compiled this profile's kernels just now: keep them for the next run
            self._profiles_run.add(profile)
            self.model.save_runtime_cache()
        return out
