#!/usr/bin/env python
"""When the feature head runs the target's commits: at each commit (eager) or on its next proposal (lazy, the runtime's
way), measured side by side.

Target-only, eager and lazy take turns prompt by prompt on one engine, greedy, over Spec-Bench turns, with the drafter
settings given; every configuration's output must equal target-only's (the run stops otherwise).  Prints, per
category, each configuration's speed over target-only and its tokens per target pass.

    python benchmarks/head_catch_up.py .cache/demo/engine-q8 ../shared/benchmarks/spec_bench/dev.jsonl \\
        --drafter hybrid
    python benchmarks/head_catch_up.py .cache/demo/engine-eagle ../shared/benchmarks/spec_bench/dev.jsonl \\
        --drafter hybrid --tree-nodes 32

Eager is the lazy drafter with its catch-up called at the end of every ``commit`` (a measurement hook, not an API).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specrt.runtime import Engine
from specrt.runtime.drafters.eagle import EagleDrafter
from tqdm.auto import tqdm

from specrt.spec_bench import SideBySide, build_prompts, load_questions

LAZY = EagleDrafter.commit


def eager_commit(self, *args, **kwargs) -> None:
    LAZY(self, *args, **kwargs)
    self._catch_up()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine", type=Path, help="an engine directory with a feature head")
    ap.add_argument("questions", type=Path, help="Spec-Bench questions (jsonl)")
    ap.add_argument("--drafter", default="hybrid", choices=("eagle", "hybrid"))
    ap.add_argument("--tree-nodes", type=int, default=0, help="0: chains (default)")
    ap.add_argument("--k", type=int, default=8, help="adaptive k up to this (default 8)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args(argv)

    engine = Engine.load(args.engine)
    prompts = build_prompts(engine, load_questions(args.questions), args.max_new_tokens)
    request = {"drafter": args.drafter, "k": args.k, "policy": "adaptive", "tree_nodes": args.tree_nodes}
    configs = ["target-only", "eager", "lazy"]
    tally = SideBySide()
    try:
        for i, p in enumerate(tqdm(prompts, desc="head catch-up", unit="turn")):
            reference = None
            for config in configs if i % 2 else [configs[0], *reversed(configs[1:])]:  # neither always goes first
                EagleDrafter.commit = eager_commit if config == "eager" else LAZY
                kwargs = {"use_draft": False} if config == "target-only" else request
                ids = tally.run(engine, p, config, args.max_new_tokens, reference, **kwargs)
                reference = ids if reference is None else reference
    finally:
        EagleDrafter.commit = LAZY
    shape = f"tree {args.tree_nodes}" if args.tree_nodes else "chains"
    print(f"{args.engine}, {args.drafter} ({shape}), adaptive k <= {args.k}, greedy, {len(prompts)} turns; "
          "speed over target-only / tokens per pass; every output identical to target-only\n")
    print(tally.table(configs, "target-only"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
