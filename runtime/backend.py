"""The one protocol the decode loop knows: a compiled model step with its own KV cache.

A backend runs ``token_ids`` (shape [n]) at positions ``[pos, pos + n)`` on top of
the ``pos`` cache entries already there, writes their KV at those positions,
and returns logits for every one of them (shape [n, vocab]).  ``set_length``
rolls the cache back.  ONNX Runtime implements it in ``ort_backend``; a
TensorRT backend implements the same protocol.  The loop never knows which.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np

PREFILL_CHUNK = 128  # prompt tokens per prefill-stage pass: bounds a pass's [n, vocab] logits buffer


class ModelStep(Protocol):
    @property
    def max_context(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def length(self) -> int:
        """Number of valid cache entries."""
        ...

    def step(self, token_ids: np.ndarray, pos: int) -> np.ndarray:
        """Run token_ids [n] at [pos, pos+n) (requires pos <= length); return logits [n, vocab].

        The returned array may be a view of a reused buffer: valid until the next call.
        """
        ...

    def set_length(self, length: int) -> None:
        """Keep the first ``length`` cache entries (rollback).  Copies nothing."""
        ...

    def prefill(self, token_ids: np.ndarray) -> np.ndarray:
        """Reset the cache and run the whole prompt; return logits of its last token [vocab]."""
        ...

    def extend(self, token_ids: np.ndarray, pos: int) -> np.ndarray:
        """Run token_ids at [pos, ...) in prefill-sized chunks (the prefill stage: on TensorRT the one
        dynamic profile, so any length is planned for); return logits of the last token [vocab].  Up to
        ``PREFILL_CHUNK`` tokens are one pass (a feature head's prefill reads that pass's features)."""
        ...
