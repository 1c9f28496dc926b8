#!/usr/bin/env python
"""The feature head's live acceptance on a benchmark's questions, replayed offline: minutes, not a live run.

1. The verifier's greedy answers to every question, ``--max-new-tokens`` per turn, through its batched fp32 graph
   (``scripts/batch_gen.py``); a second turn follows the first answer's text, as ``specrt.spec_bench.build_prompts``
   builds it for a live run.  Recorded once as a ``scripts/head_data.py`` shard in ``--out`` (features and top-8;
   reused by later runs): only for scoring, never for training.
2. Every ``--head`` scored on it by ``train_head.evaluate``: its ``live`` replay, a chain of 4 drafted after every
   commit over each answer, per category -- what ``benchmarks/head_acceptance.py`` measures in a live run, where
   the engine's own numerics (int4, int8-rows) decide the answers; on the demo head the two agree within 0.04 per
   category at the first position (docs/drafters.md).
3. With ``--why``, where the head's first draft misses (teacher-forced, every answer position): by the verifier's own
   confidence in the token (its top-1 probability >= 0.9 or not) and by whether the token copies text -- its
   trigram occurs earlier in what the head reads (the prompt's last ``--prompt-tail`` tokens and the answer), or
   only in the part of the question before that, which the head never reads -- per category.

Needs torch and transformers (build-time tools), as the head's training does.

    python benchmarks/head_replay.py ../shared/benchmarks/spec_bench/dev.jsonl --verifier .cache/demo/verifier-hf \\
        --head engines/demo/head --out .cache/head/spec-bench-dev
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

STEPS = 4
MAX_CONTEXT = 2048  # the answers' graph; also the scoring window: a recorded turn is read whole, as live


def answer_shard(questions: Path, verifier: Path, out: Path, max_new_tokens: int, threads: int | None,
                 prompt_tail: int) -> None:
    """The verifier's greedy answers to every question's turns, as one shard in ``out`` (skipped if done), each
    with its prompt's last ``prompt_tail`` tokens."""
    import hashlib

    import batch_gen
    import head_data

    from specrt.spec_bench import category, load_questions

    made = {"questions_sha256": hashlib.sha256(questions.read_bytes()).hexdigest(), "max_new_tokens": max_new_tokens,
            "verifier": str(verifier.resolve())}
    if prompt_tail != head_data.PROMPT_TAIL:  # shards made before the option keep saying nothing of it
        made["prompt_tail"] = prompt_tail
    if (out / "shard_0000" / "done").is_file():
        was = json.loads((out / "replay.json").read_text()) if (out / "replay.json").is_file() else None
        if was != made:
            raise SystemExit(f"{out} holds answers to other questions or settings ({was}): give another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    (out / "replay.json").write_text(json.dumps(made) + "\n")
    tok = head_data.Tokens(verifier)
    cfg = json.loads((verifier / "config.json").read_text())
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    max_context = MAX_CONTEXT
    graph = batch_gen.export_batch_graph(verifier, out, max_context, head_data.FEATURE_LAYERS, head_data.TOP_K)
    target = batch_gen.BatchedTarget(graph, 16, cfg["num_hidden_layers"], cfg["num_key_value_heads"], head_dim,
                                     max_context, threads)
    qs = load_questions(questions)
    messages = {str(q.get("question_id", i)): [] for i, q in enumerate(qs)}
    writer = head_data.ShardWriter(out, 0)
    for turn in range(max(len(q["turns"]) for q in qs)):
        jobs = []
        for i, q in enumerate(qs):
            if turn >= len(q["turns"]):
                continue
            key = str(q.get("question_id", i))
            messages[key].append({"role": "user", "content": q["turns"][turn]})
            ids = tok.codec.encode(tok.codec.apply_chat_template(messages[key]), add_special_tokens=False)
            if len(ids) + max_new_tokens + 8 > max_context:
                continue
            jobs.append(batch_gen.Job(f"{key}/{turn + 1}", ids, keep_from=max(0, len(ids) - prompt_tail),
                                      meta={"source": questions.stem, "family": key, "kind": category(q),
                                            "sampled": False}))
        bar = head_data.Progress(len(jobs), f"verifier answers, turn {turn + 1}")
        for d in batch_gen.generate(target, jobs, max_new_tokens, tok.eos, turn_end=tok.turn_end,
                                    top_k=head_data.TOP_K):
            writer.add(d)
            key = d.job.key.rsplit("/", 1)[0]
            messages[key].append({"role": "assistant", "content": tok.decode(d.answers[0])})
            bar(1)
        bar.bar.close()
    writer.flush()


NOT_COPIED, COPIED_NEAR, COPIED_FAR = 0, 1, 2
CONFIDENT = 0.9  # the verifier's top-1 probability above which a token counts as one it is sure of


def copied(tokens, far: set[tuple[int, int, int]]):
    """For each position t of ``tokens``: ``COPIED_NEAR`` where the trigram ending at t already occurs in
    ``tokens[:t]`` (text the head reads), ``COPIED_FAR`` where it occurs only in ``far`` (the trigrams of text
    before ``tokens``, which the head never reads), else ``NOT_COPIED`` (the first two positions too)."""
    import numpy as np

    out = np.zeros(len(tokens), np.int8)
    seen: set[tuple[int, int, int]] = set()
    for t in range(2, len(tokens)):
        tri = (int(tokens[t - 2]), int(tokens[t - 1]), int(tokens[t]))
        out[t] = COPIED_NEAR if tri in seen else COPIED_FAR if tri in far else NOT_COPIED
        seen.add(tri)
    return out


def load_head(head_dir: Path, verifier: Path):
    """The head of ``head_dir`` on ``verifier``'s embeddings, its draft vocabulary and the target -> draft map."""
    import numpy as np
    import torch
    import train_head
    from specrt.export.feature_head import DRAFT_VOCAB, HeadConfig, make_head
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg_t = AutoConfig.from_pretrained(verifier)
    layers = json.loads((head_dir / "head_config.json").read_text())["feature_layers"]
    draft = np.array(json.loads((head_dir / DRAFT_VOCAB).read_text()), dtype=np.int64)
    to_draft = np.full(cfg_t.vocab_size, -1, dtype=np.int64)
    to_draft[draft] = np.arange(len(draft))
    model = AutoModelForCausalLM.from_pretrained(verifier, dtype=torch.float32)
    head = make_head(HeadConfig.for_target(cfg_t, layers, len(draft)), model.get_input_embeddings().weight.detach())
    del model
    train_head.init_from_head(head, head_dir, draft)
    return head, layers, draft, to_draft


def score(head_dir: Path, verifier: Path, data: Path, answer_tokens: int) -> dict:
    import train_head

    head, layers, draft, to_draft = load_head(head_dir, verifier)
    shards = train_head.load_shards([data], layers)
    seqs = train_head.sequences(shards, 2)
    return train_head.evaluate(head, shards, seqs, to_draft, draft, STEPS, 10**12, T=MAX_CONTEXT,
                               live_tokens=answer_tokens)


def why(head_dir: Path, verifier: Path, data: Path, questions: Path) -> dict:
    """First-draft acceptance, teacher-forced, per category and cell (confident or not x ``copied`` class):
    {category: [[hits, positions] x 6]}, cells ordered (not confident: not copied, near, far; confident: ...)."""
    import numpy as np
    import torch
    import train_head
    from tokenizers import Tokenizer

    from specrt.spec_bench import load_questions

    head, layers, draft, to_draft = load_head(head_dir, verifier)
    shards = train_head.load_shards([data], layers)
    seqs = train_head.sequences(shards, 2)
    tokenizer = Tokenizer.from_file(str(verifier / "tokenizer.json"))
    far_of = {}  # question id -> the trigrams of its turns' text (what a prompt may quote from before the window)
    for i, q in enumerate(load_questions(questions)):
        ids = [t for turn in q["turns"] for t in tokenizer.encode(turn).ids]
        far_of[str(q.get("question_id", i))] = {tuple(ids[j:j + 3]) for j in range(len(ids) - 2)}
    batches = train_head.Batches(shards, seqs, to_draft, MAX_CONTEXT, 1, 0)
    cells: dict[str, np.ndarray] = {}
    head.eval()
    with torch.no_grad():
        for i, a, b, *_ in seqs:
            conv = train_head.conversation(shards[i], a)
            tokens = np.asarray(shards[i]["tokens"][a:b])
            copy = copied(tokens, far_of.get(conv["id"].rsplit("/", 1)[0], set()))
            sure = np.exp(np.asarray(shards[i]["top_logp"][a:b, 0], np.float32)) >= CONFIDENT
            tally = cells.setdefault(conv["kind"], np.zeros((6, 2), np.int64))
            for p in range(0, b - a - 2, MAX_CONTEXT):
                t = min(MAX_CONTEXT, b - a - 1 - p)
                features, next_ids, top_ids, _, _, role, _ = batches.window(i, a, b, p, t)
                logits = head.unrolled(torch.from_numpy(next_ids)[None], torch.from_numpy(features)[None], 1)[0]
                first = draft[logits[0].argmax(-1).numpy()]
                for s in range(t - 1):
                    if role[s] <= 0:
                        continue
                    # slot s drafts token p + s + 2 from the verifier's distribution at row p + s + 1
                    cell = 3 * int(sure[p + s + 1]) + int(copy[p + s + 2])
                    tally[cell] += (int(first[s] == top_ids[s, 0]), 1)
    cells["all"] = sum(cells.values())
    return {k: v.tolist() for k, v in cells.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("questions", type=Path, help="a Spec-Bench style JSONL (question_id, category, turns)")
    ap.add_argument("--verifier", type=Path, required=True, help="the head's target, a HuggingFace checkpoint")
    ap.add_argument("--head", type=Path, action="append", required=True, help="a head directory (repeatable)")
    ap.add_argument("--out", type=Path, required=True, help="where the answers' shard is written once and reused")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="per turn (default 96, as make bench-spec)")
    ap.add_argument("--prompt-tail", type=int, default=None, metavar="N",
                    help="record (and let the head read) each prompt's last N tokens (default: as the training "
                         "data, scripts/head_data.py's PROMPT_TAIL); a new N needs its own --out")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    ap.add_argument("--why", action="store_true",
                    help="also: where each head's first draft misses, by the verifier's confidence and by copying")
    args = ap.parse_args()
    if not args.questions.is_file():
        raise SystemExit(f"{args.questions}: no such file")
    if not (args.verifier / "config.json").is_file():
        raise SystemExit(f"--verifier {args.verifier}: not a HuggingFace checkpoint (no config.json)")
    for h in args.head:
        if not (h / "head_config.json").is_file():
            raise SystemExit(f"--head {h}: not a head directory (no head_config.json)")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    import head_data

    answer_shard(args.questions, args.verifier, args.out, args.max_new_tokens, args.threads,
                 args.prompt_tail or head_data.PROMPT_TAIL)
    results = {}
    for h in args.head:
        ev = score(h, args.verifier, args.out, args.max_new_tokens)
        results[str(h)] = ev
        print(f"\n{h}: live replay, a chain of {STEPS} ({args.questions.name}, greedy, {args.max_new_tokens} new "
              f"tokens per turn)\n\n| category | passes | acceptance at positions 1..{STEPS} | tokens/pass |\n"
              "|---|---:|---|---:|")
        for kind, r in sorted(ev["live"].items(), key=lambda kv: (kv[0] == "all", kv[0])):
            print(f"| {'**overall**' if kind == 'all' else kind} | {r['passes']:,} | "
                  + " / ".join(f"{a:.3f}" for a in r["by_position"]) + f" | {r['tokens_per_pass']:.2f} |")
        if args.why:
            ev["why"] = why(h, args.verifier, args.out, args.questions)
            print(f"\n{h}: first-draft acceptance, teacher-forced, by the verifier's top-1 probability and by where "
                  f"the token's trigram occurs before it (acceptance (share of the category's positions))\n\n"
                  "| category | " + " | ".join(f"p {op} {CONFIDENT}, {c}" for op in ("<", ">=")
                                              for c in ("not copied", "copied near", "copied far")) + " | all |\n"
                  "|---|---:|---:|---:|---:|---:|---:|---:|")
            for kind, c in sorted(ev["why"].items(), key=lambda kv: (kv[0] == "all", kv[0])):
                n = sum(x[1] for x in c)
                print(f"| {'**overall**' if kind == 'all' else kind} | "
                      + " | ".join(f"{x[0] / max(1, x[1]):.2f} ({x[1] / max(1, n):.2f})" for x in c)
                      + f" | {sum(x[0] for x in c) / max(1, n):.3f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
