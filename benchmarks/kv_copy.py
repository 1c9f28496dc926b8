#!/usr/bin/env python
"""How much does the KV copy cost, and what does the in-place graph save?  (issues 3 and 9)

Python never copies the cache.  Inside ONNX Runtime, a concat-style graph (``--attention
concat``) slices each layer's buffer to ``past_length`` and concatenates the new KV: O(context)
per layer and per step.  An in-place graph (``--attention gqa``) writes the new entries into the
buffer and attends over it where it lies.  For every engine given, at contexts 64 / 512 / 1024+:

  * the target's 1-token step and (k+1)-token step time at that past length;
  * for concat engines, the Slice + Concat pattern alone, in a one-op-pair ONNX graph with the
    model's K/V shapes, times 2 x layers: the copy cost inside a step.

Give the in-place and the concat export of the same pair to compare them side by side.

Usage: python benchmarks/kv_copy.py ENGINE_DIR [ENGINE_DIR ...] [--repeats 30] [--json-out FILE]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper
from specrt.runtime.manifest import load_manifest
from specrt.runtime.ort_backend import OrtModelStep, session_options


def copy_graph(kvh: int, max_ctx: int, hd: int) -> ort.InferenceSession:
    ints = lambda name, v: helper.make_tensor(name, TensorProto.INT64, [len(v)], v)
    nodes = [
        helper.make_node("Slice", ["cache", "zero", "past_length", "axis2"], ["past"]),
        helper.make_node("Concat", ["past", "new"], ["present"], axis=2),
        helper.make_node("ReduceSum", ["present"], ["out"], keepdims=0),  # keep the result alive, tiny output
    ]
    g = helper.make_graph(nodes, "kvcopy", [
        helper.make_tensor_value_info("cache", TensorProto.FLOAT, [1, kvh, max_ctx, hd]),
        helper.make_tensor_value_info("past_length", TensorProto.INT64, [1]),
        helper.make_tensor_value_info("new", TensorProto.FLOAT, [1, kvh, "n", hd])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [])],
        initializer=[ints("zero", [0]), ints("axis2", [2])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(model.SerializeToString(), session_options(None), providers=["CPUExecutionProvider"])


def timed(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples) * 1e3


def measure(engine: str, repeats: int, k: int, threads: int | None) -> list[dict]:
    spec = load_manifest(engine, check_hashes=False).target
    step = OrtModelStep(spec, threads=threads)
    _, kvh, max_ctx, hd = spec.kv.buffer_shape
    copier = None if spec.kv.in_place else copy_graph(kvh, max_ctx, hd)
    rng = np.random.default_rng(0)
    step.prefill(rng.integers(0, min(1000, spec.vocab_size), size=max_ctx - k - 2))  # fill the cache once
    kind = "in-place (GroupQueryAttention)" if spec.kv.in_place else "concat"
    print(f"\n{engine}: {kind}, {spec.num_layers} layers, KV {kvh} x {hd}, max context {max_ctx}, {spec.dtype}")
    print(f"{'context':>8} {'1-tok step ms':>14} {f'{k + 1}-tok step ms':>14} {'in-graph KV copy ms':>20} "
          f"{'copy share of 1-tok':>20}")
    rows = []
    for ctx in (64, 512, 2048):
        pos = min(ctx, max_ctx - k - 2)
        filled = step.length

        def run(ids, pos=pos, filled=filled):
            step.forward(ids, pos)
            step.cache.length = filled  # timing only: every entry below `filled` still holds prefill data

        one = timed(lambda: run(np.array([7])), repeats)
        many = timed(lambda: run(np.arange(k + 1) + 7), repeats)
        copy = 0.0
        if copier is not None:
            feed = {"cache": step.cache.keys[0], "past_length": np.array([pos], dtype=np.int64),
                    "new": np.zeros((1, kvh, 1, hd), dtype=np.float32)}
            copy = timed(lambda feed=feed: copier.run(None, feed), repeats) * 2 * spec.num_layers
        rows.append({"engine": engine, "update": spec.kv.update, "context": pos, "step_1_ms": round(one, 3),
                     f"step_{k + 1}_ms": round(many, 3), "kv_copy_ms": round(copy, 3),
                     "copy_share": round(copy / one, 3)})
        print(f"{pos:>8} {one:>14.2f} {many:>14.2f} {copy:>20.2f} {100 * copy / one:>19.0f}%")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines", nargs="+")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json-out", default=None)
    a = ap.parse_args()
    rows = [r for engine in a.engines for r in measure(engine, a.repeats, a.k, a.threads)]
    if len(a.engines) > 1:
        first = [r for r in rows if r["engine"] == a.engines[0]]
        print(f"\nstep time of each engine / {a.engines[0]} (same context):")
        for engine in a.engines[1:]:
            mine = [r for r in rows if r["engine"] == engine]
            ratios = ", ".join(f"ctx {x['context']}: 1-tok {y['step_1_ms'] / x['step_1_ms']:.2f}x, "
                               f"{a.k + 1}-tok {y[f'step_{a.k + 1}_ms'] / x[f'step_{a.k + 1}_ms']:.2f}x"
                               for x, y in zip(first, mine))
            print(f"  {engine}: {ratios}")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
