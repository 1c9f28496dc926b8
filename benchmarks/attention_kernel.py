"""GroupQueryAttention's two CPU kernels in ONNX Runtime, flash (its default) and unfused, on one engine's target,
measured side by side in one process
(``attention_kernel="flash"`` and ``"unfused"``: two sessions of the same graph): prompt prefill (chunks of 256 from
position 0) and 1-, 5- and 9-row passes at a context of N cache entries, repeats interleaved item by item.

Every session is opened without spinning threads: several sessions in one process would otherwise slow each other
down (a session's threads busy-wait after its run), which measures the neighbours, not the kernel.

It also prints how far the two kernels' logits are apart after the same prefill (float rounding for fp32; an int8
target's per-row activation scales can turn that into larger differences, which is why the choice is made per
engine load and shared by target-only and speculative generation).

    python benchmarks/attention_kernel.py .cache/demo/engine-q8t .cache/demo/engine --contexts 1024,2000
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from specrt.runtime.manifest import load_manifest
from specrt.runtime.ort_backend import OrtModel


def open_models(engine: Path) -> dict[str, OrtModel]:
    spec = load_manifest(engine, check_hashes=False).target
    return {kernel: OrtModel(spec, spin=False, prefill_graph="off", attention_kernel=kernel)
            for kernel in ("flash", "unfused")}


def measure(models: dict[str, OrtModel], contexts: list[int], repeats: int) -> dict[str, dict[str, float]]:
    steps = {name: m.new_step(9) for name, m in models.items()}
    ids = np.random.default_rng(0).integers(100, 20000, max(contexts) + 16).astype(np.int64)
    times: dict[str, dict[str, list[float]]] = {name: {} for name in steps}

    def timed(name: str, key: str, run) -> None:
        t0 = time.perf_counter()
        run()
        times[name].setdefault(key, []).append(time.perf_counter() - t0)

    # interleaved item by item: the shared machine's drift hits every session alike
    for _ in range(repeats):
        for ctx in contexts:
            for name, step in steps.items():
                step.set_length(0)
                timed(name, f"prefill {ctx}", lambda step=step, ctx=ctx: step.prefill(ids[:ctx]))
            for n in (1, 5, 9):
                for name, step in steps.items():
                    step.set_length(ctx)
                    timed(name, f"{n} rows @{ctx}",
                          lambda step=step, ctx=ctx, n=n: step.forward(ids[ctx:ctx + n], ctx))
    return {name: {k: 1000 * float(np.median(v)) for k, v in t.items()} for name, t in times.items()}


def logit_gap(models: dict[str, OrtModel], tokens: int = 512) -> tuple[float, bool]:
    ids = np.random.default_rng(1).integers(100, 20000, tokens + 5).astype(np.int64)
    out = {}
    for name in ("flash", "unfused"):
        step = models[name].new_step(9)
        step.prefill(ids[:tokens])
        out[name] = step.forward(ids[tokens:tokens + 5], tokens).copy()
    a, b = out.values()
    return float(np.abs(a - b).max()), bool((a.argmax(-1) == b.argmax(-1)).all())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines", nargs="+", type=Path, help="engine directories (in-place GroupQueryAttention targets)")
    ap.add_argument("--contexts", default="1024,2000", help="prompt lengths / cache entries (default 1024,2000)")
    ap.add_argument("--repeats", type=int, default=5, help="median of this many (default 5)")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    for engine in args.engines:
        models = open_models(engine)
        result = measure(models, contexts, args.repeats)
        keys = list(next(iter(result.values())))
        print(f"\n{engine} (ms, median of {args.repeats})")
        print(f"| kernel | {' | '.join(keys)} |\n|---|{'---|' * len(keys)}")
        for name, row in result.items():
            print(f"| {name} | {' | '.join(f'{row[k]:.1f}' for k in keys)} |")
        gap, same = logit_gap(models)
        print(f"flash vs unfused after a 512-token prefill: max |logit difference| {gap:.3g}, "
              f"argmax {'the same' if same else 'DIFFERENT'} on 5 rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
