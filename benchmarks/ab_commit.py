#!/usr/bin/env python
"""Another commit of specrt beside this working tree, on the same engine, in one Spec-Bench run.

A refactor must leave tokens and speed alone.  This stages the other commit's package (``git archive`` of
``specrt/``, ``runtime/``, ``export/``, ``engines/`` laid out as the installed package) in a temporary folder
and runs it in a worker process (``PYTHONPATH`` puts it ahead of the editable install); this tree runs in
this process.  Every question goes to both, alternating, for each configuration, so machine noise hits
both alike; the report gives tokens/s per category of each and whether every output is token-identical.

    python benchmarks/ab_commit.py cb083fe .cache/demo/engine ../shared/benchmarks/spec_bench/dev.jsonl \\
        --config target-only --config ngram:8:adaptive --config model:4:fixed --config ngram+recycle:8:adaptive:32

A configuration is ``target-only`` or ``DRAFTER:K:POLICY[:TREE_NODES]`` (request fields both commits take).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORKER = r'''
import json, sys
from specrt.runtime import Engine
setup = json.loads(sys.stdin.readline())
engine = Engine.load(setup["engine"])
import specrt
from specrt.runtime.request import Request
# every prompt prefilled afresh, on both sides (a commit without prefix reuse has no field to turn it off)
fresh = {"reuse_prefix": False} if "reuse_prefix" in Request.__dataclass_fields__ else {}
print(json.dumps({"ready": True, "version": specrt.__file__}), flush=True)
for line in sys.stdin:
    req = json.loads(line)
    r = engine.generate(req["ids"], **req["params"], **fresh)
    print(json.dumps({"ids": r.token_ids, "seconds": r.stats.total_s}), flush=True)
'''


def stage(commit: str, into: Path) -> Path:
    """The commit's package as the installed layout: specrt/ with runtime/, export/ and engines/ inside."""
    pkg = into / "specrt"
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, "specrt", "runtime", "export", "engines"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    for sub in ("runtime", "export", "engines"):
        (into / sub).rename(pkg / sub)
    return into


def params_of(config: str, max_new_tokens: int) -> dict:
    if config == "target-only":
        return {"max_new_tokens": max_new_tokens, "use_draft": False}
    drafter, k, policy, *nodes = config.split(":")
    return {"max_new_tokens": max_new_tokens, "drafter": drafter, "k": int(k), "policy": policy,
            "tree_nodes": int(nodes[0]) if nodes else 0}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("commit", help="the other commit (any git revision)")
    ap.add_argument("engine", type=Path)
    ap.add_argument("questions", type=Path, help="Spec-Bench questions (JSON Lines)")
    ap.add_argument("--config", action="append", default=[], help="target-only or DRAFTER:K:POLICY[:TREE_NODES]")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--limit", type=int, default=None, help="only the first N questions")
    ap.add_argument("--json-out", type=Path, default=None)
    a = ap.parse_args()
    from specrt.runtime import Engine
    from tqdm import tqdm

    from specrt import spec_bench

    configs = a.config or ["target-only", "ngram:8:adaptive"]
    from specrt.runtime.request import Request

    # this tree prefills every prompt afresh, as the worker does
    fresh = {"reuse_prefix": False} if "reuse_prefix" in Request.__dataclass_fields__ else {}
    engine = Engine.load(a.engine)
    questions = spec_bench.load_questions(a.questions)[:a.limit]
    prompts = spec_bench.build_prompts(engine, questions, a.max_new_tokens)
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "PYTHONPATH": str(stage(a.commit, Path(tmp)))}
        proc = subprocess.Popen([sys.executable, "-c", WORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                text=True, env=env, cwd=tmp)  # not this tree: its specrt/ would shadow the staged one
        proc.stdin.write(json.dumps({"engine": str(a.engine.resolve())}) + "\n")
        proc.stdin.flush()
        ready = json.loads(proc.stdout.readline())
        assert ready["version"].startswith(tmp), f"the worker imported {ready['version']}, not the staged commit"
        totals = {(c, side, p.category): [0, 0.0] for c in configs for side in ("this", a.commit) for p in prompts}
        same = {c: True for c in configs}
        for p in tqdm(prompts, desc="questions", unit="turn"):
            for c in configs:
                params = params_of(c, a.max_new_tokens)
                mine = engine.generate(p.ids, **params, **fresh)
                proc.stdin.write(json.dumps({"ids": p.ids, "params": params}) + "\n")
                proc.stdin.flush()
                theirs = json.loads(proc.stdout.readline())
                same[c] &= mine.token_ids == theirs["ids"]
                for side, n, s in (("this", len(mine.token_ids), mine.stats.total_s),
                                   (a.commit, len(theirs["ids"]), theirs["seconds"])):
                    totals[(c, side, p.category)][0] += n
                    totals[(c, side, p.category)][1] += s
        proc.stdin.close()
        proc.wait(timeout=60)
    cats = [c for c in spec_bench.CATEGORIES if any(p.category == c for p in prompts)]
    print(f"\n| config | commit | {' | '.join(spec_bench.TITLES[c] for c in cats)} | overall tok/s | identical |")
    print("|---|---|" + "---:|" * (len(cats) + 2))
    rows = []
    for c in configs:
        for side in (a.commit, "this"):
            per = [totals[(c, side, k)] for k in cats]
            overall = sum(n for n, _ in per) / max(1e-9, sum(s for _, s in per))
            print(f"| {c} | {side} | " + " | ".join(f"{n / s:.1f}" if s else "-" for n, s in per)
                  + f" | {overall:.1f} | {'yes' if same[c] else 'NO'} |")
            rows.append({"config": c, "commit": side, "overall_tok_s": overall, "identical": same[c],
                         "by_category": {k: n / s if s else None for k, (n, s) in zip(cats, per)}})
    if a.json_out:
        a.json_out.write_text(json.dumps(rows, indent=1))
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
