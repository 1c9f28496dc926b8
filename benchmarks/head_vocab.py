#!/usr/bin/env python
"""How much the feature head's draft vocabulary limits it, and whether the prompt's own tokens would help.

1. Coverage: the share of the target's greedy Spec-Bench answers (``drafter_replay.py``'s cached outputs; made
   once if missing) that the head's draft vocabulary holds, per category, and how many of the other tokens occur
   in their prompt.
2. Extension, offline: the head teacher-forced on conversations of a ``scripts/head_data.py`` data set (features
   and targets recorded there) and scored four ways: over its draft vocabulary (as the runtime does); adding the
   prompt's tokens outside it, scored with the verifier's own LM-head rows (its output rows were initialised from
   them); adding every token seen so far; the full vocabulary.  Greedy acceptance by draft position and tokens per
   pass of a k = 4 chain, per kind of prompt.  Needs torch and transformers (build-time tools).

    python benchmarks/head_vocab.py .cache/demo/engine engines/demo/head ../shared/benchmarks/spec_bench/dev.jsonl \\
        --verifier .cache/demo/verifier-hf --data .cache/head/data --conversations 120
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

STEPS = 4
WAYS = ("draft vocabulary", "+ prompt tokens", "+ tokens seen so far", "full vocabulary")


def coverage(engine_dir: Path, vocab: set[int], questions: Path, max_new_tokens: int, cache: Path) -> None:
    from drafter_replay import outputs
    from specrt.runtime import Engine

    from specrt.spec_bench import load_questions

    engine = Engine.load(engine_dir, check_invariance=False)
    turns = outputs(engine, load_questions(questions), max_new_tokens, cache)
    inside, total, in_prompt = collections.Counter(), collections.Counter(), collections.Counter()
    for t in turns:
        prompt = set(t["prompt"])
        for c in (t["category"], "overall"):
            total[c] += len(t["output"])
            inside[c] += sum(x in vocab for x in t["output"])
            in_prompt[c] += sum(x not in vocab and x in prompt for x in t["output"])
    print("| category | answer tokens | in the draft vocabulary | outside it, in the prompt |\n|---|---:|---:|---:|")
    for c in sorted(total, key=lambda c: (c == "overall", c)):
        print(f"| {c} | {total[c]:,} | {inside[c] / total[c]:.3f} | {in_prompt[c]:,} of {total[c] - inside[c]:,} |")


def extension(head_dir: Path, verifier: Path, data: Path, conversations: int) -> None:
    import torch
    import train_head
    from specrt.export.feature_head import DRAFT_VOCAB, HeadConfig, make_head
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_t = AutoConfig.from_pretrained(verifier)
    layers = json.loads((head_dir / "head_config.json").read_text())["feature_layers"]
    shards = train_head.load_shards([data], layers)
    seqs = train_head.sequences(shards, 16)
    pick = np.random.default_rng(0).choice(len(seqs), min(conversations, len(seqs)), replace=False)
    seqs = [seqs[i] for i in sorted(pick)]
    model = AutoModelForCausalLM.from_pretrained(verifier, dtype=torch.float32)
    full = np.arange(cfg_t.vocab_size)
    # a head over the whole vocabulary: the trained rows where it has them, the verifier's LM head elsewhere
    head = make_head(HeadConfig.for_target(cfg_t, layers, len(full)), model.get_input_embeddings().weight.detach())
    with torch.no_grad():
        head.lm_head.weight.copy_(model.get_output_embeddings().weight.detach())
    del model
    train_head.init_from_head(head, head_dir, full)
    head.eval()
    draft = np.array(json.loads((head_dir / DRAFT_VOCAB).read_text()))
    in_draft = np.zeros(len(full), bool)
    in_draft[draft] = True
    to_draft = np.full(len(full), -1)
    to_draft[draft] = np.arange(len(draft))
    batches = train_head.Batches(shards, seqs, to_draft, 512, 1, 0)
    kind_of = {c["family"]: c["kind"] for sh in shards for c in (sh["convs"] or [])}
    # per way and kind: hits and tries by position, and each start's run of accepted drafts
    stats = {w: collections.defaultdict(lambda: [np.zeros(STEPS), np.zeros(STEPS), []]) for w in WAYS}
    with torch.no_grad():
        for i, a, b, _, family in seqs:
            tokens = np.asarray(shards[i]["tokens"][a:b])
            prompt = np.zeros(len(full), bool)
            prompt[tokens[np.asarray(shards[i]["roles"][a:b]) == 0]] = True
            for p in range(0, b - a - 2, 512):
                t = min(512, b - a - 1 - p)
                f, nx, tid, _, _, role2, _ = batches.window(i, a, b, p, t)
                logits = [lg[0].numpy() for lg in head.unrolled(torch.from_numpy(nx)[None],
                                                                 torch.from_numpy(f)[None], STEPS)]
                for way in WAYS:
                    if way == "+ tokens seen so far":  # slot s has read tokens a .. a + p + s + 1
                        seen = np.zeros((t, len(full)), bool)
                        for s in range(t):
                            seen[s, tokens[:p + s + 2]] = True
                        allowed = in_draft | prompt | seen
                    else:
                        allowed = {"draft vocabulary": in_draft, "+ prompt tokens": in_draft | prompt,
                                   "full vocabulary": np.ones(len(full), bool)}[way][None]
                    preds = [np.where(allowed, lg, -np.inf).argmax(-1) for lg in logits]
                    for key in (kind_of.get(family, "?"), "overall"):
                        hits, tried, runs = stats[way][key]
                        for s in range(t - STEPS):
                            if role2[s] <= 0:
                                continue
                            run = 0
                            for j in range(STEPS):
                                tried[j] += 1
                                if preds[j][s + j] != tid[s + j, 0]:
                                    break
                                hits[j] += 1
                                run += 1
                            runs.append(run)
    print(f"\n{len(seqs)} conversations, teacher-forced\n\n| kind | scored over | acceptance by position | "
          f"tokens per pass (k = {STEPS}) | positions |\n|---|---|---|---:|---:|")
    for key in sorted(stats[WAYS[0]], key=lambda k: (k == "overall", k)):
        for way in WAYS:
            hits, tried, runs = stats[way][key]
            acc = " / ".join(f"{x:.3f}" for x in hits / np.maximum(tried, 1))
            print(f"| {key} | {way} | {acc} | {1 + np.minimum(runs, STEPS).mean():.3f} | {len(runs):,} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", type=Path, help="an engine of the head's target (its greedy answers are the reference)")
    ap.add_argument("head", type=Path, help="a head directory (scripts/train_head.py --export)")
    ap.add_argument("questions", type=Path)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--cache", type=Path, default=Path(".cache/replay/spec_bench_outputs.json"))
    ap.add_argument("--verifier", type=Path, default=None, help="the target's checkpoint: with --data, part 2")
    ap.add_argument("--data", type=Path, default=None, help="a scripts/head_data.py output directory")
    ap.add_argument("--conversations", type=int, default=120)
    args = ap.parse_args()
    vocab = set(json.loads((args.head / "draft_vocab.json").read_text()))
    coverage(args.engine, vocab, args.questions, args.max_new_tokens, args.cache)
    if args.verifier and args.data:
        extension(args.head, args.verifier, args.data, args.conversations)
    return 0


if __name__ == "__main__":
    sys.exit(main())
