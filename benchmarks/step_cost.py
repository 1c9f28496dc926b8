#!/usr/bin/env python
"""Per-pass cost of each model of one or more engine directories, and whether the target is batch-invariant.

For every engine: the target's and the draft's step time for n = 1, 2, 3, 5 tokens (``--widths``) at a fixed
context (the numbers the expected-speedup formula needs: c = draft step / target step, and how
verification cost grows with k + 1), the 1-token step as the runtime runs it (padded to 2 rows where
needed), then the row-invariance measurement behind losslessness (``runtime/invariance.py``).

Usage: python benchmarks/step_cost.py ENGINE_DIR [ENGINE_DIR ...] [--context 200] [--repeats 15] [--widths 1,9,33]
(33: a tree of 32 and its root)
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from specrt.runtime import invariance
from specrt.runtime.manifest import load_manifest
from specrt.runtime.ort_backend import OrtModelStep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines", nargs="+")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--widths", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2, 3, 5],
                    help="tokens per pass to time (default 1,2,3,5)")
    a = ap.parse_args()
    widths = a.widths
    ids = (np.arange(a.context + max(widths)) * 7919) % 5000 + 10  # deterministic, arbitrary tokens
    print(f"median ms per pass at context {a.context} (target 2 threads, draft 1 thread); 'n=1 as run' is the "
          "1-token step the runtime really runs (2 rows where the target is padded)")
    print(f"{'engine':<28} {'model':<7}" + "".join(f"{f'n={n}':>9}" for n in widths) + f"{'n=1 as run':>12}"
          + "   row invariance (target)")
    for engine in a.engines:
        m = load_manifest(engine, check_hashes=False)
        # a feature head's passes need the target's features: drafters.md has its costs (head_catch_up.py)
        for spec, threads in ((s, t) for s, t in ((m.target, 2), (m.draft, 1))
                              if s is not None and s.feature_head is None):
            step = OrtModelStep(spec, threads=threads)
            as_run = step.min_rows

            def timed(n: int, step: OrtModelStep = step) -> str:
                step.prefill(ids[: a.context])
                samples = []
                for _ in range(a.repeats):
                    t0 = time.perf_counter()
                    step.forward(ids[a.context:a.context + n], a.context)
                    samples.append(time.perf_counter() - t0)
                    step.set_length(a.context)
                return f"{statistics.median(samples) * 1e3:.1f}"

            step.min_rows = 1
            cells = [f"{timed(n):>9}" for n in widths]
            step.min_rows = as_run
            cells.append(f"{timed(1):>12}")
            note = ""
            if spec.role == "target":
                inv = invariance.measure(step)
                note = (f"   1-token vs multi-token pass: max logit diff {inv.single_vs_multi:.1e}; between "
                        f"multi-token passes {inv.multi_vs_multi:.1e} -> min_rows {inv.min_rows}")
            print(f"{engine[-28:]:<28} {spec.role:<7}" + "".join(cells) + note, flush=True)


if __name__ == "__main__":
    main()
