#!/usr/bin/env python
"""Prefix reuse on Spec-Bench's second turns: how much prefill it saves, and how often its answer differs.

For every question with a second turn: the first turn's answer is generated (greedy), then the second turn --
the whole conversation so far plus the new question -- twice on the same engine: on the sequence that just
answered the first turn (its KV reused: only the new tokens are prefilled) and afresh (``reuse_prefix=False``).
The reused entries were computed by decoding and verification passes, a fresh prefill computes them in chunks; a
target whose kernels score a row the same in every pass shape gives the same answer either way, one whose kernels
do not (int8 activations, MatMulNBits) may differ.  Reported per engine: prompt tokens, tokens reused, time to
first token of both, and how many second-turn answers differ from the fresh one (with the first differing
position).  Greedy, target-only and the engine's default drafter alike.

    python benchmarks/prefix_reuse.py .cache/demo/engine .cache/demo/engine-q8 .cache/demo/engine-int4
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

QUESTIONS = Path(__file__).resolve().parent.parent.parent / "shared" / "benchmarks" / "spec_bench" / "dev.jsonl"


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def measure(path: Path, questions: list[dict], max_new_tokens: int, use_draft: bool) -> dict:
    from specrt.runtime import Engine

    engine = Engine.load(path)
    seq = engine.sequence()
    differ, positions, prompt_tokens, reused = 0, [], [], []
    ttft_reuse, ttft_fresh = [], []
    for q in questions:
        messages = [{"role": "user", "content": q["turns"][0]}]
        first = seq.generate(engine.chat_prompt(messages), max_new_tokens=max_new_tokens, use_draft=use_draft,
                             reuse_prefix=False)
        messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": q["turns"][1]}]
        ids = engine.chat_prompt(messages)
        again = seq.generate(ids, max_new_tokens=max_new_tokens, use_draft=use_draft)  # reuses the first turn
        fresh = engine.generate(ids, max_new_tokens=max_new_tokens, use_draft=use_draft, reuse_prefix=False)
        prompt_tokens.append(len(ids))
        reused.append(again.stats.reused_tokens)
        ttft_reuse.append(again.stats.prefill_s)
        ttft_fresh.append(fresh.stats.prefill_s)
        pos = first_difference(again.token_ids, fresh.token_ids)
        if pos is not None:
            differ += 1
            positions.append(pos)
    return {"engine": path.name, "drafter": engine.default_drafter if use_draft else "target-only",
            "conversations": len(questions), "prompt_tokens": statistics.median(prompt_tokens),
            "reused_tokens": statistics.median(reused),
            "prefill_ms_reused": round(1000 * statistics.median(ttft_reuse), 1),
            "prefill_ms_fresh": round(1000 * statistics.median(ttft_fresh), 1),
            "answers_differ": differ, "first_difference_at": positions}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines", nargs="+", type=Path, help="engine directories")
    ap.add_argument("--questions", type=Path, default=QUESTIONS, help="Spec-Bench JSON Lines (default: dev.jsonl)")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="tokens per answer (default 96)")
    ap.add_argument("--json-out", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    from specrt.spec_bench import load_questions

    questions = [q for q in load_questions(args.questions) if len(q["turns"]) > 1]
    rows = []
    print(f"{'engine':<24} {'drafter':<12} {'convs':>5} {'prompt':>6} {'reused':>6} {'prefill ms reused/fresh':>24} "
          f"{'answers differ':>14}")
    for path in args.engines:
        for use_draft in (False, True):
            r = measure(path, questions, args.max_new_tokens, use_draft)
            print(f"{r['engine']:<24} {r['drafter']:<12} {r['conversations']:>5} {r['prompt_tokens']:>6.0f} "
                  f"{r['reused_tokens']:>6.0f} {r['prefill_ms_reused']:>11} / {r['prefill_ms_fresh']:<10} "
                  f"{r['answers_differ']:>6} {r['first_difference_at'] or ''}", flush=True)
            rows.append(r)
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
