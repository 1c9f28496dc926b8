#!/usr/bin/env python
"""Replay context drafters over the target's own greedy outputs on Spec-Bench: tokens per pass, per category.

Greedy verification accepts a drafted token exactly when it equals the target's next greedy token, so
a context drafter (no model of its own) can be scored without running it live: generate every turn's
target-only output once (cached in ``--cache``), then walk each output as the loop would -- propose
up to k, accept the longest prefix that matches, commit -- for every configuration.  Prints, per
category: tokens per target pass and the mean rows per pass, and a predicted speedup from the engine's
measured pass cost by rows (``t(rows)``, measured here at the median context of the prompts).  Also the
drafting cost (propose + commit, microseconds) at 64 and 2,000 tokens of context.

    python benchmarks/drafter_replay.py .cache/demo/engine ../shared/benchmarks/spec_bench/dev.jsonl

``--datastore FILE`` (from ``scripts/build_datastore.py``) adds ``suffix`` with it beside ``suffix`` without, each
with the engine's cache shared across the turns (as an engine serves them) and with a fresh cache per turn (what a
fresh engine, or a question unlike the earlier ones, gets), and ``hybrid`` (the engine's draft model behind the
context match; its draft passes make that row slower to replay).  ``--only NAME,NAME`` keeps those configurations;
``--acceptance-only`` skips every timing (pass costs, drafting cost) and needs nothing but the target's outputs;
``--pass-costs ROWS:MS,...`` predicts the speedup from pass costs measured before (interpolated) instead:

    python benchmarks/drafter_replay.py .cache/demo/engine ../shared/benchmarks/spec_bench/dev.jsonl --k 4,8 \
        --datastore .cache/datastore/answers.npz --acceptance-only --pass-costs 1:22.2,4:25,8:30.8,12:31.3,16:35.4 \
        --only "ngram 1-8 latest,suffix,suffix + datastore,suffix fresh,suffix fresh + datastore,hybrid"
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from specrt.runtime import Engine
from specrt.runtime.drafters import Datastore, DrafterOptions, NgramDrafter, SuffixCache, SuffixDrafter, make_drafter
from specrt.runtime.sampling import SamplingParams

from specrt.spec_bench import CATEGORIES, build_prompts, load_questions

GREEDY, RNG = SamplingParams(), np.random.default_rng(0)


def outputs(engine: Engine, questions, max_new_tokens: int, cache: Path) -> list[dict]:
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data["max_new_tokens"] == max_new_tokens and data["engine"] == str(engine.manifest.root):
            return data["turns"]
    turns = []
    for p in build_prompts(engine, questions, max_new_tokens):
        r = engine.generate(p.ids, max_new_tokens=max_new_tokens, use_draft=False, reuse_prefix=False)
        turns.append({"category": p.category, "prompt": p.ids, "output": r.token_ids})
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"engine": str(engine.manifest.root), "max_new_tokens": max_new_tokens,
                                 "turns": turns}))
    return turns


def replay(drafter, prompt: list[int], output: list[int], k: int) -> tuple[int, list[int]]:
    """(target passes, rows of each pass) of greedy speculation over a known output."""
    drafter.begin(np.array(prompt))
    j, rows = 0, []
    while j < len(output):
        ids = drafter.propose(min(k, len(output) - j - 1), GREEDY, RNG).token_ids
        a = 0
        while a < len(ids) and ids[a] == output[j + a]:
            a += 1
        drafter.commit(output[j:j + a], output[j + a])
        rows.append(len(ids) + 1)
        j += a + 1
    drafter.end()
    return len(rows), rows


def pass_costs(engine: Engine, context: int, max_rows: int = 17, repeats: int = 5) -> dict[int, float]:
    """Median seconds of a target pass by rows, at this context."""
    ids = np.arange(10, 10 + context) % 1000
    target = engine.sequence().target
    target.prefill(ids)
    out = {}
    for n in range(1, max_rows + 1):
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            target.forward(ids[:n], context)
            times.append(time.perf_counter() - t0)
            target.set_length(context)
        out[n] = statistics.median(times)
    return out


def drafting_cost(make, context: int, k: int = 8, steps: int = 200) -> float:
    """Microseconds per propose + commit at a context of this many tokens (text with few repeats)."""
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 40000, context)
    d = make()
    d.begin(prompt)
    t0 = time.perf_counter()
    for _ in range(steps):
        d.propose(k, GREEDY, RNG)
        d.commit([], int(rng.integers(0, 40000)))
    return 1e6 * (time.perf_counter() - t0) / steps


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", type=Path)
    ap.add_argument("questions", type=Path)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--cache", type=Path, default=Path(".cache/replay/spec_bench_outputs.json"))
    ap.add_argument("--k", type=lambda t: [int(x) for x in t.split(",")], default=[2, 4, 8, 16])
    ap.add_argument("--datastore", type=Path, default=None, metavar="FILE",
                    help="also replay suffix with this datastore, and hybrid")
    ap.add_argument("--only", type=lambda t: [x.strip() for x in t.split(",") if x.strip()], default=None,
                    metavar="NAMES", help="only these configurations (comma-separated names as printed)")
    ap.add_argument("--acceptance-only", action="store_true",
                    help="tokens per pass only: no pass costs or drafting cost measured")
    ap.add_argument("--pass-costs", type=lambda t: dict(tuple(map(float, x.split(":"))) for x in t.split(",")),
                    default=None, metavar="ROWS:MS,...",
                    help="target pass milliseconds by rows, measured before (interpolated): a predicted speedup "
                    "without measuring")
    args = ap.parse_args()
    engine = Engine.load(args.engine)
    turns = outputs(engine, load_questions(args.questions), args.max_new_tokens, args.cache)
    cost = None
    if args.pass_costs:
        rows, ms = zip(*sorted(args.pass_costs.items()))
        cost = {n: float(np.interp(n, rows, ms)) / 1e3 for n in range(1, max(args.k) + 2)}
    elif not args.acceptance_only:
        context = int(statistics.median(len(t["prompt"]) for t in turns))
        cost = pass_costs(engine, context, max_rows=max(args.k) + 1)
        print(f"target pass cost by rows at context {context} (ms): "
              + ", ".join(f"{n}: {1e3 * c:.1f}" for n, c in cost.items()))
    configs = {}
    for n_min, n_max in ((1, 3), (2, 3), (2, 4), (3, 5), (1, 5), (1, 8)):
        for match in ("latest", "earliest"):
            for trim in (True, False):  # depth by the match length's running acceptance, or always up to k
                configs[f"ngram {n_min}-{n_max} {match}{'' if trim else ' to k'}"] = (
                    lambda a=n_min, b=n_max, m=match, t=trim: NgramDrafter(a, b, m, t))
    for conf in (0.1, 0.3, 0.5):
        for factor in (1.0, 2.0, 4.0):
            configs[f"suffix conf {conf} x{factor:g}"] = ("suffix", conf, factor, None, True)
    if args.datastore is not None:
        store = Datastore.load(args.datastore, engine.manifest.target.vocab_size)
        print(f"datastore {args.datastore}: {len(store)} entries, contexts of 1-{store.ngram_max} tokens seen >= "
              f"{store.min_count} times, {store.nbytes / 1e6:.1f} MB")
        conf = DrafterOptions().suffix_min_confidence
        for shared in (True, False):  # the cache across turns, or a fresh one each turn
            label = "" if shared else " fresh"
            configs[f"suffix{label}"] = ("suffix", conf, 2.0, None, shared)
            configs[f"suffix{label} + datastore"] = ("suffix", conf, 2.0, store, shared)
        if "model" in engine.drafters:
            draft = engine.sequence().draft
            configs["hybrid"] = lambda: make_drafter("hybrid", DrafterOptions(), draft,
                                                     max_k=max(engine.manifest.k_values))
    if args.only:
        if unknown := set(args.only) - set(configs):
            ap.error(f"--only: no configuration {', '.join(sorted(unknown))}; choose from {', '.join(configs)}")
        configs = {name: configs[name] for name in args.only}
    cats = [c for c in CATEGORIES if any(t["category"] == c for t in turns)]
    print(f"\n{'configuration':<32} {'k':>3} " + " ".join(f"{c[:11]:>11}" for c in cats) +
          f" {'overall':>9} {'rows/pass':>9}" + ("" if cost is None else f" {'predicted':>9}"))
    for name, make in configs.items():
        for k in args.k:
            if isinstance(make, tuple):
                _, c, f, store, shared = make
                cache = SuffixCache()
                factory = (lambda cache=cache, c=c, f=f, store=store, shared=shared:
                           SuffixDrafter(cache if shared else SuffixCache(), c, f, datastore=store))
            else:
                factory = make
            per_cat = {c: [0, 0] for c in cats}
            all_rows = []
            for t in turns:  # in benchmark order: the suffix cache holds the earlier questions
                steps, rows = replay(factory(), t["prompt"], t["output"], k)
                per_cat[t["category"]][0] += len(t["output"])
                per_cat[t["category"]][1] += steps
                all_rows += rows
            tokens = sum(v[0] for v in per_cat.values())
            steps = sum(v[1] for v in per_cat.values())
            line = (f"{name:<32} {k:>3} " + " ".join(f"{v[0] / v[1]:>11.2f}" for v in per_cat.values()) +
                    f" {tokens / steps:>9.2f} {statistics.mean(all_rows):>9.2f}")
            if cost is not None:
                line += f" {tokens * cost[1] / sum(cost[min(r, max(cost))] for r in all_rows):>8.2f}x"
            print(line, flush=True)
    if args.acceptance_only:
        return 0
    print("\ndrafting cost per step (propose + commit), microseconds:")
    for name, make in (("ngram 1-8", lambda: NgramDrafter(1, 8)), ("suffix", lambda: SuffixDrafter(SuffixCache()))):
        print(f"  {name:<10} context 64: {drafting_cost(make, 64):.1f} us   context 2000: "
              f"{drafting_cost(make, 2000):.1f} us   (a 1-row target pass: {1e6 * cost[1]:.0f} us)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
