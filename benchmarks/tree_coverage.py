"""How much of a tree's tokens per pass the drafts could give at most, per Spec-Bench category, from live runs.

Every tree step proposes a tree (``Drafter.propose_tree``) that the loop then prunes to the nodes its
pass costs pay for (``runtime.tree.prune``).  This records each step's tree before and after pruning
and, once the generation is done, walks both along the tokens the target actually emitted from that
position.  Per category it prints:

- tokens per pass as run (the pruned tree; each step's walk must equal the accepted count the loop
  reported, which checks the recording);
- tokens per pass had the whole unpruned tree been verified: the most these drafts hold at this tree
  size, whatever the pruning (at a higher pass cost, not counted here);
- rows per pass, pruned and unpruned, and the measured cost of a pass of those rows
  (``Engine.pass_costs``, measured at a 256-token context).

So it tells "better pruning" apart from "better drafts": when the unpruned tree's tokens per pass are
not much above the pruned one's, only a drafter that proposes better tokens can help.

    python benchmarks/tree_coverage.py .cache/demo/engine-eagle ../shared/benchmarks/spec_bench/dev.jsonl \\
        --drafter hybrid --tree-nodes 32 --categories rag,summarization,qa

The recording wraps ``runtime.loop.prune`` for the length of the run (a measurement hook, not an API).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import TYPE_CHECKING

from specrt.runtime import Engine
from specrt.runtime import loop as spec_loop
from specrt.runtime.tree import Tree
from tqdm.auto import tqdm

from specrt.spec_bench import build_prompts, category, load_questions

sys.path.insert(0, str(Path(__file__).parent))
from head_acceptance import passes  # the trace's step records

if TYPE_CHECKING:
    from typing import Self  # Python 3.11+; annotations are not evaluated at run time


def deepest_match(tree: Tree, emitted: list[int]) -> int:
    """How many nodes of ``tree`` a pass would accept when the target emits ``emitted`` from the root: the depth
    of the deepest node whose path equals a prefix of ``emitted``."""
    kids = tree.children()
    row, depth = 0, 0
    while depth < len(emitted):
        nxt = next((c for c in kids[row] if int(tree.token_ids[c - 1]) == emitted[depth]), None)
        if nxt is None:
            break
        row, depth = nxt, depth + 1
    return depth


class PruneRecorder:
    """Wraps ``runtime.loop.prune`` and the engine's target ``step``: every (position, offered tree, kept tree).

    The loop runs the target once right after each prune (a pruned-away tree leaves a one-row pass), and that
    pass starts at the position the tree was drafted for (``length - 1``: its root, the last emitted token)."""

    def __init__(self, engine: Engine) -> None:
        self.calls: list[tuple[int, Tree, Tree]] = []
        self._engine, self._prune, self._pending = engine, spec_loop.prune, None

    def __enter__(self) -> Self:
        def recording_prune(tree, scores, row_cost, draft_cost=0.0):
            kept = self._prune(tree, scores, row_cost, draft_cost)
            self._pending = (tree, kept)
            return kept

        target = self._engine.default_sequence.target
        step = target.forward

        def recording_step(ids, pos, *a, **kw):
            if self._pending is not None:
                self.calls.append((int(pos), *self._pending))
                self._pending = None
            return step(ids, pos, *a, **kw)
        spec_loop.prune = recording_prune
        target.forward = recording_step
        return self

    def __exit__(self, *exc) -> None:
        spec_loop.prune = self._prune
        del self._engine.default_sequence.target.forward  # the instance attribute: the class's method again


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("engine", type=Path)
    ap.add_argument("questions", type=Path)
    ap.add_argument("--drafter", default=None, help="default: the engine's")
    ap.add_argument("--tree-nodes", type=int, default=32)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--policy", default="adaptive")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--categories", default=None, help="comma-separated Spec-Bench categories (default: all)")
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = ap.parse_args(argv)

    engine = Engine.load(args.engine)
    questions = load_questions(args.questions)
    if args.categories:
        wanted = set(args.categories.split(","))
        questions = [q for q in questions if category(q) in wanted]  # as reported: MT-bench's kinds are mt_bench
    prompts = build_prompts(engine, questions, args.max_new_tokens)
    row_cost = engine.pass_costs(args.tree_nodes + 1)
    top = max(row_cost)
    tally: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for p in tqdm(prompts, desc=f"{args.drafter or 'default'} tree {args.tree_nodes}", unit="prompt"):
        trace = io.StringIO()
        with PruneRecorder(engine) as rec:
            out = engine.generate(p.ids, max_new_tokens=args.max_new_tokens, reuse_prefix=False, k=args.k, policy=args.policy,
                                  drafter=args.drafter, tree_nodes=args.tree_nodes, trace=trace)
        emitted = [int(t) for t in out.token_ids]
        accepted_at = {s["context"] - 1: s["accepted"] for s in passes(trace.getvalue())}  # pass position -> accepted
        for pass_pos, offered, kept in rec.calls:
            pos = pass_pos + 1 - len(p.ids)  # tokens emitted before this pass
            run, whole = deepest_match(kept, emitted[pos:]), deepest_match(offered, emitted[pos:])
            if run != accepted_at.get(pass_pos) and pos + run == len(emitted):
                # the walk ran out of output: the pass's last tokens came after the end-of-sequence token or the
                # stop string, which the result leaves out; the loop's count is the truth there
                run = accepted_at.get(pass_pos, run)
                whole = max(whole, run)
            if run != accepted_at.get(pass_pos):
                raise SystemExit(f"the recorded tree accepts {run} at position {pos}, the loop reported "
                                 f"{accepted_at.get(pass_pos)}: the recording is out of step")
            for cat in (p.category, "overall"):
                t = tally[cat]
                t["passes"] += 1
                t["kept_tokens"] += run + 1
                t["offered_tokens"] += whole + 1
                t["kept_rows"] += len(kept) + 1
                t["offered_rows"] += len(offered) + 1
                t["kept_cost"] += row_cost[min(len(kept) + 1, top)]
                t["offered_cost"] += row_cost[min(len(offered) + 1, top)]
        for cat in (p.category, "overall"):
            tally[cat]["tokens"] += len(emitted)
            tally[cat]["all_passes"] += out.stats.steps
    print(f"{args.engine} {args.drafter or 'default drafter'}, tree {args.tree_nodes}, k={args.k} {args.policy}, "
          f"greedy, {len(prompts)} turns, {args.max_new_tokens} new tokens per turn\n")
    print("| category | tokens/pass as run | tree steps | tokens/pass, pruned tree | tokens/pass, whole tree | "
          "rows pruned / whole | pass ms pruned / whole |\n|---|---:|---:|---:|---:|---:|---:|")
    rows = {}
    for cat in sorted(tally, key=lambda c: (c == "overall", c)):
        t = tally[cat]
        n = max(1.0, t["passes"])
        rows[cat] = {"tokens_per_pass": t["tokens"] / max(1.0, t["all_passes"]), "tree_passes": int(t["passes"]),
                     "pruned_tokens_per_pass": t["kept_tokens"] / n, "whole_tokens_per_pass": t["offered_tokens"] / n,
                     "pruned_rows": t["kept_rows"] / n, "whole_rows": t["offered_rows"] / n,
                     "pruned_pass_ms": 1000 * t["kept_cost"] / n, "whole_pass_ms": 1000 * t["offered_cost"] / n}
        r = rows[cat]
        print(f"| {cat} | {r['tokens_per_pass']:.2f} | {r['tree_passes']} | {r['pruned_tokens_per_pass']:.2f} | "
              f"{r['whole_tokens_per_pass']:.2f} | {r['pruned_rows']:.1f} / {r['whole_rows']:.1f} | "
              f"{r['pruned_pass_ms']:.1f} / {r['whole_pass_ms']:.1f} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
