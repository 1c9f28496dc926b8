#!/usr/bin/env python
"""Replay the recycle drafters over the target's own greedy outputs on Spec-Bench: tokens per pass, per category.

Like ``drafter_replay.py`` (whose output cache it reads), but the recycle drafters need the target's
predictions: for every turn, the target's top-8 next tokens at each output position, given the true
prefix (one pass over prompt + output, cached in ``--topk-cache``).  Each step then runs the real
drafters (``runtime/drafters``): propose a chain or a tree, prune the tree with the engine's pass cost
by rows (measured here at the prompts' median context), accept the longest path that matches the
output, and commit -- handing the recycler the committed rows' predictions, as the loop does.  The
recycle table lives across turns (benchmark order), as an engine's does.  Prints per category tokens
per pass, rows per pass and a predicted speedup from the pass costs, and the recycle table's measured
per-rank hit rates (``recycle.PRIOR_RATES`` came from this).

    python benchmarks/recycle_replay.py .cache/demo/engine ../shared/benchmarks/spec_bench/dev.jsonl
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np
from drafter_replay import GREEDY, RNG, outputs, pass_costs
from specrt.runtime import Engine
from specrt.runtime.drafters import DrafterOptions, RecycleTable, make_drafter
from specrt.runtime.tree import Tree, prune

from specrt.spec_bench import CATEGORIES, load_questions

WIDTH = 8


def top_next(engine: Engine, turns: list[dict], cache: Path) -> list[np.ndarray]:
    """Per turn, [len(output), WIDTH]: the target's top next tokens at each output position (best first)."""
    if cache.is_file():
        data = np.load(cache)
        if len(data.files) == len(turns):
            return [data[f"t{i}"] for i in range(len(turns))]
    tops = []
    target = engine.sequence().target
    for t in turns:
        prompt, out = np.array(t["prompt"]), np.array(t["output"])
        target.prefill(prompt[:-1])
        rows = np.concatenate(([prompt[-1]], out[:-1]))
        chunks = []
        for s in range(0, len(rows), 64):
            logits = target.forward(rows[s:s + 64], len(prompt) - 1 + s)
            idx = np.argpartition(-logits, WIDTH, axis=-1)[:, :WIDTH]
            order = np.argsort(-np.take_along_axis(logits, idx, -1), axis=-1)
            chunks.append(np.take_along_axis(idx, order, -1))
        tops.append(np.concatenate(chunks))
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **{f"t{i}": x for i, x in enumerate(tops)})
    return tops


def as_logits(top: np.ndarray, vocab: int) -> np.ndarray:
    """Rows of logits whose best tokens are ``top`` [rows, WIDTH], in order (what the recycler records)."""
    logits = np.zeros((len(top), vocab), np.float32)
    np.put_along_axis(logits, top, np.arange(WIDTH, 0, -1, dtype=np.float32)[None], axis=-1)
    return logits


def replay(drafter, prompt: list[int], output: list[int], top: np.ndarray, k: int, nodes: int,
           cost: dict[int, float], vocab: int) -> list[int]:
    """Rows of every target pass of greedy speculation over a known output (chains: nodes = 0)."""
    drafter.begin(np.array(prompt))
    j, rows = 0, []
    while j < len(output):
        kk = min(k, len(output) - j - 1)
        if nodes and kk > 0:
            p = drafter.propose_tree(kk, nodes, GREEDY, RNG)
            tree = prune(Tree(p.token_ids, p.parents), p.scores, cost) if len(p) else Tree(p.token_ids, p.token_ids[:0])
        else:
            p = drafter.propose(kk, GREEDY, RNG) if kk > 0 else None
            ids = p.token_ids if p is not None else np.zeros(0, np.int64)
            tree = Tree(ids, np.arange(-1, len(ids) - 1, dtype=np.int64))
        kids, row, a = tree.children(), 0, 0
        while j + a < len(output) - 1:
            nxt = next((c for c in kids[row] if tree.token_ids[c - 1] == output[j + a]), None)
            if nxt is None:
                break
            a, row = a + 1, nxt
        drafter.commit(output[j:j + a], output[j + a], None,
                       as_logits(top[j:j + a + 1], vocab) if drafter.needs_logits else None)
        rows.append(len(tree) + 1)
        j += a + 1
    drafter.end()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", type=Path)
    ap.add_argument("questions", type=Path)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--cache", type=Path, default=Path(".cache/replay/spec_bench_outputs.json"))
    ap.add_argument("--topk-cache", type=Path, default=Path(".cache/replay/spec_bench_top8.npz"))
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--nodes", type=int, default=32)
    args = ap.parse_args()
    engine = Engine.load(args.engine)
    vocab = engine.manifest.target.vocab_size
    turns = outputs(engine, load_questions(args.questions), args.max_new_tokens, args.cache)
    tops = top_next(engine, turns, args.topk_cache)
    context = int(statistics.median(len(t["prompt"]) for t in turns))
    cost = pass_costs(engine, context, max_rows=args.nodes + 1, repeats=3)
    cats = [c for c in CATEGORIES if any(t["category"] == c for t in turns)]
    print(f"\n{'configuration':<28} " + " ".join(f"{c[:11]:>11}" for c in cats) +
          f" {'overall':>9} {'rows/pass':>9} {'predicted':>9}")
    for name in ("ngram", "recycle", "ngram+recycle"):
        for nodes in (0, args.nodes):
            table = RecycleTable(vocab)
            per_cat = {c: [0, 0] for c in cats}
            all_rows: list[int] = []
            for t, top in zip(turns, tops):
                drafter = make_drafter(name, DrafterOptions(), recycle_table=table, target_vocab=vocab)
                rows = replay(drafter, t["prompt"], t["output"], top, args.k, nodes, cost, vocab)
                per_cat[t["category"]][0] += len(t["output"])
                per_cat[t["category"]][1] += len(rows)
                all_rows += rows
            tokens = sum(v[0] for v in per_cat.values())
            steps = sum(v[1] for v in per_cat.values())
            predicted = tokens * cost[1] / sum(cost[min(r, max(cost))] for r in all_rows)
            label = f"{name}{f' tree {nodes}' if nodes else ' chain'}"
            print(f"{label:<28} " + " ".join(f"{v[0] / v[1]:>11.2f}" for v in per_cat.values()) +
                  f" {tokens / steps:>9.2f} {statistics.mean(all_rows):>9.2f} {predicted:>8.2f}x", flush=True)
            if "recycle" in name and not nodes:
                print(f"  recycle table's per-rank hit rates: {np.round(table.rates(), 3).tolist()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
