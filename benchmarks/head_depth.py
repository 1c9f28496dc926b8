"""How deep the feature head drafts inside the hybrid tree (``hybrid.HEAD_DEPTH``), measured side by side.

Target-only and the hybrid tree (adaptive k up to 8) at each head depth take turns prompt by prompt on one engine,
greedy, over Spec-Bench turns; every configuration's output must equal target-only's (the run stops otherwise).
Prints, per category, each configuration's speed over target-only and its tokens per target pass.

    python benchmarks/head_depth.py .cache/demo/engine-eagle ../shared/benchmarks/spec_bench/dev.jsonl --depths 1,2,3

The depth is switched by setting ``specrt.runtime.drafters.HEAD_DEPTH`` between generations (a measurement hook,
not an API).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from specrt.runtime import Engine, drafters
from tqdm.auto import tqdm

from specrt.spec_bench import SideBySide, build_prompts, load_questions


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine", type=Path, help="an engine directory with a feature head")
    ap.add_argument("questions", type=Path, help="Spec-Bench questions (jsonl)")
    ap.add_argument("--depths", default="1,2,3", help="comma-separated head depths (default 1,2,3)")
    ap.add_argument("--tree-nodes", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    args = ap.parse_args(argv)

    engine = Engine.load(args.engine)
    prompts = build_prompts(engine, load_questions(args.questions), args.max_new_tokens)
    configs = ["target-only"] + [f"depth {d}" for d in map(int, args.depths.split(","))]
    tally = SideBySide()
    for p in tqdm(prompts, desc="head depths", unit="turn"):
        reference = None
        for config in configs:
            if config == "target-only":
                kwargs = {"use_draft": False}
            else:
                drafters.HEAD_DEPTH = int(config.split()[1])
                kwargs = {"drafter": "hybrid", "k": 8, "policy": "adaptive", "tree_nodes": args.tree_nodes}
            ids = tally.run(engine, p, config, args.max_new_tokens, reference, **kwargs)
            reference = ids if reference is None else reference
    print(f"{args.engine}, hybrid tree {args.tree_nodes}, adaptive k <= 8, greedy, {len(prompts)} turns; "
          "speed over target-only / tokens per pass; every output identical to target-only\n")
    print(tally.table(configs, "target-only"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
