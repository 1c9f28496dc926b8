#!/usr/bin/env python
"""The engine's default request where drafting cannot pay: chat answers that repeat nothing of their prompt.

A request that names no drafter, k, policy or tree size gets the engine's measured defaults (``Engine.defaults``).
Those were chosen on Spec-Bench, where context matches are common; this measures their worst case: open-ended
writing prompts whose answers share almost nothing with the prompt, so an n-gram drafter finds few matches and a
draft model or head is the only source of drafts.  Target-only and the default alternate prompt by prompt, so the
machine's drift hits both alike; the ratio is of total tokens over total seconds, and every default output is
checked token for token against target-only.  The suffix drafter's memory of earlier generations is emptied before
each default run (it would otherwise draft from target-only's answer to the same prompt); a datastore shipped in the
engine stays, as it would in service.

    python benchmarks/default_worst_case.py .cache/demo/engine .cache/demo/engine-eagle .cache/demo/engine-q8 \\
        --repeats 3 --max-new-tokens 128
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROMPTS = [
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Compose a poem about the first snow of winter in a mountain village.",
    "Describe, in your own words, what a perfect Sunday morning would feel like.",
    "Invent a new board game and explain how to play it.",
    "Write a letter from a cat to its owner explaining why it knocked the vase over.",
    "Give me five original ideas for a birthday party for a ten-year-old.",
]


def measure(path: Path, repeats: int, max_new_tokens: int) -> dict:
    from specrt.runtime import Engine

    engine = Engine.load(path)
    ids = [engine.chat_prompt([{"role": "user", "content": p}]) for p in PROMPTS]
    engine.generate(ids[0], max_new_tokens=8, use_draft=False, reuse_prefix=False)  # warm-up
    totals = {"target-only": [0, 0.0], "default": [0, 0.0]}
    same, passes, spec_tokens = True, 0, 0
    for _ in range(repeats):
        for prompt_ids in ids:
            base = engine.generate(prompt_ids, max_new_tokens=max_new_tokens, use_draft=False, reuse_prefix=False)
            # the suffix drafter remembers earlier generations, target-only's answer to this very prompt among
            # them: emptied, so the default drafts as a fresh engine would (the worst case this measures)
            engine.suffix_cache.clear()
            spec = engine.generate(prompt_ids, max_new_tokens=max_new_tokens, reuse_prefix=False)
            for name, r in (("target-only", base), ("default", spec)):
                totals[name][0] += r.stats.new_tokens
                totals[name][1] += r.stats.total_s
            same &= base.token_ids == spec.token_ids
            passes += spec.stats.steps
            spec_tokens += spec.stats.new_tokens
    tok_s = {name: n / s for name, (n, s) in totals.items()}
    return {"engine": str(path), "defaults": engine.defaults, "target_only_tok_s": round(tok_s["target-only"], 1),
            "default_tok_s": round(tok_s["default"], 1), "ratio": round(tok_s["default"] / tok_s["target-only"], 3),
            "tokens_per_pass": round(spec_tokens / max(passes, 1), 2), "identical": same}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engines", nargs="+", type=Path, help="engine directories")
    ap.add_argument("--repeats", type=int, default=3, help="passes over the prompts (default 3)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer (default 128)")
    ap.add_argument("--json-out", type=Path, help="also write the rows as JSON here")
    args = ap.parse_args(argv)
    rows = []
    print(f"{'engine':<32} {'defaults':<52} {'target-only':>11} {'default':>8} {'ratio':>6} {'tok/pass':>8} same")
    for path in args.engines:
        r = measure(path, args.repeats, args.max_new_tokens)
        d = r["defaults"]
        label = f"{d['drafter']} k<={d['k']} {d['policy']}" + (f" tree {d['tree_nodes']}" if d["tree_nodes"] else "")
        print(f"{path.name:<32} {label:<52} {r['target_only_tok_s']:>11} {r['default_tok_s']:>8} {r['ratio']:>5}x "
              f"{r['tokens_per_pass']:>8} {'yes' if r['identical'] else 'NO'}", flush=True)
        rows.append(r)
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1))
    return 0 if all(r["identical"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
