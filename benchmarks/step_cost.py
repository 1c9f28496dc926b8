#!/usr/bin/env python
"""Per-pass cost of each model of one or more engine directories, and whether the target is batch-invariant.

For every engine: the target's and the draft's step time for n = 1, 2, 3, 5 tokens at a fixed
context (the numbers the expected-speedup formula needs: c = draft step / target step, and how
verification cost grows with k + 1), then the batch-invariance check behind losslessness: the same
three positions scored by three 1-token passes and by one 3-token pass -- the largest logit
difference, and whether the argmax agrees.  Quantized targets at MatMulNBits accuracy level 4 fail
this (see export/quantize.py).

Usage: python benchmarks/step_cost.py ENGINE_DIR [ENGINE_DIR ...] [--context 200] [--repeats 15]
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from specrt.runtime.manifest import load_manifest
from specrt.runtime.ort_backend import OrtModelStep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines", nargs="+")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=15)
    a = ap.parse_args()
    ids = (np.arange(a.context + 8) * 7919) % 5000 + 10  # deterministic, arbitrary tokens
    widths = (1, 2, 3, 5)
    print(f"median ms per pass at context {a.context} (target 2 threads, draft 1 thread)")
    print(f"{'engine':<28} {'model':<7}" + "".join(f"{f'n={n}':>9}" for n in widths) + "   batch-invariance (target)")
    for engine in a.engines:
        m = load_manifest(engine, check_hashes=False)
        for spec, threads in ((m.target, 2), (m.draft, 1)):
            step = OrtModelStep(spec, threads=threads)
            step.prefill(ids[: a.context])
            cells = []
            for n in widths:
                samples = []
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    step.step(ids[a.context:a.context + n], a.context)
                    samples.append(time.perf_counter() - t0)
                    step.set_length(a.context)
                cells.append(f"{statistics.median(samples) * 1e3:>9.1f}")
            note = ""
            if spec.role == "target":
                singles = []
                for i in range(3):
                    singles.append(step.step(ids[a.context + i:a.context + i + 1], a.context + i)[0].copy())
                step.set_length(a.context)
                joint = step.step(ids[a.context:a.context + 3], a.context).copy()
                diff = max(float(np.abs(singles[i] - joint[i]).max()) for i in range(3))
                same = all(singles[i].argmax() == joint[i].argmax() for i in range(3))
                note = f"   max |1-token - 3-token| logit {diff:.1e}, argmax {'same' if same else 'DIFFERS'}"
            print(f"{engine[-28:]:<28} {spec.role:<7}" + "".join(cells) + note, flush=True)


if __name__ == "__main__":
    main()
