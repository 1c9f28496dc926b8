"""A drafter's greedy acceptance by draft position on Spec-Bench, per category, from live runs.

For every Spec-Bench prompt (both turns; ``specrt.spec_bench.build_prompts``) this runs target-only
and the drafter with a fixed chain of k (no policy: every pass offers k drafts when the drafter has
them), alternating, and reads each pass from the generation's trace: acceptance at position j is the
share of passes that offered a j-th draft, accepted drafts 1..j-1, and accepted the j-th too -- the
number a head's held-out evaluation (``scripts/train_head.py``) predicts, here on questions it never
saw.  Also per category: tokens per target pass, tokens/s against target-only, and whether every
output is token-identical to target-only (it must be).

    python benchmarks/head_acceptance.py .cache/demo/engine-eagle ../shared/benchmarks/spec_bench/dev.jsonl --k 4
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from collections import defaultdict
from pathlib import Path

from specrt.runtime import Engine
from specrt.runtime.trace import acceptance_by_position
from tqdm.auto import tqdm

from specrt.spec_bench import build_prompts, load_questions


def passes(trace: str) -> list[dict]:
    """The step records (one per target pass) of a trace."""
    records = (json.loads(line) for line in trace.splitlines() if line.strip())
    return [r for r in records if r.get("type") == "step"]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine", type=Path)
    ap.add_argument("questions", type=Path)
    ap.add_argument("--drafter", default="eagle")
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--limit", type=int, default=None, help="only the first N questions")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    engine = Engine.load(args.engine)
    questions = load_questions(args.questions)[:args.limit]
    prompts = build_prompts(engine, questions, args.max_new_tokens)
    steps: dict[str, list[dict]] = defaultdict(list)
    tally: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for p in tqdm(prompts, desc=f"{args.drafter} k={args.k}", unit="prompt"):
        base = engine.generate(p.ids, max_new_tokens=args.max_new_tokens, use_draft=False, reuse_prefix=False)
        trace = io.StringIO()
        spec = engine.generate(p.ids, max_new_tokens=args.max_new_tokens, reuse_prefix=False, k=args.k, policy="fixed",
                               tree_nodes=0, drafter=args.drafter,
                               trace=trace)
        for cat in (p.category, "overall"):
            steps[cat] += passes(trace.getvalue())
            t = tally[cat]
            t["tokens"] += spec.stats.new_tokens
            t["passes"] += spec.stats.steps
            t["spec_s"] += spec.stats.total_s
            t["base_tokens"] += base.stats.new_tokens
            t["base_s"] += base.stats.total_s
            t["draft_s"] += spec.stats.draft_s
            t["different"] += spec.token_ids != base.token_ids

    rows = {}
    header = "| category | " + " | ".join(f"pos {j}" for j in range(1, args.k + 1)) + \
        " | tokens/pass | draft ms/pass | speedup | identical |"
    print(f"{args.engine} {args.drafter} k={args.k}, greedy, {len(questions)} questions, "
          f"{args.max_new_tokens} new tokens per turn\n\n{header}\n|---|" + "---:|" * (args.k + 3) + "---|")
    for cat in sorted(steps, key=lambda c: (c == "overall", c)):
        t = tally[cat]
        acc = acceptance_by_position(steps[cat], args.k)
        speedup = (t["tokens"] / t["spec_s"]) / (t["base_tokens"] / t["base_s"])
        rows[cat] = {"acceptance_by_position": acc, "tokens_per_pass": t["tokens"] / t["passes"],
                     "draft_ms_per_pass": 1000 * t["draft_s"] / t["passes"], "speedup": speedup,
                     "identical": t["different"] == 0}
        cells = " | ".join(f"{a:.3f}" for a in acc)
        print(f"| {cat} | {cells} | {rows[cat]['tokens_per_pass']:.2f} | {rows[cat]['draft_ms_per_pass']:.2f} | "
              f"{speedup:.2f}x | {'yes' if t['different'] == 0 else 'NO'} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0 if all(r["identical"] for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
