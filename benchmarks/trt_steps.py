#!/usr/bin/env python
"""TensorRT micro-benchmark (issue 7): per-step latency with and without CUDA graphs, and
speculative vs target-only tokens/s.  NOT YET RUN: needs a CUDA GPU with TensorRT + cuda-python.

Takes two engine directories of the same pair, built with ``specrt build``: a ``--attention
concat`` export (eager steps: its shapes change with the context) and a ``--attention bucketed``
export (steps replayed as CUDA graphs per bucket).  For each: the median target step time for 1 and
k + 1 tokens at a few contexts, the graph-cache counters, and greedy tokens/s target-only vs
speculative at k, with the speculative output checked against target-only.

Usage: python benchmarks/trt_steps.py CONCAT_DIR BUCKETED_DIR [--k 4] [--repeats 50]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from specrt.runtime import Engine
from specrt.runtime.trt_backend import TrtModelStep


def trt_engine(path: str) -> Engine:
    return Engine.load(path, backend="tensorrt")


def step_ms(step: TrtModelStep, n: int, pos: int, repeats: int) -> float:
    ids = np.arange(n, dtype=np.int64) + 7
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step.forward(ids, pos)  # returns after the logits reached the host (the loop's sync point)
        samples.append(time.perf_counter() - t0)
        step.set_length(pos)
    return statistics.median(samples) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("concat")
    ap.add_argument("bucketed")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=50)
    a = ap.parse_args()
    for label, path in (("eager (concat)", a.concat), ("CUDA graphs (bucketed)", a.bucketed)):
        engine = trt_engine(path)
        target = engine.sequence().target
        max_ctx = target.max_context
        target.prefill(np.arange(max_ctx - a.k - 2, dtype=np.int64) % 1000 + 5)
        print(f"\n{label}: {path}")
        for pos in sorted({16, max_ctx // 4, max_ctx // 2, max_ctx - a.k - 2}):
            one, many = step_ms(target, 1, pos, a.repeats), step_ms(target, a.k + 1, pos, a.repeats)
            print(f"  context {pos:>5}: 1-token step {one:6.2f} ms, {a.k + 1}-token step {many:6.2f} ms")
        if getattr(target, "bucketed", False):
            print(f"  graph cache: {target.graphs.stats}")
        prompt = engine.encode("def quicksort(items):\n")
        base = engine.generate(prompt, max_new_tokens=128, use_draft=False)
        spec = engine.generate(prompt, max_new_tokens=128, k=a.k)
        print(f"  target-only {base.stats.tokens_per_s:.1f} tok/s, speculative k={a.k} "
              f"{spec.stats.tokens_per_s:.1f} tok/s ({spec.stats.tokens_per_s / base.stats.tokens_per_s:.2f}x), "
              f"acceptance {spec.stats.acceptance_rate:.2f}, identical: {spec.token_ids == base.token_ids}")


if __name__ == "__main__":
    main()
