#!/usr/bin/env python
"""Train the feature-level draft head (EAGLE-3 style) from the verifier's own features: resumable, on the CPU.

Reads the shards of ``scripts/head_data.py`` (the verifier's hidden states and top-8 log-probs), and
trains ``specrt.export.feature_head``'s head to predict the verifier's next-token distribution several
draft steps ahead from its own previous outputs (the training-time test), over a reduced vocabulary
(the most frequent tokens of the training data), embeddings frozen from the verifier.  Hours of CPU;
CI never runs it.  Checkpoints every ``--save-every`` steps and on Ctrl-C; rerun the same command to
resume.  ``--export DIR`` writes the head (fp16 safetensors, config, draft vocabulary, model card).

    python scripts/train_head.py --verifier .cache/demo/verifier-hf --data .cache/head/data \\
        --out .cache/head/run --minutes 180
    python scripts/train_head.py --verifier .cache/demo/verifier-hf --data .cache/head/data \\
        --out .cache/head/run --export engines/demo/head

Held-out evaluation (``--eval-every``): greedy acceptance by draft position on held-out conversations,
teacher-forced exactly as speculation sees it (position j counts only where positions < j were right),
and the expected tokens per target pass of a k = 4 chain; the curve goes to ``OUT/curve.jsonl``.
``first_after_miss`` is the first position's acceptance where the previous position's draft was wrong;
``first_not_copied`` is it where the token to draft does not repeat a 16-gram of its conversation (where only the
head can draft: loops and quotes are a context drafter's).  ``live`` replays the greedy held-out answers as a live
k = 4 chain drafts them (``speculate``: a pass after every commit, each answer's first 96 tokens), overall and by
kind; it is what early stopping and ``--checkpoint best`` maximise, and the number to compare with a live run
(``benchmarks/head_acceptance.py``).  To score a head on answers it never trained on (e.g. the verifier's answers
to a benchmark's questions, written as a ``head_data.py`` shard) without training:

    python scripts/train_head.py --verifier .cache/demo/verifier-hf --data .cache/head/data --out .cache/head/eval \
        --init-from engines/demo/head --total-steps 0 --eval-data OTHER_DATA --eval-all --eval-tokens 1000000000
"""
from __future__ import annotations

import argparse
import itertools
import json
import signal
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import batch_gen  # scripts/ is not a package
import head_data

# new tokens per answer in the live benchmark (``benchmarks/head_acceptance.py --max-new-tokens``) that the held-out
# evaluation's ``live`` replay mirrors
LIVE_ANSWER_TOKENS = 96

LEGACY_LAYERS = (3, 15, 27, 30)  # what shards without meta.json store (an earlier head_data.py), in this order


def load_shards(dirs: list[Path], layers: list[int]) -> list[dict]:
    """Every finished shard, memory-mapped; ``layers_idx``: where ``layers`` sit in its features."""
    shards = []
    for d in dirs:
        for s in sorted(Path(d).glob("shard_*")):
            if not (s / "done").is_file():
                continue
            sh = {name: np.load(s / f"{name}.npy", mmap_mode="r") for name in
                  ("features", "top_ids", "top_logp", "tokens", "roles", "starts")}
            meta = json.loads((s / "meta.json").read_text()) if (s / "meta.json").is_file() else {}
            stored = tuple(meta.get("feature_layers", LEGACY_LAYERS))
            if not set(layers) <= set(stored):
                raise SystemExit(f"{s} stores the features of layers {stored}, not {layers}")
            sh["layers_idx"] = [stored.index(x) for x in layers]
            # who each conversation is: its source and family (the held-out split's unit); none in legacy shards
            sh["convs"] = json.loads((s / "convs.json").read_text()) if (s / "convs.json").is_file() else None
            shards.append(sh)
    if not shards:
        raise SystemExit(f"no finished shards under {', '.join(map(str, dirs))}: run scripts/head_data.py first")
    return shards


def sequences(shards: list[dict], min_len: int) -> list[tuple[int, int, int, str, str]]:
    """(shard, start, end, source, family) of every conversation long enough for one window."""
    out = []
    for i, sh in enumerate(shards):
        convs = sh["convs"] or [{}] * (len(sh["starts"]) - 1)
        for (a, b), c in zip(itertools.pairwise(sh["starts"]), convs):
            if b - a >= min_len:
                out.append((i, int(a), int(b), c.get("source", "legacy"), c.get("family", f"legacy/{i}/{a}")))
    return out


def held_out_families(seqs, share: float) -> set[str]:
    """About ``share`` of the families of every source, chosen by a stable hash of the family's name: a template
    or a document is either all trained on or all held out, so the held-out score measures prompts the head
    has not seen the like of (a split by rows put conversations of one template on both sides)."""
    import hashlib

    def h(name: str) -> float:
        return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 16**8

    families: dict[str, set[str]] = {}
    for *_, source, family in seqs:
        families.setdefault(source, set()).add(family)
    held = set()
    for fams in families.values():
        ranked = sorted(fams, key=h)
        held |= set(ranked[:max(1, round(share * len(ranked)))]) if len(ranked) > 1 else set()
    return held


def draft_vocabulary(shards: list[dict], seqs, size: int) -> np.ndarray:
    """The ``size`` most frequent next-token choices of the verifier in the training data (its top-1s)."""
    counts = None
    for i, a, b, *_ in seqs:
        ids = np.asarray(shards[i]["top_ids"][a:b, 0])
        c = np.bincount(ids, minlength=1)
        counts = c if counts is None else (np.pad(counts, (0, max(0, len(c) - len(counts))))
                                           + np.pad(c, (0, max(0, len(counts) - len(c)))))
    order = np.argsort(-counts, kind="stable")[:size]
    return np.sort(order[counts[order] > 0]).astype(np.int64)


class Batches:
    """Random windows of T slots: slot t reads features at p + t and token p + t + 1, and is trained on the
    verifier's distribution at p + t + 1 (the token after it)."""

    def __init__(self, shards, seqs, to_draft, T, B, seed, repeat_weight: float = 1.0):
        self.shards, self.seqs, self.to_draft, self.T, self.B = shards, seqs, to_draft, T, B
        self.rng = np.random.default_rng(seed)
        # the loss weight of a slot whose token completes a 16-gram already in its conversation: a context drafter
        # proposes those anyway (``hybrid`` asks the head only without a match), and a third of the answer tokens
        # are such loops, which would otherwise teach the head to continue loops
        self.repeat_weight, self.copied = repeat_weight, {}
        self.weights = np.array([s[2] - s[1] - 1 for s in seqs], dtype=np.float64)
        self.weights /= self.weights.sum()

    def window(self, i, a, b, p, T):
        sh = self.shards[i]
        feats = np.asarray(sh["features"][a + p:a + p + T][:, sh["layers_idx"]], dtype=np.float32).reshape(T, -1)
        next_ids = np.asarray(sh["tokens"][a + p + 1:a + p + T + 1], dtype=np.int64)
        tid = np.asarray(sh["top_ids"][a + p + 1:a + p + T + 1], dtype=np.int64)
        tlp = np.asarray(sh["top_logp"][a + p + 1:a + p + T + 1], dtype=np.float32)
        # who wrote the token each slot is trained to predict (1: the verifier); none past the conversation
        role2 = np.asarray(sh["roles"][a + p + 2:min(a + p + T + 2, b)], dtype=np.float32)
        role2 = np.pad(role2, (0, T - len(role2)))
        valid = np.ones(T, dtype=np.float32)
        return feats, next_ids, tid, tlp, None, role2, valid

    def __call__(self):
        import torch

        T, B = self.T, self.B
        rows = []
        for s in self.rng.choice(len(self.seqs), size=B, p=self.weights):
            i, a, b = self.seqs[s][:3]
            length = b - a
            t = min(T, length - 1)
            p = int(self.rng.integers(0, length - t)) if length - t > 0 else 0
            f, nx, tid, tlp, _, role2, valid = self.window(i, a, b, p, t)
            if self.repeat_weight != 1.0:
                if s not in self.copied:
                    self.copied[s] = batch_gen.repeated(self.shards[i]["tokens"][a:b])
                copied = self.copied[s][p + 2:p + t + 2]  # the token each slot is trained to predict
                valid = valid * np.where(np.pad(copied, (0, t - len(copied))), self.repeat_weight, 1.0)
            pad = T - t
            rows.append((np.pad(f, ((0, pad), (0, 0))), np.pad(nx, (0, pad)), np.pad(tid, ((0, pad), (0, 0))),
                         np.pad(tlp, ((0, pad), (0, 0)), constant_values=-30), np.pad(role2, (0, pad)),
                         np.pad(valid[:t], (0, pad))))
        f, nx, tid, tlp, role2, valid = (np.stack(x) for x in zip(*rows))
        d = self.to_draft[tid]  # [B, T, 8] draft index or -1
        w = np.exp(tlp) * (d >= 0)
        mass = w.sum(-1, keepdims=True)
        w = np.where(mass > 0, w / np.maximum(mass, 1e-9), 0)
        weight = valid * np.where(role2 > 0, 1.0, 0.3) * (mass[..., 0] > 0)
        return (torch.from_numpy(nx), torch.from_numpy(f), torch.from_numpy(np.maximum(d, 0)),
                torch.from_numpy(w.astype(np.float32)), torch.from_numpy(weight.astype(np.float32)),
                torch.from_numpy(tid[..., 0]))


def loss_fn(logits_steps, d, w, weight, decay=0.8, miss_weight: float = 1.0):
    """Cross-entropy against the verifier's top-8 at every unrolled step, later steps decayed.  ``miss_weight``
    scales the slots of every chain that starts right after a slot whose first draft is wrong (the head's own
    greedy choice, this batch): live, a chain's first draft always follows the verifier's correction of a wrong
    one (or a bonus token), and those positions are harder than the average."""
    import torch

    if miss_weight != 1.0:
        first = logits_steps[0].detach().argmax(-1)  # [B, T] draft index
        miss = (first != d[..., 0]) | (w[..., 0] <= 0)  # wrong, or the verifier's choice is outside the vocabulary
    total, parts = 0.0, []
    for j, logits in enumerate(logits_steps):
        logp = torch.log_softmax(logits.float(), -1).gather(-1, d)  # [B, T, 8]
        ce = -(w * logp).sum(-1)  # [B, T]
        m = weight.clone()
        m[:, :j] = 0  # slots before j have no real history for step j
        if miss_weight != 1.0:  # step j at slot t belongs to the chain started at t - j, after slot t - j - 1
            m[:, j + 1:] *= torch.where(miss[:, :miss.shape[1] - j - 1], miss_weight, 1.0)
        part = (ce * m).sum() / m.sum().clamp(min=1)
        parts.append(float(part.detach()))
        total = total + decay ** j * part
    return total, parts


def speculate(chain: np.ndarray, truth: np.ndarray, roles: np.ndarray, answer_tokens: int = LIVE_ANSWER_TOKENS):
    """Replay greedy chain speculation over one conversation's answers the way a live run drafts them.

    ``chain[s, j]``: the head's j-th draft of a chain started at slot s (the token at s + 2 + j); ``truth[x]``: the
    verifier's greedy token at x; ``roles[x]``: 1 where the verifier wrote token x.  Each answer's first token comes
    from the prompt's pass; every pass then drafts ``k = chain.shape[1]`` tokens after the last committed one, keeps
    the longest right prefix and commits it plus the verifier's own next token -- only the first ``answer_tokens``
    of every answer, as a live benchmark capped at that many new tokens sees them.  Passes start right after a
    correction, so this weighs the hard positions as live speculation does, unlike acceptance over every
    position.  Returns (offered[k], accepted[k], passes, tokens)."""
    k = chain.shape[1]
    offered, accepted = np.zeros(k, np.int64), np.zeros(k, np.int64)
    passes = tokens = 0
    x, n = 0, len(roles)
    while x < n:
        if roles[x] != 1:
            x += 1
            continue
        first = x
        while x < n and roles[x] == 1:
            x += 1
        end = min(x, first + answer_tokens)
        c = first  # the last committed token
        while c < end - 1:
            run = 0
            for j in range(min(k, end - 1 - c)):
                offered[j] += 1
                if c - 1 >= len(chain) or chain[c - 1, j] != truth[c + 1 + j]:
                    break
                accepted[j] += 1
                run += 1
            step = min(run + 1, end - 1 - c)  # no bonus token past the answer's end
            passes += 1
            tokens += step
            c += step
    return offered, accepted, passes, tokens


def evaluate(head, shards, seqs, to_draft, draft_vocab, steps: int, max_tokens: int, T: int = 512,
             live_tokens: int = LIVE_ANSWER_TOKENS):
    """Greedy chain acceptance by draft position on held-out conversations (assistant tokens only), and
    ``live``: the same head replayed as a live k = ``steps`` chain drafts (``speculate``) on the greedy ones,
    overall and by kind -- the number to compare with ``benchmarks/head_acceptance.py``."""
    import torch

    hits = np.zeros(steps)
    tried = np.zeros(steps)
    chain = []  # per start position: how many consecutive drafts were right
    # The first position again, only where the previous position's first draft was wrong: live speculation drafts
    # mostly right after a rejection, where the text is harder (Spec-Bench, the demo head: 0.33 there against 0.40
    # over every position, and 0.31 live), so this is the number that predicts live acceptance.
    after_miss = [0, 0]  # [hits, tried]
    # The first position again, only where the token to draft does not repeat a 16-gram of the conversation: a
    # third of the answer tokens do (the verifier loops), a context drafter proposes those for free, and they make
    # the head look better than it is where only the head can draft (``hybrid`` asks it only without a match).
    not_copied = [0, 0]
    live: dict[str, list] = {}  # kind -> [offered, accepted, passes, tokens]
    batches = Batches(shards, seqs, to_draft, T, 1, 0)
    seen = 0
    head.eval()
    with torch.no_grad():
        for i, a, b, *_ in seqs:
            copied = batch_gen.repeated(shards[i]["tokens"][a:b])
            preds = [[] for _ in range(steps)]  # every slot's drafts, the whole conversation
            for p in range(0, b - a - 2, T):
                t = min(T, b - a - 1 - p)
                f, nx, tid, _, _, role2, _ = batches.window(i, a, b, p, t)
                logits = head.unrolled(torch.from_numpy(nx)[None], torch.from_numpy(f)[None], steps)
                pred = [draft_vocab[lg[0].argmax(-1).numpy()] for lg in logits]  # [steps][t] target ids
                for j in range(steps):
                    preds[j].append(pred[j])
                target = tid[:, 0]
                for s in range(t - steps):
                    if role2[s] <= 0:
                        continue
                    if s and role2[s - 1] > 0 and pred[0][s - 1] != target[s - 1]:
                        after_miss[0] += int(pred[0][s] == target[s])
                        after_miss[1] += 1
                    if not copied[p + s + 2]:  # the token slot s drafts
                        not_copied[0] += int(pred[0][s] == target[s])
                        not_copied[1] += 1
                    run = 0
                    for j in range(steps):
                        tried[j] += 1
                        if pred[j][s + j] == target[s + j]:
                            hits[j] += 1
                            run += 1
                        else:
                            break
                    chain.append(run)
                seen += t
            conv = conversation(shards[i], a)
            if not conv.get("sampled", False):  # a sampled answer is not what greedy decoding would commit
                full = [np.concatenate(pj) for pj in preds]
                drafts = np.full((len(full[0]), steps), -1, np.int64)  # drafts[s, j] = the j-th step's draft at s + j
                for j in range(steps):
                    drafts[:len(full[j]) - j, j] = full[j][j:]
                truth = np.concatenate([[-1], np.asarray(shards[i]["top_ids"][a:b - 1, 0], np.int64)])
                got = speculate(drafts, truth, np.asarray(shards[i]["roles"][a:b]), live_tokens)
                for key in ("all", conv.get("kind", "unknown")):
                    acc = live.setdefault(key, [np.zeros(steps, np.int64), np.zeros(steps, np.int64), 0, 0])
                    for m in range(4):
                        acc[m] = acc[m] + got[m]
            if seen >= max_tokens:
                break
    head.train()
    by_pos = (hits / np.maximum(tried, 1)).round(4).tolist()
    runs = np.array(chain)
    tokens_per_pass = {k: float(1 + np.minimum(runs, k).mean()) if len(runs) else 1.0 for k in (1, 2, 3, 4)
                       if k <= steps}
    return {"acceptance_by_position": by_pos, "first_after_miss": round(after_miss[0] / max(1, after_miss[1]), 4),
            "first_not_copied": round(not_copied[0] / max(1, not_copied[1]), 4),
            "tokens_per_pass": tokens_per_pass, "positions": len(runs),
            "live": {kind: live_summary(*acc) for kind, acc in sorted(live.items())}}


def score(ev: dict) -> float:
    """What early stopping and ``--checkpoint best`` maximise: tokens per pass of the live replay (a k = 4 chain
    over the greedy held-out answers' first 96 tokens), which predicts a live run; acceptance over every position
    overstates it (0.55 against 0.47 at the first position for the demo head) and ranks heads by easy positions.
    Tokens per pass over every position where no held-out answer is greedy."""
    live = ev.get("live", {}).get("all")
    return live["tokens_per_pass"] if live and live["passes"] else ev["tokens_per_pass"][max(ev["tokens_per_pass"])]


def conversation(shard: dict, start: int) -> dict:
    """The ``convs.json`` record of the conversation starting at row ``start`` ({} in legacy shards)."""
    if not shard["convs"]:
        return {}
    return shard["convs"][int(np.searchsorted(shard["starts"], start))]


def live_summary(offered, accepted, passes: int, tokens: int) -> dict:
    return {"by_position": (accepted / np.maximum(offered, 1)).round(4).tolist(),
            "tokens_per_pass": round(tokens / max(1, passes), 4), "passes": int(passes)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verifier", type=Path, required=True)
    ap.add_argument("--data", type=Path, action="append", required=True, help="head_data.py output (repeatable)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--features", choices=("eagle3", "eagle1"), default="eagle3",
                    help="eagle3: layers 3, 15, 27 concatenated; eagle1: the last layer before the norm")
    ap.add_argument("--draft-vocab", type=int, default=8192,
                    help="output tokens: the data's most frequent (8,192 cover 97.6%% of the verifier's answer "
                         "tokens in head_data.py's data, 16,384 99.8%% at twice the output layer's cost); a resumed "
                         "run keeps the vocabulary it started with (OUT/draft_vocab.json)")
    ap.add_argument("--steps-unrolled", type=int, default=3, help="training-time test: draft steps unrolled")
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--repeat-weight", type=float, default=1.0,
                    help="loss weight of a token that completes a 16-gram its conversation already held (a loop, "
                    "which the n-gram drafter proposes anyway); 1: no different from the others")
    ap.add_argument("--miss-weight", type=float, default=1.0,
                    help="loss weight of the positions a live chain drafts from: those right after a position whose "
                    "first draft is wrong (where live speculation starts a pass); 1: no different from the others")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--total-steps", type=int, default=6000, help="for the learning-rate schedule")
    ap.add_argument("--warmup", type=int, default=100, help="warm-up steps (at most a tenth of --total-steps)")
    ap.add_argument("--minutes", type=float, default=None, help="stop after this long (checkpointed)")
    ap.add_argument("--save-every", type=int, default=200)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--eval-tokens", type=int, default=30000)
    ap.add_argument("--held-out", type=float, default=0.05,
                    help="share of every source's families (templates, documents) held out (default 0.05)")
    ap.add_argument("--eval-conversations", type=int, default=600,
                    help="held-out conversations evaluated during training (a fixed sample; default 600)")
    ap.add_argument("--patience", type=int, default=None,
                    help="stop after this many evaluations without a better held-out score (early stopping)")
    ap.add_argument("--eval-data", type=Path, default=None,
                    help="evaluate on this data set's held-out split instead (e.g. the verifier's answers when "
                    "training on a corpus)")
    ap.add_argument("--eval-all", action="store_true",
                    help="with --eval-data: every conversation of it, not only its held-out families (a data set "
                    "no head trained on, e.g. answers to a benchmark's questions, scored with --total-steps 0 "
                    "--init-from HEAD)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the matmuls (AVX-512 BF16 / AMX CPUs; ignored, with a warning, elsewhere)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init-from", type=Path, default=None, metavar="HEAD_DIR",
                    help="start a new run from an exported head (e.g. engines/demo/head): its weights and its draft "
                    "vocabulary (--draft-vocab is ignored unless --new-vocab); ignored when OUT holds a checkpoint")
    ap.add_argument("--new-vocab", action="store_true",
                    help="with --init-from: this data's --draft-vocab most frequent tokens instead of the head's "
                    "vocabulary (a head trained on other data covers this data's tokens less); rows of tokens in "
                    "both carry over, the others start from the verifier's LM head")
    ap.add_argument("--export", type=Path, default=None, help="write the trained head here and stop")
    ap.add_argument("--checkpoint", choices=("best", "last"), default="best",
                    help="what --export writes: the checkpoint with the best held-out tokens per pass, replayed as a "
                    "live k = 4 chain (default; "
                    "the last one when no evaluation has run) or the last one")
    args = ap.parse_args()
    if args.new_vocab and not args.init_from:
        ap.error("--new-vocab rebuilds the vocabulary of an --init-from head; a run from scratch always builds one")

    import torch
    from specrt.export.feature_head import (
        DRAFT_VOCAB,
        HEAD_WEIGHTS,
        HeadConfig,
        make_head,
        trainable_state,
    )
    from tqdm import tqdm
    from transformers import AutoConfig, AutoModelForCausalLM

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.bf16 and not cpu_has_bf16():
        print("--bf16 ignored: this CPU has no AVX-512 BF16 / AMX, where bf16 matmuls are emulated (measured here: "
              "no step finished in 4 minutes on an AVX2-only CPU, against 15 s in fp32)", file=sys.stderr)
        args.bf16 = False
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.eval_all and not args.eval_data:
        raise SystemExit("--eval-all scores every conversation of --eval-data: name the data set")
    if args.init_from and not all((args.init_from / name).is_file() for name in (DRAFT_VOCAB, HEAD_WEIGHTS)):
        raise SystemExit(f"--init-from {args.init_from}: not an exported head (no {HEAD_WEIGHTS} / {DRAFT_VOCAB})")
    layers = [3, 15, 27] if args.features == "eagle3" else [30]
    shards = load_shards(args.data, layers)
    seqs = sequences(shards, 16)
    # the held-out split never changes between runs: whole families by a hash of their names (legacy shards,
    # without families, fall back to single conversations -- the split that overstated generalisation)
    held = held_out_families(seqs, args.held_out)
    train_seqs = [s for s in seqs if s[4] not in held]
    eval_seqs = [s for s in seqs if s[4] in held]
    if len(eval_seqs) > args.eval_conversations:  # a fixed sample, spread over every held-out family
        pick = np.random.default_rng(12345).choice(len(eval_seqs), args.eval_conversations, replace=False)
        eval_seqs = [eval_seqs[i] for i in sorted(pick)]
    eval_shards = shards
    if args.eval_data:  # evaluate on another data set's held-out split (the same split as when it trains)
        eval_shards = load_shards([args.eval_data], layers)
        other = sequences(eval_shards, 16)
        held_other = held_out_families(other, args.held_out)
        eval_seqs = [s for s in other if args.eval_all or s[4] in held_other]
    print(f"{len(train_seqs):,} conversations to train on, {len(eval_seqs):,} held out "
          f"({len(held):,} families)", file=sys.stderr)
    vocab_path = args.out / DRAFT_VOCAB
    if vocab_path.is_file():
        draft_vocab = np.array(json.loads(vocab_path.read_text()), dtype=np.int64)
    elif args.init_from and not args.new_vocab:  # the head's own vocabulary: every output row it learned carries over
        draft_vocab = np.array(json.loads((args.init_from / DRAFT_VOCAB).read_text()), dtype=np.int64)
        vocab_path.write_text(json.dumps(draft_vocab.tolist()))
    else:
        draft_vocab = draft_vocabulary(shards, train_seqs, args.draft_vocab)
        vocab_path.write_text(json.dumps(draft_vocab.tolist()))
    target_cfg = AutoConfig.from_pretrained(args.verifier)
    to_draft = np.full(target_cfg.vocab_size, -1, dtype=np.int64)
    to_draft[draft_vocab] = np.arange(len(draft_vocab))
    cfg = HeadConfig.for_target(target_cfg, layers, len(draft_vocab))
    verifier = AutoModelForCausalLM.from_pretrained(args.verifier, dtype=torch.float32)
    embed = verifier.get_input_embeddings().weight.detach().clone()
    lm_head = verifier.get_output_embeddings().weight.detach()
    del verifier
    head = make_head(cfg, embed)
    with torch.no_grad():  # start the reduced output head from the verifier's own rows of its LM head
        head.lm_head.weight.copy_(lm_head[torch.from_numpy(draft_vocab)])
    opt = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0,
                            betas=(0.9, 0.95))
    step, seconds, tokens_seen = 0, 0.0, 0
    ckpt = args.out / "ckpt.pt"
    if args.export and not ckpt.is_file() and not args.init_from:
        raise SystemExit(f"--export: {args.out} holds no checkpoint (train first, or give --init-from HEAD_DIR to "
                         "export that head as it is, scored on this data's held-out split)")
    if args.init_from and not ckpt.is_file():
        init_from_head(head, args.init_from, draft_vocab)
    source = ckpt
    if args.export and args.checkpoint == "best" and (args.out / "best.pt").is_file():
        source = args.out / "best.pt"
    trained_args = None
    if source.is_file():
        state = torch.load(source, weights_only=False)
        trained_args = state.get("args")
        head.load_state_dict(state["head"], strict=False)
        opt.load_state_dict(state["opt"])
        step, seconds, tokens_seen = state["step"], state["seconds"], state.get("tokens", 0)
        print(f"resumed from step {step} ({seconds / 60:.0f} min of training)", file=sys.stderr)

    if args.export:
        return export(args, cfg, head, draft_vocab, eval_shards, eval_seqs, to_draft, step, seconds,
                      tokens_seen, train_seqs, trained_args)

    def save(path: Path = ckpt):
        tmp = path.with_suffix(".tmp")
        torch.save({"head": trainable_state(head), "opt": opt.state_dict(), "step": step, "seconds": seconds,
                    "tokens": tokens_seen, "score": best_tpp, "args": vars(args) | {"out": str(args.out),
                                                                  "data": [str(d) for d in args.data],
                                                                  "verifier": str(args.verifier),
                                                                  "export": None}}, tmp)
        tmp.replace(path)

    best = args.out / "best.pt"
    # (a best.pt from before the live replay holds no "score": the next evaluation replaces it)
    best_tpp = torch.load(best, weights_only=False).get("score", 0.0) if best.is_file() else 0.0
    since_best = 0
    stop = {"now": False}
    signal.signal(signal.SIGINT, lambda *_: stop.__setitem__("now", True))
    signal.signal(signal.SIGTERM, lambda *_: stop.__setitem__("now", True))
    batches = Batches(shards, train_seqs, to_draft, args.window, args.batch, args.seed + step, args.repeat_weight)
    eval_window = evaluation_window(args.window)
    curve = (args.out / "curve.jsonl").open("a")
    deadline = time.time() + 60 * args.minutes if args.minutes else None
    if step == 0 and args.init_from:  # where the loaded head stands on this data's held-out families
        ev = evaluate(head, eval_shards, eval_seqs, to_draft, draft_vocab, 4, args.eval_tokens, T=eval_window)
        curve.write(json.dumps({"step": 0, "minutes": 0.0, "tokens": 0, "loss": None, **ev}) + "\n")
        curve.flush()
        print(f"step 0 (--init-from {args.init_from}): {json.dumps(ev)}", file=sys.stderr)
        best_tpp = score(ev)
        save(best)  # the loaded head stays the best until training beats it
    bar = tqdm(total=args.total_steps, initial=step, desc="train head", unit="step")
    t_last = time.time()
    while step < args.total_steps and not stop["now"] and (deadline is None or time.time() < deadline):
        nx, f, d, w, weight, _ = batches()
        warm = min(args.warmup, max(1, args.total_steps // 10))
        lr = args.lr * min(1.0, (step + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * min(1.0, step / args.total_steps))))
        for gparam in opt.param_groups:
            gparam["lr"] = lr
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = head.unrolled(nx, f, args.steps_unrolled)
        loss, parts = loss_fn(logits, d, w, weight, miss_weight=args.miss_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
        opt.step()
        step += 1
        now = time.time()
        seconds += now - t_last
        t_last = now
        tokens_seen += int(weight.gt(0).sum())
        bar.update(1)
        bar.set_postfix(loss=f"{float(loss):.3f}", steps=" ".join(f"{p:.2f}" for p in parts), lr=f"{lr:.1e}")
        if step % args.save_every == 0:
            save()
        if step % args.eval_every == 0:
            ev = evaluate(head, eval_shards, eval_seqs, to_draft, draft_vocab, 4, args.eval_tokens, T=eval_window)
            rec = {"step": step, "minutes": round(seconds / 60, 1), "tokens": tokens_seen, "loss": float(loss), **ev}
            curve.write(json.dumps(rec) + "\n")
            curve.flush()
            bar.write(json.dumps(rec))
            # the best held-out score so far is kept apart: a small data set overfits late in a run
            tpp = score(ev)
            if tpp > best_tpp:
                best_tpp, since_best = tpp, 0
                save(best)
            else:
                since_best += 1
                if args.patience and since_best >= args.patience:
                    bar.write(f"early stop: {since_best} evaluations without a better held-out score "
                              f"(best {best_tpp:.3f} tokens per pass, replayed live)")
                    break
            t_last = time.time()  # evaluation is not training time
    bar.close()
    save()
    print(f"saved {ckpt} at step {step} ({seconds / 60:.0f} min)", file=sys.stderr)
    return 0


def init_from_head(head, head_dir: Path, draft_vocab: np.ndarray) -> None:
    """Load an exported head's weights into ``head``; output rows follow their target token into the new draft
    vocabulary (a head trained on other data has another vocabulary)."""
    import torch
    from safetensors.torch import load_file
    from specrt.export.feature_head import DRAFT_VOCAB, HEAD_WEIGHTS

    weights = load_file(str(head_dir / HEAD_WEIGHTS))
    old_vocab = np.array(json.loads((head_dir / DRAFT_VOCAB).read_text()), dtype=np.int64)
    own = head.state_dict()
    for name, w in weights.items():
        if name != "lm_head.weight" and (name not in own or own[name].shape != w.shape):
            raise SystemExit(f"--init-from {head_dir}: {name} {tuple(w.shape)} does not fit this head "
                             f"({tuple(own[name].shape) if name in own else 'absent'}): another size or feature set")
    old_row = {int(t): i for i, t in enumerate(old_vocab)}
    pairs = [(j, old_row[int(t)]) for j, t in enumerate(draft_vocab) if int(t) in old_row]
    with torch.no_grad():
        head.load_state_dict({k: v.float() for k, v in weights.items() if k != "lm_head.weight"}, strict=False)
        if pairs:
            new_idx, old_idx = (torch.tensor(x) for x in zip(*pairs))
            head.lm_head.weight[new_idx] = weights["lm_head.weight"][old_idx].float()
    print(f"initialised from {head_dir}: {len(pairs):,} of {len(draft_vocab):,} output rows carried over",
          file=sys.stderr)


def cpu_has_bf16() -> bool:
    """Whether the CPU multiplies bf16 natively (Linux: its flags); True where that cannot be read."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True
    return any(f in flags.split() for f in ("avx512_bf16", "amx_bf16"))


def evaluation_window(window: int) -> int:
    """Evaluation reads each held-out conversation in pieces this long, the head's context starting afresh in each:
    at least what it trains on (512 for the default 256, so that earlier curves stay comparable)."""
    return max(512, 2 * window)


def json_safe(args: dict) -> dict:
    return {k: [str(x) for x in v] if isinstance(v, list) else str(v) if isinstance(v, Path) else v
            for k, v in args.items()}


def export(args, cfg, head, draft_vocab, shards, eval_seqs, to_draft, step, seconds, tokens_seen,
           train_seqs, trained_args: dict | None = None) -> int:
    import torch
    from safetensors.torch import save_file
    from specrt.export.feature_head import DRAFT_VOCAB, HEAD_CONFIG, HEAD_WEIGHTS, count_params, trainable_state

    out = args.export
    out.mkdir(parents=True, exist_ok=True)
    weights = trainable_state(head)
    save_file({k: v.to(torch.float16) for k, v in weights.items()}, str(out / HEAD_WEIGHTS))
    cfg.save(out / HEAD_CONFIG)
    (out / DRAFT_VOCAB).write_text(json.dumps(draft_vocab.tolist()))
    window = (trained_args or {}).get("window", args.window)  # what the head was trained on, not this command's
    ev = evaluate(head, shards, eval_seqs, to_draft, draft_vocab, 4, 10**9, T=evaluation_window(window))
    curve = [json.loads(line) for line in (args.out / "curve.jsonl").read_text().splitlines()] \
        if (args.out / "curve.jsonl").is_file() else []
    record = {"step": step, "training_minutes": round(seconds / 60, 1), "tokens_trained": tokens_seen,
              "train_conversations": len(train_seqs), "held_out_conversations": len(eval_seqs),
              "parameters": count_params(weights), "held_out": ev, "curve": curve,
              "checkpoint": args.checkpoint if step else "none",
              "data_card": shards_card(shards),
              # the exported checkpoint's own training invocation (its last resume), then this export's
              "training_args": json_safe(trained_args or {}), "export_args": json_safe(vars(args))}
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "README.md").write_text(model_card(record, cfg, len(draft_vocab)))
    print(json.dumps({k: v for k, v in record.items() if k != "curve"}, indent=1))
    return 0


def shards_card(shards: list[dict]) -> dict:
    """The data card of the conversations in the shards this run read (``head_data.tally``), not of a ``card.json``
    beside them: on a machine that holds part of the data, that file describes other shards or none."""
    legacy = sum(len(sh["starts"]) - 1 for sh in shards if not sh["convs"])
    return head_data.tally(c for sh in shards for c in (sh["convs"] or [])) | {"legacy_conversations": legacy}


def model_card(record: dict, cfg, vocab: int) -> str:
    ev = record["held_out"]
    pos = ev["acceptance_by_position"]
    lines = [
        "# Feature-level draft head for SmolLM2-135M-Instruct (EAGLE-3 style)", "",
        (f"One decoder layer over [norm(embedding of the next token), norm(fc(target features))], reading the "
        f"verifier's hidden states entering layers {cfg.feature_layers}; an output head over a draft vocabulary of "
        f"{vocab} tokens (the verifier's most frequent choices in the training data; `draft_vocab.json` maps them "
        f"to target ids); embeddings frozen from the verifier and not stored here. {record['parameters'] / 1e6:.1f}M "
        "parameters, fp16."), "",
        ("Trained by `scripts/train_head.py` (data: `scripts/head_data.py`) on two CPU cores; Spec-Bench's "
        "questions were kept out of the training data."), "",
        (f"- steps: {record['step']}, training time: {record['training_minutes']:.0f} min, tokens trained on: "
        f"{record['tokens_trained']:,} (windows of {record['training_args'].get('window')} slots, "
        f"{record['training_args'].get('steps_unrolled')} draft steps unrolled)"),
        f"- data: {record['train_conversations']:,} conversations (held out: {record['held_out_conversations']:,})",
        f"- features: {record['training_args'].get('features')}"
        + (f"; initialised from the head in `{record['training_args']['init_from']}` (its weights at the start of "
           "this run)" if record["training_args"].get("init_from") not in (None, "None") else ""),
        (f"- exported checkpoint: the {record.get('checkpoint', 'last')} one (`--checkpoint`; 'best' = the best "
         "held-out tokens per pass of the live replay below among the evaluations below, so the held-out numbers "
         "here are slightly optimistic -- Spec-Bench, never seen in training or selection, is the test)"), "",
        ("Held-out greedy acceptance by draft position (position j counts where positions < j were accepted), "
        f"over {ev['positions']:,} assistant-token positions:"), "",
        "| position | " + " | ".join(str(i + 1) for i in range(len(pos))) + " |",
        "|---|" + "---:|" * len(pos),
        "| acceptance | " + " | ".join(f"{a:.3f}" for a in pos) + " |", "",
        "Expected tokens per target pass of a chain of k drafts: " + ", ".join(
            f"k={k}: {v:.2f}" for k, v in ev["tokens_per_pass"].items()), ""]
    live = ev.get("live", {})
    if live.get("all"):
        lines += [("Replayed as live speculation runs it (a chain of 4 after every committed token, over the first "
                   f"{LIVE_ANSWER_TOKENS} tokens of every greedy held-out answer; `benchmarks/head_acceptance.py` "
                   "measures the same on Spec-Bench), by kind:"), "",
                  "| kind | passes | acceptance at positions 1..4 | tokens/pass |", "|---|---:|---|---:|"]
        for kind, r in sorted(live.items(), key=lambda kv: (kv[0] != "all", kv[0])):
            lines.append(f"| {'**all**' if kind == 'all' else kind} | {r['passes']:,} | "
                         + " / ".join(f"{a:.3f}" for a in r["by_position"]) + f" | {r['tokens_per_pass']:.2f} |")
        lines.append("")
    lines += [
        "Learning curve (held-out, evaluated on a fixed sample during training):", "",
        "| step | minutes | tokens | loss | acceptance at positions 1..4 | tokens/pass k=4 | live replay: first / tokens/pass |",
        "|---:|---:|---:|---:|---|---:|---|"]
    for c in record["curve"]:
        loss = "–" if c["loss"] is None else f"{c['loss']:.3f}"  # step 0 of an --init-from run: not trained yet
        replay = c.get("live", {}).get("all")
        lines.append(f"| {c['step']} | {c['minutes']} | {c['tokens']:,} | {loss} | "
                     + " / ".join(f"{a:.3f}" for a in c["acceptance_by_position"])
                     + f" | {c['tokens_per_pass'].get('4', c['tokens_per_pass'].get(4, 0)):.2f} | "
                     + (f"{replay['by_position'][0]:.3f} / {replay['tokens_per_pass']:.2f} |" if replay else "– |"))
    if "data_card" in record:
        lines += data_card(record["data_card"])
    cards = record.get("data_cards", {})  # records written before ``data_card``: the card.json of each --data
    for where, card in cards.items():
        lines += data_card(card, f"Data ({where})" if len(cards) > 1 else "Data")
    return "\n".join(lines) + "\n"


def data_card(card: dict, title: str = "Data") -> list[str]:
    """The data's sources and shares, as model-card lines: a card of the shards a run read (``shards_card``) or,
    in records written before it, a ``head_data.py`` card (which also counts the prompt list)."""
    sampled = sum(src["sampled"] for src in card["sources"].values()) / max(1, card["conversations"])
    two_turn = sum(src["two_turn"] for src in card["sources"].values()) / max(1, card["conversations"])
    looped = sum(src.get("looped", 0) for src in card["sources"].values())
    if "prompts" in card:
        rest = card["prompts"] - card["conversations"]
        what = (f"the answers to {card['conversations']:,} of the {card['prompts']:,} prompts in its prompt list "
                "(after near-duplicate removal" + (f"; {rest:,} not answered yet, a rerun of `head_data.py` answers "
                                                   "more" if rest > 0 else ""))
    else:
        what = "the conversations in the shards this run read (training and held out" + (
            f"; {card['legacy_conversations']:,} more in shards that do not record their sources"
            if card.get("legacy_conversations") else "")
    lines = ["", f"## {title}", "",
             (f"{card['conversations']:,} conversations written by the verifier itself ({1 - sampled:.0%} greedy, "
              f"{sampled:.0%} sampled at temperature 0.7; {two_turn:.0%} with a second user turn), "
              f"{card['answer_tokens']:,} answer tokens: {what}"
              + (f"; {looped:,} answers ended after 32 tokens of repeating themselves, `--stop-loops`" if looped
                 else "")
              + "). The whole data set's answers are committed as token ids in `engines/demo/head-data` (its "
              "`card.json` gives every source's share): `make head-data` rebuilds the data from them by "
              "teacher-forced passes and answers the rest (`scripts/head_data.py`, resumable, hours on two cores); "
              "`make head-train` trains a head of this kind on it from scratch."), "",
             "| source | families | conversations | answer tokens | share of answer tokens | two turns | sampled |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, src in card["sources"].items():
        lines.append(f"| {name} | {src['families']:,} | {src['conversations']:,} | {src['answer_tokens']:,} | "
                     f"{src['share_of_answer_tokens']:.1%} | {src['two_turn']:,} | {src['sampled']:,} |")
    lines += ["", "Kinds of request: " + ", ".join(f"{k} {v:,}" for k, v in card["kinds"].items()) + "."]
    return lines


if __name__ == "__main__":
    sys.exit(main())
