"""Preallocated KV cache: one [1, kv_heads, max_context, head_dim] buffer per layer and per K/V.

The cache is written *by position*: a step at ``pos`` writes its n new entries to
``[pos, pos + n)``.  Rolling back after a rejection is ``set_length`` — a rejected
entry is simply overwritten by the next step, nothing is copied or cleared.
"""
from __future__ import annotations

import itertools

import numpy as np


class KVCache:
    def __init__(self, num_layers: int, buffer_shape: tuple[int, int, int, int], dtype: np.dtype):
        self.keys = [np.zeros(buffer_shape, dtype=dtype) for _ in range(num_layers)]  # [1, kvh, max_ctx, hd]
        self.values = [np.zeros(buffer_shape, dtype=dtype) for _ in range(num_layers)]
        self.capacity = buffer_shape[2]
        self.length = 0  # entries [0, length) are valid

    @classmethod
    def over(cls, keys: list[np.ndarray], values: list[np.ndarray]) -> KVCache:
        """A cache over buffers that exist already: one slot of a batch's buffers (contiguous [1, ...] views)."""
        cache = cls.__new__(cls)
        cache.keys, cache.values, cache.capacity, cache.length = keys, values, keys[0].shape[2], 0
        return cache

    def write(self, pos: int, new_keys: list[np.ndarray], new_values: list[np.ndarray], n: int) -> None:
        """Store n new entries (arrays [1, kvh, >=n, hd]) at [pos, pos+n).  Copies O(n), never O(length)."""
        assert 0 <= pos <= self.length and pos + n <= self.capacity, (pos, n, self.length, self.capacity)
        for buf, new in zip(self.keys, new_keys):
            buf[:, :, pos:pos + n, :] = new[:, :, :n, :]
        for buf, new in zip(self.values, new_values):
            buf[:, :, pos:pos + n, :] = new[:, :, :n, :]
        self.length = pos + n

    def written(self, pos: int, n: int) -> None:
        """The step itself wrote n entries at [pos, pos+n) (an in-place graph): only the length moves."""
        assert 0 <= pos <= self.length and pos + n <= self.capacity, (pos, n, self.length, self.capacity)
        self.length = pos + n

    def compact(self, pos: int, rows: list[int]) -> None:
        """After a tree pass at ``pos``: keep the entries of ``rows`` (offsets from pos, ascending, the root's 0
        first) as the consecutive entries [pos, pos + len(rows)).  Moves at most len(rows) entries per layer --
        nothing proportional to the context -- and a source is never overwritten before it is read (row j's
        source offset is >= j, and the fancy-indexed right side is copied first)."""
        assert rows and rows[0] == 0 and all(a < b for a, b in itertools.pairwise(rows)), rows
        src = pos + np.asarray(rows)
        assert pos + len(rows) <= self.length and src[-1] < self.capacity, (pos, rows, self.length)
        if len(rows) > 1 and rows[-1] != len(rows) - 1:  # a chain prefix is already in place
            for buf in (*self.keys, *self.values):
                buf[:, :, pos:pos + len(rows), :] = buf[:, :, src, :]
        self.length = pos + len(rows)

    def set_length(self, length: int) -> None:
        """Roll back (or confirm) to ``length`` valid entries.  Moves a number; copies nothing."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cache length must be in [0, {self.length}], got {length}")
        self.length = length

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for b in self.keys) + sum(b.nbytes for b in self.values)
