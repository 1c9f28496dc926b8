#!/usr/bin/env python
"""Where a batching engine's time goes under load: prefill chunks, batched decode passes, solo speculative steps.

N client threads send Spec-Bench first turns (greedy, the engine's default drafter, no prefix reuse) to one engine
loaded with ``max_batch=N``, back to back, ``--requests`` in all.  The scheduler's three kinds of work are timed
(wrapped for this run only): a prefill chunk of a starting sequence, a batched pass (every ready sequence decodes
one token), a speculative step of one sequence alone.  Printed: seconds and share of each, passes, rows per batched
pass, tokens per solo step, and the tokens per second overall -- what explains the throughput at N clients.

    python benchmarks/batch_profile.py .cache/demo/engine-batch --clients 8 --requests 16
"""
from __future__ import annotations

import argparse
import collections
import sys
import threading
import time
from pathlib import Path

QUESTIONS = Path(__file__).resolve().parent.parent.parent / "shared" / "benchmarks" / "spec_bench" / "dev.jsonl"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", type=Path, help="an engine exported with --batch")
    ap.add_argument("--clients", type=int, default=8, help="concurrent clients, and the engine's slots (>= 2)")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args(argv)
    if args.clients < 2:
        ap.error("--clients must be >= 2 (one client never shares a pass)")
    from specrt.runtime import Engine
    from specrt.runtime.batch import Batcher

    engine = Engine.load(args.engine, max_batch=args.clients)
    seconds, counts = collections.Counter(), collections.Counter()
    rows, solo_tokens = [0], [0]

    def timed(kind, fn):
        def run(self, *a):
            t0 = time.perf_counter()
            out = fn(self, *a)
            seconds[kind] += time.perf_counter() - t0
            counts[kind] += 1
            return out
        return run

    def round_(self, original=Batcher._round):
        starting = next((g for g in self._active if g.prefill is not None), None)
        t0 = time.perf_counter()
        before = seconds["batched pass"] + seconds["solo step"]
        original(self)
        if starting is not None:  # the round's prefill chunk: its time less the pass that followed it
            seconds["prefill chunk"] += time.perf_counter() - t0 - (seconds["batched pass"] + seconds["solo step"]
                                                                   - before)
            counts["prefill chunk"] += 1

    def batched(self, ready, original=Batcher._batched):
        rows[0] += len(ready)
        return original(self, ready)

    def solo(self, g, original=Batcher._solo):
        n = g.decoder.stats.new_tokens
        original(self, g)
        solo_tokens[0] += g.decoder.stats.new_tokens - n

    Batcher._round = round_
    Batcher._batched = timed("batched pass", batched)
    Batcher._solo = timed("solo step", solo)
    from specrt.spec_bench import load_questions

    questions = [q["turns"][0] for q in load_questions(QUESTIONS)]
    prompts = [engine.chat_prompt([{"role": "user", "content": q}]) for q in questions[:args.requests]]
    todo = list(enumerate(prompts))
    lock = threading.Lock()
    sequences = [engine.default_sequence] + [engine.sequence() for _ in range(args.clients - 1)]
    tokens = [0]

    def client(seq):
        while True:
            with lock:
                if not todo:
                    return
                _, ids = todo.pop(0)
            r = seq.generate(ids, max_new_tokens=args.max_new_tokens, reuse_prefix=False)
            with lock:
                tokens[0] += r.stats.new_tokens
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(s,)) for s in sequences]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    print(f"{args.engine.name}, {args.clients} clients, {args.requests} requests: {tokens[0]} tokens in {wall:.1f} s "
          f"= {tokens[0] / wall:.1f} tok/s")
    for kind in ("prefill chunk", "batched pass", "solo step"):
        print(f"  {kind:<14} {seconds[kind]:6.1f} s ({100 * seconds[kind] / wall:4.1f}%)  {counts[kind]:5d} runs  "
              f"{1000 * seconds[kind] / max(counts[kind], 1):6.1f} ms each")
    print(f"  rows per batched pass {rows[0] / max(counts['batched pass'], 1):.2f}; tokens per solo step "
          f"{solo_tokens[0] / max(counts['solo step'], 1):.2f}; batched pass costs at load (ms): "
          + ", ".join(f"{b}: {1000 * c:.1f}" for b, c in engine.batcher.batch_costs.items())
          + "; solo pass costs by rows (ms): "
          + ", ".join(f"{n}: {1000 * c:.1f}" for n, c in engine.batcher.solo_costs.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
