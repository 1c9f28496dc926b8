"""ONNX Runtime implementation of the backend contract (``runtime/backend.py``; CPU, the embedded default).

The exported graph reads the *whole* preallocated cache buffer plus a
``past_length`` scalar.  The buffers are numpy arrays wrapped once in OrtValues
(zero-copy on CPU) and bound once; per step Python binds two tiny inputs and
ORT writes logits into a preallocated per-n buffer.  Two kinds of graph
(``kv_cache.update`` in the manifest):

* ``in-place`` (GroupQueryAttention, ``export/gqa_graph.py``): the present-KV
  outputs are bound to the very same OrtValues as the cache inputs; the graph
  writes the n new entries at ``pos`` and attends over the buffer where it
  lies.  No KV is copied anywhere, in Python or in ORT.
* ``write-new`` (optimum's concat-style attention): ORT returns the n new
  entries and Python copies them into the cache at ``pos`` (O(n)); inside ORT
  the graph still slices the buffer to ``past_length`` and concatenates, an
  O(context) copy measured by ``benchmarks/kv_copy.py``.

Nothing in Python is proportional to the context length in either case.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import onnxruntime as ort
from specrt.runtime.backend import PREFILL_CHUNK, Model, ModelStep, Tree
from specrt.runtime.errors import EngineDirError, GenerationError
from specrt.runtime.kv_cache import KVCache
from specrt.runtime.manifest import ModelSpec
from specrt.runtime.tensorrt_plan import bucket_for

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "tensorrt": "TensorrtExecutionProvider"}
_DTYPES = {"float32": np.float32, "float16": np.float16}


def session_options(threads: int | None, spin: bool = True) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = threads or min(os.cpu_count() or 1, 8)
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if not spin:
        # Two sessions alternate (draft, target): threads spinning after one session's run would
        # steal the cores the other one needs next.
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


PREFILL_GRAPH_CHOICES = ("auto", "on", "off")
# Prefill chunks shorter than this run through the target graph even where the prefill graph is open: measured on the
# AVX2 machine (demo int4 target, time to first token, interleaved), fp32 compute lost below it (8 tokens 188 against
# 150 ms, 32 tokens 276 against 248), tied at 48 and won from 64 on (347 against 385 ms; 512 tokens 2.6 against 3.1 s).
PREFILL_GRAPH_MIN_ROWS = 48


def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags as Linux lists them (empty elsewhere: nothing is assumed)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def use_prefill_graph(choice: str, flags: frozenset[str] | None = None,
                      scheme: str | None = "matmulnbits") -> tuple[bool, str]:
    """Whether to run prefill chunks through a target's prefill graph (``models.target.prefill_graph``) beside an
    int4 target at int8 activations, and why.  ``auto`` decides by what was measured on the demo int4 target
    (docs/quantization.md), per ``scheme`` (``ModelSpec.prefill_graph_scheme``):

    * ``int8-rows`` (weights of its own, integer GEMM): on any x86 CPU with AVX2.  The int8-rows graph prefilled
      1,024 tokens faster than the int4 graph on every x86 CPU measured -- 0.83 against 1.53 s (the fp32-compute
      prefill graph) with AMX, taking turns; 1.23 against 1.51 s with AVX-512 VNNI and no AMX; 3.56 against 4.53 s
      with AVX2 alone (target-only engines of each).
    * ``matmulnbits`` (the same weights at fp32 compute): fp32 compute prefilled 1,024 tokens 1.1-1.3x faster than
      int8 activations on an x86 CPU without VNNI (AVX2 and FMA only), and 1.34x faster (1.46 against 1.96 s, taking
      turns) on one with AVX-512 VNNI and AMX; on one with AVX-512 VNNI and no AMX the two tied (1.51 against
      1.54 s), so there the target graph alone is kept, sparing the second session's memory.

    Other CPUs (ARM) are unmeasured: ``auto`` keeps the target graph."""
    if choice not in PREFILL_GRAPH_CHOICES:
        raise GenerationError(f"prefill_graph must be one of {', '.join(PREFILL_GRAPH_CHOICES)}, got {choice!r}")
    if choice != "auto":
        return choice == "on", f"prefill_graph={choice}"
    flags = cpu_flags() if flags is None else flags
    if "avx2" not in flags:
        return False, "not an x86 CPU with AVX2 (unmeasured)"
    if scheme == "int8-rows":
        return True, "an x86 CPU (its integer GEMM prefilled faster than int4 on every x86 CPU measured)"
    if "amx_int8" in flags:
        return True, "this CPU has AMX (fp32 compute prefilled faster)"
    if flags & {"avx512_vnni", "avx_vnni"}:
        return False, "this CPU has VNNI and no AMX (int8 prefill was as fast)"
    return True, "this CPU has no VNNI (fp32 compute prefills faster)"


ATTENTION_KERNELS = ("auto", "flash", "unfused")
# ONNX Runtime reads this variable when it builds a session's CPU GroupQueryAttention kernels: "1" gives the unfused
# kernel (QK^T as one GEMM per head, softmax, then V) instead of its tiled flash kernel
GQA_FLASH_OFF_ENV = "ORT_GQA_DISABLE_FLASH_ATTENTION"
_ENV_LOCK = threading.Lock()


def attention_flash(choice: str, flags: frozenset[str] | None = None) -> tuple[bool | None, str]:
    """The GroupQueryAttention kernel a target's session is built with -- True flash, False unfused, None ONNX
    Runtime's own choice (``built_kernel``) -- and why.  ``auto`` decides by what was measured
    (``benchmarks/attention_kernel.py``: two sessions of one graph side by side, median of 7; docs/benchmarks.md,
    long prompts): on an Intel Xeon with AVX-512 and AMX (2 cores) the unfused kernel prefilled 1,024 tokens of the
    demo int8-rows target in 603 against 729 ms (fp32: 1,635 against 1,897 ms) with 1- to 9-row passes alike, and
    gave the first token of a 1,024-token prompt in 0.91 against 1.13 s (processes taking turns).  On an AVX2 CPU
    the flash kernel ran one-row attention twice as fast (0.28 against 0.58 ms a layer at 1,024), so ``auto`` leaves
    the choice to ONNX Runtime there, on other CPUs, and wherever the environment variable is set."""
    if choice not in ATTENTION_KERNELS:
        raise GenerationError(f"attention_kernel must be one of {', '.join(ATTENTION_KERNELS)}, got {choice!r}")
    if choice != "auto":
        return choice == "flash", f"attention_kernel={choice}"
    if GQA_FLASH_OFF_ENV in os.environ:
        return None, f"{GQA_FLASH_OFF_ENV} is set in the environment"
    flags = cpu_flags() if flags is None else flags
    if "avx512f" in flags:
        return False, "this CPU has AVX-512 (the unfused kernel prefilled faster, row passes alike)"
    return None, "the unfused kernel is slower or unmeasured on this CPU"


def built_kernel(flash: bool | None) -> str:
    """The kernel ONNX Runtime builds for ``flash`` (``attention_flash``): None is its default, flash, unless the
    environment variable asks for the unfused one."""
    if flash is not None:
        return "flash" if flash else "unfused"
    return "unfused" if os.environ.get(GQA_FLASH_OFF_ENV, "").strip() in ("1", "true", "True") else "flash"


class OrtModel(Model):
    """One ONNX Runtime session of an exported graph: the weights, loaded once and shared by every sequence
    that runs the model (ONNX Runtime sessions may run from several threads at once; each sequence brings
    its own KV cache and I/O binding: ``OrtModelStep``).

    A target with a prefill graph (``ModelSpec.prefill_graph``) may open it as a second session
    (``prefill_graph``: auto | on | off, see ``use_prefill_graph``): every sequence then runs its prompt's prefill
    chunks (``extend``) of ``PREFILL_GRAPH_MIN_ROWS`` tokens or more through it and everything else through the
    target graph, over the one KV cache.  The second
    session holds its own copy of the weights (measured on the demo int4 target: +67 MB).

    ``attention_kernel`` (auto | flash | unfused, see ``attention_flash``; None: ONNX Runtime's own choice) builds
    the graphs' GroupQueryAttention with that kernel, for every pass: target-only and speculative generation share
    it, so either is lossless; two choices' outputs differ as two engines' would."""

    def __init__(self, spec: ModelSpec, provider: str = "cpu", threads: int | None = None, spin: bool = True,
                 prefill_graph: str = "auto", attention_kernel: str | None = None):
        if provider != "cpu":
            # The cache buffers live in host memory; on CUDA/TensorRT EPs they would have to
            # live on the device (OrtValue on "cuda") and be updated there.  Not built yet.
            raise GenerationError(
                f"provider {provider!r}: only 'cpu' is implemented in this release; the ONNX Runtime GPU "
                "providers need device-resident cache buffers (not built yet, see docs/gpu.md). Use backend='onnxruntime' on the CPU."
            )
        if spec.dtype not in _DTYPES:
            raise EngineDirError(f"{spec.role}: dtype {spec.dtype} is not supported by the ONNX Runtime CPU backend")
        self.spec = spec
        flash, self.attention_reason = (None, "ONNX Runtime's default") if attention_kernel is None else \
            attention_flash(attention_kernel)
        # the kernel built: "flash" | "unfused", or None for a graph without GroupQueryAttention
        self.attention: str | None = built_kernel(flash)
        if not spec.kv.in_place:  # no GroupQueryAttention in the graph: nothing to choose
            flash, self.attention, self.attention_reason = None, None, "no GroupQueryAttention in this graph"
        self.session = self._open(spec, provider, threads, spin, flash)
        self._check_names(self.session, spec)
        self.prefill_session: ort.InferenceSession | None = None
        self.prefill_reason = "no prefill graph"
        if spec.prefill_graph is not None:
            use, self.prefill_reason = use_prefill_graph(prefill_graph, scheme=spec.prefill_graph_scheme)
            if use:
                self.prefill_session = self._open(spec.prefill_graph, provider, threads, spin, flash)
                self._check_names(self.prefill_session, spec.prefill_graph)
        elif prefill_graph == "on":
            raise GenerationError(f"{spec.role}: prefill_graph='on' but this engine has no prefill graph; re-export "
                                  "an int4 target with `specrt export --quant int4` (accuracy level 4)")
        else:
            use_prefill_graph(prefill_graph)  # the choice is checked either way

    @staticmethod
    def _open(spec: ModelSpec, provider: str, threads: int | None, spin: bool,
              flash: bool | None = None) -> ort.InferenceSession:
        """``flash``: False builds the graph's GroupQueryAttention kernels unfused, True flash; None leaves it to
        ONNX Runtime (its default, or the environment's ``GQA_FLASH_OFF_ENV``).  ONNX Runtime takes the choice from
        the environment while it builds the session, so the variable is set for that time only, under a lock."""
        def create() -> ort.InferenceSession:
            return ort.InferenceSession(str(spec.path), session_options(threads, spin), providers=[PROVIDERS[provider]])

        try:
            # every session is built under the lock: one built alongside must not see another's temporary value
            with _ENV_LOCK:
                if flash is None:
                    return create()
                before = os.environ.get(GQA_FLASH_OFF_ENV)
                os.environ[GQA_FLASH_OFF_ENV] = "0" if flash else "1"
                try:
                    return create()
                finally:
                    if before is None:
                        del os.environ[GQA_FLASH_OFF_ENV]
                    else:
                        os.environ[GQA_FLASH_OFF_ENV] = before
        except Exception as e:  # noqa: BLE001 -- onnxruntime raises its own Fail/InvalidGraph types
            if "Failed to parse environment variable" in str(e):  # the user's environment, not the engine directory
                said = str(e)[str(e).index("Failed to parse environment variable"):].strip()
                raise GenerationError(f"ONNX Runtime cannot start: {said}. Set that variable to 0 or 1, or unset "
                                      "it") from None
            raise EngineDirError(f"ONNX Runtime cannot open {spec.path.name}: {e}. Re-export the engine directory "
                                 "with `specrt export ... --force`.") from None

    def new_step(self, max_step: int = 65) -> OrtModelStep:
        return OrtModelStep(self, max_step=max_step)

    def _check_names(self, session: ort.InferenceSession, spec: ModelSpec) -> None:
        kv = spec.kv
        want_in = {kv.input_ids, kv.past_length, *kv.key_buffers, *kv.value_buffers}
        if kv.bucket_length:
            want_in.add(kv.bucket_length)
        if kv.tree:
            want_in |= {kv.position_ids, kv.tree_bias}
        if kv.logits_from:
            want_in.add(kv.logits_from)
        want_out = {kv.logits, *kv.new_keys, *kv.new_values}
        if spec.features:
            want_out.add(spec.features["output"])
        if spec.feature_head:
            fh = spec.feature_head
            want_in |= {fh["hidden_input"], fh["features_input"], fh["select_input"]}
            want_out.add(fh["hidden_output"])
        have_in = {i.name for i in session.get_inputs()}
        have_out = {o.name for o in session.get_outputs()}
        if want_in != have_in or not want_out <= have_out:
            raise EngineDirError(
                f"{spec.path.name}: tensor names do not match the manifest (missing inputs "
                f"{sorted(want_in - have_in)[:8]}, unexpected inputs {sorted(have_in - want_in)[:8]}, missing outputs "
                f"{sorted(want_out - have_out)[:8]}). The directory mixes files from different exports; re-export it."
            )
        # The manifest sizes every buffer the runtime allocates: the graph must agree with it, dimension by
        # dimension, before anything is allocated (a graph's symbolic dims are left to ONNX Runtime).
        shapes = {i.name: (i.shape, i.type) for i in session.get_inputs()}
        shapes.update({o.name: (o.shape, o.type) for o in session.get_outputs()})
        want = {name: list(kv.buffer_shape) for name in (*kv.key_buffers, *kv.value_buffers)}
        want[kv.logits] = [None, None, spec.vocab_size]
        if kv.in_place:
            want.update({name: list(kv.buffer_shape) for name in (*kv.new_keys, *kv.new_values)})
        for name, dims in want.items():
            have = shapes[name][0]
            if len(have) != len(dims) or any(isinstance(h, int) and d is not None and h != d
                                             for h, d in zip(have, dims)):
                raise EngineDirError(f"{spec.path.name}: tensor {name!r} has shape {have} in the graph but the "
                                     f"manifest says {dims}. The directory mixes files from different exports; "
                                     "re-export it.")
        for name in (kv.input_ids, kv.past_length, *([kv.logits_from] if kv.logits_from else [])):
            if shapes[name][1] != "tensor(int64)":
                raise EngineDirError(f"{spec.path.name}: input {name!r} is {shapes[name][1]}, expected "
                                     "tensor(int64). Re-export the engine directory.")



class OrtModelStep(ModelStep):
    """One sequence on an exported model: its static KV cache, driven through its own IOBinding over a
    (possibly shared) ``OrtModel`` (a ``ModelSpec`` opens a model of its own: export checks, tests)."""

    def __init__(self, spec: ModelSpec | OrtModel, threads: int | None = None, max_step: int = 65, spin: bool = True,
                 cache: KVCache | None = None):
        """``cache``: run over these buffers (a slot of a batch graph's, ``runtime/batch.py``) instead of its own."""
        self.model = spec if isinstance(spec, OrtModel) else OrtModel(spec, "cpu", threads, spin)
        self.spec = spec = self.model.spec
        self.session = self.model.session
        kv = spec.kv
        self.dtype = _DTYPES[spec.dtype]
        self.cache = cache or KVCache(spec.num_layers, kv.buffer_shape, self.dtype)
        self._vocab = spec.vocab_size
        self._max_step = max_step
        self.binding = self.session.io_binding()
        # A target's prefill graph (OrtModel.prefill_session): a binding of its own over the same cache buffers
        self._prefill_binding = None if self.model.prefill_session is None else self.model.prefill_session.io_binding()
        # The cache buffers are bound once; ORT reads them in place at every run, and an in-place
        # graph also writes them: its present outputs are bound to the same OrtValues.
        self._in_place = kv.in_place
        for name, out_name, buf in zip(kv.key_buffers + kv.value_buffers, kv.new_keys + kv.new_values,
                                       self.cache.keys + self.cache.values):
            value = ort.OrtValue.ortvalue_from_numpy(buf)
            for binding in (self.binding, self._prefill_binding):
                if binding is not None:
                    binding.bind_ortvalue_input(name, value)
                    if self._in_place:
                        binding.bind_ortvalue_output(out_name, value)
        self._past = np.zeros(1, dtype=np.int64)
        # graphs with kv_cache.logits_from compute the LM head for rows [logits_from, n) only: 0 on every pass
        # whose rows' logits are all read, n - 1 where only the last row's are (prefill chunks through ``extend``,
        # a feature head's passes over the target's features: ``last_only``)
        self._logits_from = np.zeros(1, dtype=np.int64) if kv.logits_from else None
        # A model whose 1-token passes compute differently from multi-token passes (measured at export,
        # manifest batch_invariance.min_rows = 2: MatMulNBits with int8 activations on this CPU) runs
        # every 1-token step as a 2-token pass -- the token twice; the second row's KV lands at pos + 1,
        # past the valid length, and is overwritten later -- so decoding and verification agree.
        self._min_rows = spec.min_rows
        self._padded = np.zeros(2, dtype=np.int64)
        # tree-capable graphs (kv_cache.tree) take each row's position and the rows' mutual bias on every pass
        self._tree = self.supports_tree = kv.tree
        self.has_features = spec.features is not None
        self._steps = np.arange(max(max_step, PREFILL_CHUNK) + 2, dtype=np.int64)
        self._zero_bias: dict[int, np.ndarray] = {}
        self._tree_pass: tuple[np.ndarray, np.ndarray] | None = None
        self._bucket = np.zeros(1, dtype=np.int64)  # concat-bucketed graphs only
        # Extra tensors of feature-head engines: a target's features output; a head's own inputs and hidden_out.
        self._extra_out: dict[str, int] = {}  # output name -> width
        self._extra_in: tuple[str, ...] = ()
        if spec.features:
            self._extra_out[spec.features["output"]] = spec.features["size"]
        if spec.feature_head:
            fh = spec.feature_head
            self._extra_out[fh["hidden_output"]] = fh["hidden_size"]
            self._extra_in = (fh["hidden_input"], fh["features_input"], fh["select_input"])
        # by n (and (n, rows) where a pass returns fewer rows of logits than it runs)
        self._outputs: dict[int | tuple[int, int], tuple[np.ndarray, list[np.ndarray], list[np.ndarray], list, dict]] = {}
        self._shared = None  # (the same tuple) for the sizes above max_step, and its views by n
        self._shared_views: dict[int, tuple] = {}
        self._last: dict[str, np.ndarray] = {}
        self.calls = 0

    # -- protocol -----------------------------------------------------------------
    @property
    def min_rows(self) -> int:
        """Rows every pass runs with: 2 pads 1-token steps (see ``runtime.invariance``)."""
        return self._min_rows

    @min_rows.setter
    def min_rows(self, rows: int) -> None:
        if rows not in (1, 2):
            raise ValueError(f"min_rows must be 1 or 2, got {rows}")
        self._min_rows = rows

    @property
    def max_context(self) -> int:
        return self.cache.capacity - (self._min_rows - 1)  # room for a padded last step

    @property
    def vocab_size(self) -> int:
        return self._vocab

    @property
    def length(self) -> int:
        return self.cache.length

    def set_length(self, length: int) -> None:
        self.cache.set_length(length)

    def keep(self, pos: int, rows: list[int]) -> None:
        """Keep a pass's ``rows`` at ``pos`` as consecutive cache entries (a chain's prefix: a length moves; a
        tree's path: see KVCache.compact)."""
        if not self.supports_tree:
            return super().keep(pos, rows)  # a prefix only
        self.cache.compact(pos, rows)

    def features(self) -> np.ndarray:
        """The target's features of the last pass's rows [n, F] (engines with a feature head)."""
        if not self.has_features:
            return super().features()
        return self._last[self.spec.features["output"]]

    def output(self, name: str) -> np.ndarray:
        """An extra output of the last pass (a target's features, a head's hidden_out): [n, width], a view of a
        reused buffer, valid until the next call."""
        if name not in self._last:
            return super().output(name)
        return self._last[name]

    def forward(self, token_ids: np.ndarray, pos: int, *, tree: Tree | None = None,
                inputs: dict[str, np.ndarray] | None = None, last_only: bool = False) -> np.ndarray:
        return self._forward(token_ids, pos, tree, inputs, last_only, self.binding)

    def _forward(self, token_ids: np.ndarray, pos: int, tree: Tree | None, inputs: dict[str, np.ndarray] | None,
                 last_only: bool, binding: ort.IOBinding) -> np.ndarray:
        """``inputs``: a feature head's extra inputs, each [1, n, width] (or [1] for its selector).  ``tree``:
        (positions [n], bias [n, n]) of a tree pass (``runtime/tree.py``); None is a chain.  ``last_only``: only
        the last row's logits are read (a feature head following the context): [1, vocab] where the graph can
        skip the other rows' LM head, [n, vocab] where it cannot -- the last row is ``[-1]`` either way."""
        if tree is not None and not self._tree:
            raise GenerationError(f"{self.spec.role}: this graph takes no tree passes; re-export it (gqa attention)")
        self._tree_pass = tree
        n = len(token_ids)
        if not 0 <= pos <= self.cache.length:
            raise ValueError(f"{self.spec.role}: step at pos {pos} but only {self.cache.length} cache entries are valid")
        if n < 1 or pos + n > self.cache.capacity:
            raise GenerationError(f"{self.spec.role}: {n} tokens at pos {pos} exceed the max context "
                                  f"{self.cache.capacity}; re-export with a larger --max-context")
        if n < self._min_rows:
            if pos + self._min_rows > self.cache.capacity:
                raise GenerationError(f"{self.spec.role}: a padded step at pos {pos} needs {self._min_rows} free "
                                      f"cache entries (max context {self.max_context})")
            padded = self._padded[:self._min_rows]
            padded[:] = token_ids[-1]
            padded[:n] = token_ids
            if inputs:  # the padding row repeats the last one
                inputs = {k: v if v.ndim < 3 else np.concatenate([v] + [v[:, -1:]] * (self._min_rows - n), 1)
                          for k, v in inputs.items()}
            logits = self._run(padded, pos, inputs, binding=binding)  # every row's: n - 1 would give a pad's
            self.cache.set_length(pos + n)
            self._last = {k: v[:n] for k, v in self._last.items()}
            return logits[:n]
        return self._run(token_ids, pos, inputs, last_only, binding)

    def _run(self, token_ids: np.ndarray, pos: int, inputs: dict[str, np.ndarray] | None = None,
             last_only: bool = False, binding: ort.IOBinding | None = None) -> np.ndarray:
        binding = self.binding if binding is None else binding
        n = len(token_ids)
        kv = self.spec.kv
        rows = n  # rows of logits this pass returns
        if self._logits_from is not None:
            rows = 1 if last_only else n
            self._logits_from[0] = n - rows
            binding.bind_cpu_input(kv.logits_from, self._logits_from)
        ids = np.asarray(token_ids, dtype=np.int64).reshape(1, n)  # O(n)
        self._past[0] = pos
        binding.bind_cpu_input(kv.input_ids, ids)
        binding.bind_cpu_input(kv.past_length, self._past)
        if kv.bucket_length:
            self._bucket[0] = bucket_for(pos, kv.context_buckets)
            binding.bind_cpu_input(kv.bucket_length, self._bucket)
        if self._tree:
            tree = self._tree_pass
            if tree is None:  # a chain: consecutive positions, nothing masked beyond causality
                positions = (pos + self._steps[:n]).reshape(1, n)
                bias = self._zero_bias.get(n)
                if bias is None:
                    bias = self._zero_bias.setdefault(n, np.zeros((1, 1, n, n), dtype=np.float32))
            else:
                positions = np.ascontiguousarray(tree[0], dtype=np.int64).reshape(1, n)
                bias = np.ascontiguousarray(tree[1], dtype=np.float32).reshape(1, 1, n, n)
            binding.bind_cpu_input(kv.position_ids, positions)
            binding.bind_cpu_input(kv.tree_bias, bias)
        for name in self._extra_in:
            if inputs is None or name not in inputs:
                raise GenerationError(f"{self.spec.role}: this graph needs the input {name!r} at every step")
            binding.bind_cpu_input(name, inputs[name])
        logits, new_k, new_v, extra = self._bind_outputs(n, rows, binding)
        prefill = binding is self._prefill_binding
        try:
            (self.model.prefill_session if prefill else self.session).run_with_iobinding(binding)
        except Exception as e:  # noqa: BLE001 -- onnxruntime raises its own Fail/RuntimeException types
            graph = self.spec.prefill_graph.path.name if prefill else self.spec.path.name
            raise EngineDirError(f"{self.spec.role}: ONNX Runtime failed running {graph} on {n} tokens "
                                 f"at position {pos}: {str(e)[:500]}. The graph does not fit its manifest; "
                                 "re-export the engine directory.") from None
        self.calls += 1
        if extra:
            self._last = {name: a[0] for name, a in extra.items()}
        if self._in_place:
            self.cache.written(pos, n)
        else:
            self.cache.write(pos, new_k, new_v, n)
        return logits[0]  # [rows, vocab], a view of a reused buffer

    def extend(self, token_ids: np.ndarray, pos: int) -> np.ndarray:
        """The prefill stage: chunks of ``PREFILL_GRAPH_MIN_ROWS`` or more run through the prefill graph where the
        model opened one (OrtModel), the others through the target graph."""
        logits = None
        for start in range(0, len(token_ids), PREFILL_CHUNK):
            chunk = token_ids[start:start + PREFILL_CHUNK]
            binding = self._prefill_binding if self._prefill_binding is not None and \
                len(chunk) >= PREFILL_GRAPH_MIN_ROWS else self.binding
            logits = self._forward(chunk, pos + start, None, None, True, binding)
        assert logits is not None, "extend needs at least one token"
        return logits[-1]

    # -- buffers --------------------------------------------------------------------
    def _bind_outputs(self, n: int, rows: int, binding: ort.IOBinding):
        """Bind preallocated output buffers for an n-token step with ``rows`` rows of logits (n, or 1 where
        the graph skips the others).

        The step shapes the loop uses (n <= max_step) and full prefill chunks get buffers of their own,
        allocated once.  Other sizes (tree passes wider than max_step, the last chunk of a prefill) share
        one buffer grown to the widest seen: their outputs are views, valid until the next such step.
        """
        if rows != n:  # a prefill-stage pass's single row of logits (extras keep n rows): full chunks and the
            # short catch-ups a draft runs between steps get buffers of their own; a prompt's last, odd-sized chunk
            # allocates (once per prefill)
            out = self._outputs.get((n, rows))
            if out is None:
                out = self._allocate(n, None, rows)
                if n == PREFILL_CHUNK or n <= self._max_step:
                    self._outputs[(n, rows)] = out
        else:
            out = self._outputs.get(n)
        if out is None:
            if n <= self._max_step or n == PREFILL_CHUNK:
                out = self._outputs[n] = self._allocate(n, None)
            else:
                if self._shared is None or self._shared[0].shape[1] < n:
                    self._shared = self._allocate(-(-n // 16) * 16, None)  # rows rounded up: fewer regrowths
                    self._shared_views = {}
                out = self._shared_views.get(n)
                if out is None:
                    out = self._allocate(n, self._shared)
                    if self._in_place:  # write-new graphs' new_k / new_v are per call (prefill remainders only)
                        self._shared_views[n] = out
        names = [self.spec.kv.logits]
        if not self._in_place:
            names += [*self.spec.kv.new_keys, *self.spec.kv.new_values]
        names += list(self._extra_out)
        for name, value in zip(names, out[3]):
            binding.bind_ortvalue_output(name, value)
        return out[0], out[1], out[2], out[4]

    def _allocate(self, n: int, base, rows: int | None = None):
        """Output arrays for n rows (``rows`` of logits: n by default), their OrtValues; ``base`` given: views of
        its first n rows."""
        kv = self.spec.kv
        _, kvh, _, hd = kv.buffer_shape
        if base is None:
            logits = np.empty((1, n if rows is None else rows, self._vocab),
                              dtype=np.float32 if self.dtype == np.float32 else self.dtype)
            extra = {name: np.empty((1, n, width), dtype=np.float32) for name, width in self._extra_out.items()}
        else:  # the first n rows of a [1, rows, width] array are contiguous
            logits = base[0][:, :n]
            extra = {name: a[:, :n] for name, a in base[4].items()}
        new_k, new_v = [], []
        if not self._in_place:  # in-place graphs write the cache buffers bound in __init__
            new_k = [np.empty((1, kvh, n, hd), dtype=self.dtype) for _ in kv.new_keys]
            new_v = [np.empty((1, kvh, n, hd), dtype=self.dtype) for _ in kv.new_values]
        values = [ort.OrtValue.ortvalue_from_numpy(a) for a in [logits, *new_k, *new_v, *extra.values()]]
        return logits, new_k, new_v, values, extra
