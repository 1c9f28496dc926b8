#!/usr/bin/env python
"""TensorRT on a GPU: speculative tokens through the plans against ONNX Runtime's on the CPU, and per-pass latency
by k with and without CUDA graphs.  NOT YET RUN: needs an NVIDIA GPU, TensorRT-RTX or TensorRT, and cuda-python
(``scripts/gpu_check.sh`` runs it).

Takes engine directories of one pair built with ``specrt build`` (a ``--attention bucketed`` export: shapes fixed
per context bucket, so passes replay as CUDA graphs -- TensorRT-RTX's own, or specrt's capture on TensorRT 10 --
and optionally a ``--attention concat`` one, whose shapes change every step).  For each: greedy speculative tokens
at every k and target-only, each checked against the same engine directory decoded by ONNX Runtime on the CPU;
then the median target pass time for 1 and k + 1 rows at a few contexts, with CUDA graphs and eagerly.

    python benchmarks/trt_steps.py .cache/demo/engine-trt [.cache/gpu/concat] --repeats 30
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
from specrt.runtime import Engine

PROMPTS = ["def quicksort(items):\n", "The three laws of thermodynamics are"]


def pass_ms(step, n: int, pos: int, repeats: int) -> float:
    ids = np.arange(n, dtype=np.int64) + 7
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step.forward(ids, pos)  # returns after the logits reached the host (the loop's sync point)
        samples.append(time.perf_counter() - t0)
        step.set_length(pos)
    return statistics.median(samples) * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines", nargs="+", help="engine directories with TensorRT plans (specrt build)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    a = ap.parse_args()
    ok = True
    for path in a.engines:
        cpu = Engine.load(path)
        gpu = Engine.load(path, backend="tensorrt")
        print(f"\n{path}: {gpu.target_model.lib.flavour} {gpu.target_model.lib.version}, "
              f"{gpu.manifest.target.raw['tensorrt']['precision']}")
        for text in PROMPTS:
            ids = cpu.encode(text)
            ref = cpu.generate(ids, max_new_tokens=a.max_new_tokens, use_draft=False, reuse_prefix=False).token_ids
            base = gpu.generate(ids, max_new_tokens=a.max_new_tokens, use_draft=False, reuse_prefix=False)
            same = base.token_ids == ref
            line = [f"target-only {base.stats.tokens_per_s:.0f} tok/s, same as ONNX Runtime: {same}"]
            for k in gpu.manifest.k_values:
                r = gpu.generate(ids, max_new_tokens=a.max_new_tokens, reuse_prefix=False, k=k, policy="fixed", tree_nodes=0,
                                 drafter="model" if gpu.draft_model
                                 else "ngram")
                same &= r.token_ids == ref
                line.append(f"k={k} {r.stats.tokens_per_s:.0f} tok/s ({r.stats.tokens_per_s / base.stats.tokens_per_s:.2f}x)"
                            f"{'' if r.token_ids == ref else ' DIFFERS'}")
            ok &= same
            print(f"  {text!r}: " + "; ".join(line))
        for graphs in (True, False):
            engine = gpu if graphs else Engine.load(path, backend="tensorrt", cuda_graphs=False)
            target = engine.sequence().target
            max_ctx = target.max_context
            target.prefill(np.arange(max_ctx // 2, dtype=np.int64) % 1000 + 5)
            print(f"  passes {'with CUDA graphs' if graphs else 'eager'} (median ms by rows):")
            for pos in (64, max_ctx // 4, max_ctx // 2):
                rows = [1] + [k + 1 for k in engine.manifest.k_values]
                print(f"    context {pos:>5}: " + ", ".join(f"{n} rows {pass_ms(target, n, pos, a.repeats):.2f}"
                                                            for n in rows))
            if getattr(target, "graphs", None) is not None:
                print(f"    specrt's graph cache: {target.graphs.stats}")
    print("\nall tokens identical to ONNX Runtime" if ok else "\nTOKENS DIFFER from ONNX Runtime")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
