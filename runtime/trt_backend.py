"""TensorRT implementation of the ``ModelStep`` protocol.  NOT YET RUN ON HARDWARE.

Written against the documented TensorRT 10 Python API (``deserialize_cuda_engine``,
``set_optimization_profile_async``, ``set_input_shape``, ``set_tensor_address``,
``execute_async_v3``) and NVIDIA cuda-python (``cuda.bindings.runtime``).  TensorRT cannot be
installed on the machines this was written on, and no GPU was lent, so none of this module has
executed; its planning half (``tensorrt_plan``, ``cuda_graphs``) is CPU-tested.

Design: device-resident KV buffers allocated once at ``buffer_shape`` (fixed addresses); per-width
input/output buffers sized from the largest profile; ``past_length`` is a host shape tensor.  After
a step, the n new KV entries are copied device-to-device into the buffers at ``pos``
(cudaMemcpy2DAsync per layer: O(n)).  Only the logits come back to the host — the loop needs them
to decide (an on-device argmax/acceptance kernel would shrink that to the accepted length: future
work).  CUDA graphs (``cuda_graphs.GraphCache``) need shapes that do not change with the context;
this engine's attention reads exactly ``past_length`` entries, so steps run eagerly until an export
with bucketed, masked attention exists.
"""
from __future__ import annotations

import numpy as np
from specrt.runtime.cuda_graphs import check
from specrt.runtime.errors import EngineDirError
from specrt.runtime.manifest import ModelSpec
from specrt.runtime.tensorrt_plan import binding_plan, check_engine_compat, plan_profiles, select_profile


class TrtModelStep:
    def __init__(self, spec: ModelSpec, k_values: tuple[int, ...], device: int = 0):
        try:
            import tensorrt as trt
            from cuda.bindings import runtime as cudart
        except ImportError as e:
            raise EngineDirError(f"the TensorRT backend needs tensorrt and cuda-python ({e}); install them from "
                                 "NVIDIA's index, or use provider='cpu'") from None
        record = spec.raw.get("tensorrt")
        if not record:
            raise EngineDirError(f"{spec.role} has no TensorRT engine; build one with `specrt build DIR`")
        props = check(cudart.cudaGetDeviceProperties(device))
        check_engine_compat(record, trt.__version__, (props.major, props.minor))
        self.trt, self.cudart, self.spec = trt, cudart, spec
        self.logger = trt.Logger(trt.Logger.WARNING)
        blob = (spec.path.parent / record["file"]).read_bytes()
        self.engine = trt.Runtime(self.logger).deserialize_cuda_engine(blob)
        if self.engine is None:
            raise EngineDirError(f"TensorRT could not deserialize {record['file']}; rebuild with `specrt build`")
        self.context = self.engine.create_execution_context()
        self.stream = check(cudart.cudaStreamCreate())
        self.profiles = plan_profiles(spec.role, k_values)
        n_max = max(p.n_max for p in self.profiles)
        self.plan = {b.name: b for b in binding_plan(spec, n_max)}
        self.device_ptr = {}
        for b in self.plan.values():
            if not b.on_host:
                ptr = check(cudart.cudaMalloc(b.nbytes))
                check(cudart.cudaMemset(ptr, 0, b.nbytes))
                self.device_ptr[b.name] = ptr
        self.host_past = np.zeros(1, dtype=np.int64)
        self.host_logits = np.empty((n_max, spec.vocab_size), dtype=np.float32)
        self._length = 0
        self._profile = -1
        for name, ptr in self.device_ptr.items():
            self.context.set_tensor_address(name, ptr)
        self.context.set_tensor_address(spec.kv.past_length, self.host_past.ctypes.data)

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

    def prefill(self, token_ids: np.ndarray) -> np.ndarray:
        self._length = 0
        logits = None
        chunk = max(p.n_max for p in self.profiles if p.stage == "prefill")
        for start in range(0, len(token_ids), chunk):
            logits = self._run(token_ids[start:start + chunk], start, prefill=True)
        return logits[-1]

    def step(self, token_ids: np.ndarray, pos: int) -> np.ndarray:
        return self._run(token_ids, pos, prefill=False)

    def _run(self, token_ids: np.ndarray, pos: int, prefill: bool) -> np.ndarray:
        cudart, kv = self.cudart, self.spec.kv
        n = len(token_ids)
        assert 0 <= pos <= self._length and pos + n <= self.max_context
        profile = select_profile(self.profiles, n, prefill)
        if profile != self._profile:
            self.context.set_optimization_profile_async(profile, self.stream)
            self._profile = profile
        ids = np.ascontiguousarray(token_ids, dtype=np.int64)
        check(cudart.cudaMemcpyAsync(self.device_ptr[kv.input_ids], ids.ctypes.data, ids.nbytes,
                                     cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.stream))
        self.host_past[0] = pos
        self.context.set_input_shape(kv.input_ids, (1, n))
        if not self.context.execute_async_v3(self.stream):
            raise RuntimeError(f"TensorRT execute_async_v3 failed for {self.spec.role} ({n} tokens at {pos})")
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
        return out
