"""The backend contract: everything the decode loop, the drafters and the engine use of a compiled model.

Two objects per backend:

* a ``Model`` -- the loaded weights (an ONNX Runtime session, a deserialized TensorRT engine), opened once per
  engine directory and shared by every sequence that runs it;
* a ``ModelStep`` -- one sequence on that model: its own preallocated KV cache and bindings.  ``forward``
  runs ``token_ids`` (shape [n]) at positions ``[pos, pos + n)`` on top of the ``pos`` cache entries already
  there, writes their KV at those positions and returns logits for each of them (shape [n, vocab]);
  ``set_length`` rolls the cache back and ``keep`` keeps a verification pass's accepted rows.

Optional capabilities are declared here with their defaults (a backend that has one overrides it): tree
passes (``supports_tree``, ``forward(..., tree=)``, ``keep`` of non-consecutive rows), the target's features
for a feature head (``has_features``, ``features()``) and a head's extra inputs and outputs (``inputs=``,
``output()``).  Nothing outside a backend asks what class it is.  ONNX Runtime implements the contract in
``ort_backend``, TensorRT in ``trt_backend``; ``open_model`` chooses by name.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import numpy as np
from specrt.runtime.errors import EngineDirError

if TYPE_CHECKING:
    from specrt.runtime.manifest import ModelSpec

# Prompt tokens per prefill-stage pass.  Measured on the demo target, a 1,000-token prompt, 2 threads: int8-rows
# 1.10 s at 128, 0.98 s at 256, 0.97 s at 512; int4 1.47 / 1.31 / 1.46 s; fp32 1.44 / 1.40 s (128 / 256).
PREFILL_CHUNK = 256
BACKENDS = ("onnxruntime", "tensorrt")
Tree = tuple[np.ndarray, np.ndarray]  # a tree pass: each row's position [n], the rows' additive bias [n, n]


class ModelStep(Protocol):
    """One sequence on a compiled model.  Backends subclass this Protocol explicitly and inherit the defaults of
    the capabilities they lack."""

    spec: ModelSpec
    max_context: int  # cache entries a sequence may fill
    vocab_size: int
    length: int  # valid cache entries (read-only: moved by forward, set_length and keep)
    supports_tree: bool = False  # forward(..., tree=) and keep() of any ascending rows
    has_features: bool = False  # features(): the target's hidden states a feature head reads

    @property
    def min_rows(self) -> int:
        """Rows every pass runs with: 2 pads 1-token passes (see ``runtime.invariance``); 1 otherwise."""
        return 1

    @min_rows.setter
    def min_rows(self, rows: int) -> None:
        if rows != 1:
            raise ValueError(f"{type(self).__name__} runs every pass with the rows it is given (min_rows 1), "
                             f"got {rows}")

    def forward(self, token_ids: np.ndarray, pos: int, *, tree: Tree | None = None,
                inputs: dict[str, np.ndarray] | None = None, last_only: bool = False) -> np.ndarray:
        """Run token_ids [n] at [pos, pos+n) (requires pos <= length); return logits [n, vocab].

        ``tree``: a tree pass (``runtime/tree.py``), None for a chain.  ``inputs``: a feature head's extra
        inputs.  ``last_only``: only the last row's logits are read (the result may then hold that row only;
        ``[-1]`` is it either way).  The returned array may be a view of a reused buffer: valid until the next
        call."""
        ...

    def set_length(self, length: int) -> None:
        """Keep the first ``length`` cache entries (rollback).  Copies nothing."""
        ...

    def keep(self, pos: int, rows: list[int]) -> None:
        """After a verification pass at ``pos``: keep its ``rows`` (offsets from pos, ascending, 0 first) as the
        consecutive cache entries [pos, pos + len(rows)).  A chain keeps a prefix (a length moves); a tree's
        accepted path may have to move (``supports_tree`` backends only)."""
        if list(rows) != list(range(len(rows))):
            raise EngineDirError(f"{self.spec.role}: this backend takes no tree passes, so it keeps a prefix of "
                                 f"a pass's rows only, got {list(rows)[:8]}")
        self.set_length(pos + len(rows))

    def prefill(self, token_ids: np.ndarray) -> np.ndarray:
        """Reset the cache and run the whole prompt; return logits of its last token [vocab]."""
        self.set_length(0)
        return self.extend(token_ids, 0)

    def extend(self, token_ids: np.ndarray, pos: int) -> np.ndarray:
        """Run token_ids at [pos, ...) in prefill-sized chunks (the prefill stage: on TensorRT the one dynamic
        profile, so any length is planned for); return logits of the last token [vocab].  Up to
        ``PREFILL_CHUNK`` tokens are one pass (a feature head's prefill reads that pass's features)."""
        ...

    def features(self) -> np.ndarray:
        """The target's features of the last pass's rows [n, F] (``has_features`` backends only)."""
        raise EngineDirError(f"{self.spec.role}: this graph outputs no features (a feature head needs a target "
                             "exported with --draft-head)")

    def output(self, name: str) -> np.ndarray:
        """An extra output of the last pass ([n, width], a view of a reused buffer): a head's hidden state."""
        raise EngineDirError(f"{self.spec.role}: this backend has no extra output {name!r}")


class Model(Protocol):
    """A compiled model, loaded once and shared by every sequence that runs it."""

    spec: ModelSpec

    def new_step(self, max_step: int) -> ModelStep:
        """One more sequence on this model: its own KV cache, sized by the manifest; passes of up to ``max_step``
        rows get preallocated output buffers."""
        ...


def open_model(spec: ModelSpec, backend: str = "onnxruntime", *, threads: int | None = None, spin: bool = True,
               k_values: tuple[int, ...] = (), device: int = 0, cuda_graphs: bool = True,
               prefill_graph: str = "auto", attention_kernel: str | None = None) -> Model:
    """Load ``spec``'s graph with ``backend`` (one of ``BACKENDS``): ONNX Runtime on the CPU (``threads``,
    ``spin``, ``prefill_graph``: whether a target's prefill graph runs its prefill chunks, auto | on | off;
    ``attention_kernel``: GroupQueryAttention's kernel, auto | flash | unfused, None for ONNX Runtime's own), or
    TensorRT's plan on CUDA ``device`` (``k_values``: the draft lengths it must have profiles for;
    ``cuda_graphs=False`` runs every pass eagerly)."""
    if backend == "onnxruntime":
        from specrt.runtime.ort_backend import OrtModel

        return OrtModel(spec, "cpu", threads, spin, prefill_graph, attention_kernel)
    if backend == "tensorrt":
        from specrt.runtime.trt_backend import TrtModel

        return TrtModel(spec, k_values, device, cuda_graphs)
    raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
