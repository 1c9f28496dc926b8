"""Preallocated caches: rollback by length is exact, and a step copies O(n), not O(context)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from specrt.runtime.kv_cache import KVCache
from specrt.runtime.manifest import load_manifest
from specrt.runtime.ort_backend import OrtModelStep


@pytest.fixture(scope="module")
def steps(engines):
    m = load_manifest(engines["close"])
    return OrtModelStep(m.target, max_step=9), OrtModelStep(m.target, max_step=9)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 9), st.integers(0, 9)), min_size=1, max_size=8), st.integers(0, 10_000))
def test_rollback_then_step_equals_fresh_run(steps, ops, seed):
    """Random steps and rollbacks on one cache; each step's logits equal a fresh run over the same context."""
    model, fresh = steps
    rng = np.random.default_rng(seed)
    context: list[int] = [int(rng.integers(0, 300))]
    model.prefill(np.array(context))
    for n, back in ops:
        pos = max(1, len(context) - back)  # roll back `back` tokens (keep at least one)
        if pos + n > model.max_context:
            break
        del context[pos:]
        model.set_length(pos)
        new = rng.integers(0, 300, size=n)
        got = model.forward(new, pos).copy()
        context += new.tolist()
        ref = fresh.prefill(np.array(context))  # logits of the last token, computed from scratch
        np.testing.assert_allclose(got[-1], ref, atol=1e-4)
        assert model.length == len(context)


def test_set_length_moves_a_number_only():
    cache = KVCache(2, (1, 2, 16, 4), np.float32)
    new = [np.ones((1, 2, 3, 4), np.float32)] * 2
    cache.write(0, new, new, 3)
    before = [b.copy() for b in cache.keys]
    cache.set_length(1)
    assert cache.length == 1 and all((a == b).all() for a, b in zip(before, cache.keys))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        cache.set_length(2)


def test_step_does_not_copy_the_cache(engines):
    """The cache buffers bound to ORT are the same numpy memory before and after steps (no reallocation),
    and a step's Python-side write touches only the new positions."""
    m = load_manifest(engines["close"])
    model = OrtModelStep(m.target)
    ptrs = [b.ctypes.data for b in model.cache.keys + model.cache.values]
    model.prefill(np.arange(1, 20))
    sentinel = model.cache.keys[0][:, :, 30:, :].copy()
    model.forward(np.array([5, 6, 7]), 19)
    assert [b.ctypes.data for b in model.cache.keys + model.cache.values] == ptrs
    np.testing.assert_array_equal(model.cache.keys[0][:, :, 30:, :], sentinel)  # untouched beyond pos + n
    assert model.length == 22
