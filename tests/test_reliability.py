"""Bad input and misuse: interrupted streams, NaN logits, concurrency, superseded streams, a soak run."""
from __future__ import annotations

import dataclasses
import os
import threading

import numpy as np
import pytest
from specrt.runtime import Engine, EnginePool, GenerationError


@pytest.fixture(scope="module")
def engine(engines):
    e = Engine.load(engines["close"])
    e.manifest = dataclasses.replace(e.manifest, eos_token_ids=frozenset())
    return e


def test_interrupted_stream_keeps_tokens_and_engine_stays_usable(engine):
    stream = engine.stream([5, 17, 33], max_new_tokens=30, k=4)
    with pytest.raises(KeyboardInterrupt):
        for i, _ in enumerate(stream):
            if i == 2:
                raise KeyboardInterrupt
    partial = list(stream.result.token_ids)
    assert 3 <= len(partial) < 30
    full = engine.generate([5, 17, 33], max_new_tokens=30, k=4)
    assert full.token_ids[: len(partial)] == partial  # what we kept was right, and the engine still works


def test_nan_logits_are_an_error_not_garbage(engine, monkeypatch):
    target = engine.default_sequence.target
    real = target.forward

    def poisoned(ids, pos, **kw):
        out = real(ids, pos, **kw)
        if pos > 8:
            out = out.copy()
            out[0, 3] = np.nan
        return out

    monkeypatch.setattr(target, "forward", poisoned)
    with pytest.raises(GenerationError, match="NaN/inf logits.*Re-export"):
        engine.generate([5, 17, 33], max_new_tokens=30, k=2)
    monkeypatch.undo()
    assert len(engine.generate([5, 17, 33], max_new_tokens=5, k=2).token_ids) == 5


def test_empty_prompt(engine):
    with pytest.raises(GenerationError, match="empty"):
        engine.generate([], max_new_tokens=5)
    with pytest.raises(GenerationError, match="empty"):
        engine.generate("", max_new_tokens=5)


def test_superseded_stream_fails_loudly(engine):
    first = iter(engine.stream([5, 17, 33], max_new_tokens=20, k=2))
    next(first)
    engine.generate([1, 2], max_new_tokens=3, k=2)  # reuses the caches
    with pytest.raises(GenerationError, match="superseded"):
        list(first)


def test_engine_pool_concurrent_generations_equal_single_threaded(engines):
    prompts = [[5, 17, 33], [40, 41, 42, 43], [7], [100, 200, 300]]
    single = Engine.load(engines["close"])
    expected = [single.generate(p, max_new_tokens=20, k=4).token_ids for p in prompts]
    pool = EnginePool(engines["close"], size=2, threads=1)
    results: dict[int, list[int]] = {}

    def work(i):
        results[i] = pool.generate(prompts[i % 4], max_new_tokens=20, k=4).token_ids

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[i] for i in range(8)] == expected * 2


def test_soak_memory_stays_flat(engine):
    """~3000 steps with random policies, k and sampling; RSS must not keep growing."""
    rng = np.random.default_rng(0)

    def burst(n):
        for _ in range(n):
            policy = str(rng.choice(["fixed", "confidence", "adaptive", "budget"]))
            engine.generate(rng.integers(1, 300, size=int(rng.integers(1, 20))).tolist(), max_new_tokens=40,
                            k=int(rng.choice([1, 2, 4, 8])), policy=policy,
                            temperature=float(rng.choice([0.0, 0.8])), seed=int(rng.integers(1 << 30)))

    burst(20)  # warm-up: every output-buffer shape is allocated once
    before = rss_mb()
    burst(150)
    after = rss_mb()
    print(f"RSS before {before:.1f} MB, after {after:.1f} MB")
    assert after - before < 50, (before, after)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
