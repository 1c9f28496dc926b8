#!/usr/bin/env python
"""Training data for the feature-level draft head: the verifier's own answers, with its features and top-8
log-probabilities recorded while it writes them.  Resumable stages, each with a progress bar and an ETA:

1. ``seeds``    texts the verifier writes itself, sampled: user requests from the bare start of a user turn
                (Magpie, a few seed words as families) and passages (news reports, articles, letters ...) that
                later prompts summarise and question                                        -> seeds.jsonl
2. ``prompts``  every offline source of ``head_prompts.py`` plus the seeds; near-duplicates removed, no
                source or family over 10%, a quarter with a second user turn              -> prompts.jsonl
                (rebuilt when the seeds or the counts differ from what it was built from)
3. ``answers``  the verifier's answers (greedy; a tenth sampled at temperature 0.7), 32 conversations per
                pass through its batched in-place graph (``batch_gen.py``); each recorded token's features
                (the inputs of layers 3, 15 and 27: EAGLE-3's low / middle / high) and the verifier's top-8
                next-token log-probs (the soft targets), for the prompt's last ``--prompt-tail`` tokens (256)
                and everything after, written as memory-mappable shards; a source past 10% of the answer tokens waits
                until it is under again; an answer stuck in a loop ends after 32 repeating tokens -> shard_*/
                With ``--keep DIR``, each shard's answers also go to DIR as token ids with their prompts (and the
                seeds too): git-sized, and a later run on a machine without the shards rebuilds them from there by
                teacher-forced passes (the same data, sampled answers included, whatever the machine's
                rounding; not faster: on 2 cores a conversation's tokens cost about the same either way).
4. ``card``     the data card: sources, kinds, prompt and answer tokens, shares          -> card.json
                With ``--keep DIR``, also DIR/card.json, the card of the kept answers, read from them alone (the
                same on every machine; rewritten whenever answers are kept).

    python scripts/head_data.py --verifier .cache/demo/verifier-hf --out .cache/head/data \\
        --keep engines/demo/head-data

Rerun the same command to resume (Ctrl-C or SIGTERM keeps every finished conversation; only those being
written are answered again).  Hours of CPU in all (measured on 2 cores: ~200 answer tokens/s, ~45 on a machine
half as fast); CI never runs it.  Needs the Debian packages named in ``head_prompts.py`` (``make head-data``
installs them where it can); the prompt list is rebuilt from them, the installed Python packages and the seeds, so
it comes out otherwise on another machine: kept answers carry their own prompts, and the list's prompts whose text
was answered (or is a near-duplicate of a kept prompt) are not answered again.  ``--no-rebuild`` only adds answers.
Spec-Bench's questions are never read.
"""
from __future__ import annotations

import argparse
import collections
import gzip
import hashlib
import json
import random
import signal
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import batch_gen
import head_prompts

FEATURE_LAYERS = (3, 15, 27)
TOP_K = 8
SHARD_TOKENS = 1 << 15  # ~70 conversations: a hard stop (power, SIGKILL) loses at most one shard
PROMPT_TAIL = 256  # prompt tokens recorded before the answer (the runtime head reads a window of 256)
# The prompt list caps each source at 10% of the prompts, but answers' lengths differ by source (code and docs run
# long: 240 tokens a conversation against fortunes' 130), so what is trained on is capped too: a job whose answer
# would take its source past this share of the answer tokens, counting those in flight, waits (``balanced``).  Not
# before this many answer tokens: early shares are noise.
ANSWER_SHARE_CAP = 0.10
BALANCE_AFTER = 20_000


def codec_for(verifier: Path):
    from specrt.runtime.text import TextCodec

    cfg = json.loads((verifier / "config.json").read_text())
    template = (verifier / "chat_template.jinja").read_text() if (verifier / "chat_template.jinja").is_file() \
        else json.loads((verifier / "tokenizer_config.json").read_text()).get("chat_template")
    gen = verifier / "generation_config.json"
    eos = (json.loads(gen.read_text()) if gen.is_file() else {}).get("eos_token_id", cfg.get("eos_token_id"))
    return TextCodec(verifier / "tokenizer.json", template, cfg.get("bos_token_id"),
                     frozenset(eos if isinstance(eos, list) else [eos]))


class Tokens:
    """Chat rendering and the ids the generator needs."""

    def __init__(self, verifier: Path):
        self.codec = codec_for(verifier)
        self.turn_end = self.codec.encode("<|im_end|>", add_special_tokens=False)[0]
        self.eos = {self.turn_end, *self.codec.eos_token_ids}
        render = self.codec.apply_chat_template([{"role": "user", "content": "@@USER@@"}])
        self.user_prefix = render[:render.index("@@USER@@")]

    def chat(self, text: str) -> list[int]:
        return self.codec.encode(self.codec.apply_chat_template([{"role": "user", "content": text}]),
                                 add_special_tokens=False)

    def follow_up(self, text: str) -> list[int]:
        """The tokens after an assistant turn's end that open the next user turn and the next answer."""
        return self.codec.encode(f"\n<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n",
                                 add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.codec.decode([t for t in ids if t not in self.eos]).strip()


class Progress:
    """A tqdm bar with an ETA."""

    def __init__(self, total: int, desc: str, unit: str = "conv"):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit=unit, smoothing=0.05)

    def __call__(self, n: int) -> None:
        self.bar.update(n)


def load_target(args) -> batch_gen.BatchedTarget:
    cfg = json.loads((args.verifier / "config.json").read_text())
    path = batch_gen.export_batch_graph(args.verifier, args.out, args.max_context, FEATURE_LAYERS)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    target = batch_gen.BatchedTarget(path, args.slots, cfg["num_hidden_layers"], kv, head_dim, args.max_context,
                                     args.threads)
    return target


def stage_seeds(args, tok: Tokens) -> list[dict]:
    path = args.out / "seeds.jsonl"
    have = [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []
    done = {h["key"] for h in have}
    rng = random.Random(args.seed)
    topics = head_prompts._split(head_prompts.TOPICS)
    jobs = []
    for i in range(int(args.magpie * 1.6)):  # some are rejected below
        seed_word = head_prompts.MAGPIE_SEEDS[i % len(head_prompts.MAGPIE_SEEDS)]
        ids = tok.codec.encode(tok.user_prefix + seed_word, add_special_tokens=False)
        jobs.append(batch_gen.Job(f"magpie-{i}", ids, temperature=0.8,
                                  meta={"kind": "magpie", "seed": seed_word}))
    for i in range(int(args.passages * 1.15)):
        g = i % len(head_prompts.PASSAGE_GENRES)
        topic = rng.choice(topics)
        ids = tok.chat(head_prompts.PASSAGE_GENRES[g].format(topic=topic))
        jobs.append(batch_gen.Job(f"passage-{i}", ids, temperature=0.7,
                                  meta={"kind": "passage", "genre": g, "topic": topic}))
    rng.shuffle(jobs)
    todo = [j for j in jobs if j.key not in done]
    if todo:
        target = load_target(args)
        bar = Progress(len(todo), "seeds (magpie requests, passages)")
        with path.open("a") as f:
            for d in batch_gen.generate(target, todo, 320, tok.eos, turn_end=tok.turn_end, record=False,
                                        seed=args.seed):
                f.write(json.dumps({"key": d.job.key, **d.job.meta, "ids": d.answers[0]}) + "\n")
                f.flush()
                bar(1)
        have = [json.loads(line) for line in path.read_text().splitlines()]
    return have


def seed_prompts(tok: Tokens, seeds: list[dict], args) -> list[dict]:
    """Magpie requests and the verifier's passages as prompts (cut to the asked numbers)."""
    magpie, passages = [], []
    for s in sorted(seeds, key=lambda s: s["key"]):
        ended = bool(s["ids"]) and s["ids"][-1] == tok.turn_end
        text = tok.decode(s["ids"])
        if s["kind"] == "magpie":
            text = (s["seed"] + " " + text).strip() if s["seed"] and not text.startswith(s["seed"]) else text
            if ended and 12 <= len(text) <= 600 and sum(c.isalpha() for c in text) > 0.6 * len(text):
                magpie.append({"source": "magpie", "family": f"magpie/{s['seed'] or 'none'}", "kind": "magpie",
                               "turns": [text]})
        elif len(s["ids"]) >= 120 and len(text) >= 400:
            passages.append({"family": f"verifier-passages/g{s['genre']}", "text": text, "topic": s["topic"]})
    rng = random.Random(args.seed + 2)
    return (magpie[:args.magpie] + head_prompts.passage_prompts(rng, passages[:args.passages])
            + head_prompts.long_passage_prompts(random.Random(args.seed + 3), passages, args.long_passages))


def prompts_made_from(args, seeds: list[dict]) -> str:
    """What a prompt list is built from (the counts, the random seed and which seeds exist), as a short hash."""
    made = {"seed": args.seed, "scale": args.scale, "magpie": args.magpie, "passages": args.passages,
            "seeds": sorted(s["key"] for s in seeds)}
    if args.long_passages:  # lists built before long prompts existed keep their hash
        made["long_passages"] = args.long_passages
    return hashlib.sha256(json.dumps(made, sort_keys=True).encode()).hexdigest()[:16]


def stage_prompts(args, tok: Tokens, seeds: list[dict]) -> list[dict]:
    path, made_path = args.out / "prompts.jsonl", args.out / "prompts.made"
    made = prompts_made_from(args, seeds)
    if path.is_file():
        if made_path.is_file() and made_path.read_text().strip() == made:
            return [json.loads(line) for line in path.read_text().splitlines()]
        # a list built before more seeds were written (or with other counts) would never ask about the new ones
        print("the prompt list was built from other seeds or counts: rebuilding it (answers are matched by their "
              "prompt's text, so none is lost)", file=sys.stderr)
    prompts = head_prompts.finish(head_prompts.build(seed=args.seed, scale=args.scale) + seed_prompts(tok, seeds, args),
                                  seed=args.seed)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    tmp.replace(path)
    made_path.write_text(made + "\n")
    return prompts


class ShardWriter:
    """Conversations gathered into shards of ~SHARD_TOKENS tokens, each written whole (``done`` last)."""

    def __init__(self, out: Path, first_index: int, on_flush=None):
        self.out, self.index, self.on_flush = out, first_index, on_flush
        self.items: list[batch_gen.Done] = []
        self.tokens = 0

    def add(self, d: batch_gen.Done) -> None:
        self.items.append(d)
        self.tokens += len(d.ids)
        if self.tokens >= SHARD_TOKENS:
            self.flush()

    def flush(self) -> None:
        if not self.items:
            return
        d = self.out / f"shard_{self.index:04d}"
        d.mkdir(parents=True, exist_ok=True)
        n = sum(len(x.ids) for x in self.items)
        starts = np.cumsum([0] + [len(x.ids) for x in self.items]).astype(np.int64)
        np.save(d / "features.npy", np.concatenate([x.features for x in self.items]).reshape(
            n, len(FEATURE_LAYERS), -1))
        np.save(d / "top_ids.npy", np.concatenate([x.top_ids for x in self.items]))
        np.save(d / "top_logp.npy", np.concatenate([x.top_logp for x in self.items]))
        np.save(d / "tokens.npy", np.concatenate([np.asarray(x.ids, np.int32) for x in self.items]))
        np.save(d / "roles.npy", np.concatenate([np.asarray(x.roles, np.uint8) for x in self.items]))
        np.save(d / "starts.npy", starts)
        convs = [{"id": x.job.key, **x.job.meta, "answers": x.answers} | ({"looped": True} if x.looped else {})
                 for x in self.items]
        (d / "convs.json").write_text(json.dumps(convs))
        (d / "meta.json").write_text(json.dumps({"feature_layers": list(FEATURE_LAYERS), "top_k": TOP_K}))
        (d / "done").write_text("ok")
        if self.on_flush:
            self.on_flush(self.items)
        self.index += 1
        self.items, self.tokens = [], 0


PROMPT_FIELDS = ("source", "family", "kind", "turns")


def prompt_sha(p: dict) -> str:
    """Which prompt an answer answers: its turns' text (a prompt list rebuilt elsewhere may number them otherwise)."""
    return hashlib.sha256(json.dumps(p["turns"]).encode()).hexdigest()[:16]


def keep_answers(keep: Path, prompts_by_id: dict[str, dict], convs: list[dict]) -> None:
    """The answers' token ids (``convs``: a shard's ``convs.json``), gzipped JSON lines, one file per shard named
    by its content: small enough for git (~0.5 KB per conversation), and all that a machine without the shards
    needs to rebuild them (``batch_gen.replay``).  Each line carries its prompt (source, family, kind, turns):
    the prompt list is rebuilt from what a machine has installed and comes out otherwise elsewhere, so a kept
    answer must not depend on finding its prompt there.  ``prompts_by_id`` serves convs that lack the turns
    (shards written before they were recorded)."""
    lines = []
    for c in convs:
        p = c if "turns" in c else prompts_by_id[c["id"]]
        lines.append(json.dumps({"id": c["id"], "prompt_sha": prompt_sha(p)}
                                | {k: p[k] for k in PROMPT_FIELDS}
                                | {"sampled": bool(c.get("sampled")), "answers": c["answers"]}
                                | ({"looped": True} if c.get("looped") else {}),
                                separators=(",", ":")) + "\n")
    data = "".join(lines)
    name = hashlib.sha256(data.encode()).hexdigest()[:12]
    keep.mkdir(parents=True, exist_ok=True)
    tmp = keep / f"answers_{name}.partial"
    tmp.write_bytes(gzip.compress(data.encode(), mtime=0))
    tmp.replace(keep / f"answers_{name}.jsonl.gz")


def kept_prompt(k: dict, prompts_by_sha: dict[str, dict]) -> dict | None:
    """The prompt a kept answer answers: its own record (every line written since prompts were kept with their
    answers), else the prompt list's prompt of the same text; None when neither holds it."""
    if "turns" in k:
        return {"id": k["id"]} | {f: k[f] for f in PROMPT_FIELDS}
    return prompts_by_sha.get(k["prompt_sha"])


def kept_answers(keep: Path | None) -> list[dict]:
    if keep is None:
        return []
    return [json.loads(line) for f in sorted(keep.glob("answers_*.jsonl.gz"))
            for line in gzip.decompress(f.read_bytes()).decode().splitlines()]


def tally(convs: Iterable[dict]) -> dict:
    """A data card's counts over conversations (``source``, ``family``, ``kind``, ``answers``, ``sampled``,
    ``looped``, and ``recorded_tokens`` where shards give it): conversations, answer tokens and their shares per
    source, families, kinds, second turns, sampled and loop-cut answers."""
    by_source: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    families: dict[str, set] = collections.defaultdict(set)
    kinds: collections.Counter = collections.Counter()
    for c in convs:
        src = by_source[c.get("source", "unknown")]
        src["conversations"] += 1
        src["two_turn"] += len(c["answers"]) > 1
        src["sampled"] += bool(c.get("sampled"))
        src["looped"] += bool(c.get("looped"))
        src["answer_tokens"] += sum(len(a) for a in c["answers"])
        if "recorded_tokens" in c:
            src["recorded_tokens"] += c["recorded_tokens"]
        families[c.get("source", "unknown")].add(c.get("family"))
        kinds[c.get("kind", "unknown")] += 1
    total = sum(v["answer_tokens"] for v in by_source.values())
    convs_n = sum(v["conversations"] for v in by_source.values())
    return {"conversations": convs_n, "answer_tokens": total,
            "two_turn": sum(v["two_turn"] for v in by_source.values()),
            "sampled": sum(v["sampled"] for v in by_source.values()),
            "kinds": dict(kinds.most_common()),
            "sources": {k: dict(v) | {"families": len(families[k]),
                                      "share_of_conversations": round(v["conversations"] / max(1, convs_n), 4),
                                      "share_of_answer_tokens": round(v["answer_tokens"] / max(1, total), 4)}
                        for k, v in sorted(by_source.items())}}


def kept_card(keep: Path) -> dict:
    """The data card of what ``keep`` holds, read from the kept answers alone, so any machine gets the same one
    (``tally``, plus the distinct prompts)."""
    kept = kept_answers(keep)
    return {"distinct_prompts": len({k["prompt_sha"] for k in kept})} | tally(kept)


def write_kept_card(keep: Path) -> dict:
    card = kept_card(keep)
    keep.mkdir(parents=True, exist_ok=True)
    (keep / "card.json").write_text(json.dumps(card, indent=1) + "\n")
    return card


def finished_shards(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("shard_*") if (p / "done").is_file())


def job_for(p: dict, tok: Tokens, args, sampled: bool) -> batch_gen.Job | None:
    ids = tok.chat(p["turns"][0])
    if len(ids) + args.max_new_tokens * len(p["turns"]) + 64 >= args.max_context:
        return None
    meta = {k: p[k] for k in ("source", "family", "kind", "turns")} | {"sampled": bool(sampled),
                                                                        "prompt_sha": prompt_sha(p)}
    return batch_gen.Job(p["id"], ids, [tok.follow_up(t) for t in p["turns"][1:]],
                         temperature=0.7 if sampled else 0.0, keep_from=max(0, len(ids) - args.prompt_tail), meta=meta)


def first_sources(jobs: list[batch_gen.Job], sources: Iterable[str] = ()) -> list[batch_gen.Job]:
    """``jobs`` with those of ``sources`` first, each group in its own order (``--first``): a run cut short has
    answered the sources the data lacks most.  ``balanced`` still holds each source to its share."""
    sources = set(sources)
    return sorted(jobs, key=lambda j: j.meta["source"] not in sources) if sources else jobs


class SourceShares:
    """Answer tokens per source, counting the answers still being written: ``batch_gen.generate`` keeps dozens of
    conversations in flight, and a share counted only at their end overshoots the cap by what they add.  A job in
    flight counts as its source's mean answer so far (the mean over every source before its first answer)."""

    def __init__(self, answered: collections.Counter | None = None,
                 conversations: collections.Counter | None = None):
        self.answered = collections.Counter(answered or {})  # answer tokens of finished conversations
        self.finished = collections.Counter(conversations or {})
        self.in_flight: collections.Counter = collections.Counter()

    def start(self, source: str) -> None:
        self.in_flight[source] += 1

    def finish(self, source: str, tokens: int) -> None:
        self.in_flight[source] -= 1
        self.answered[source] += tokens
        self.finished[source] += 1

    def mean(self, source: str) -> float:
        if self.finished[source]:
            return self.answered[source] / self.finished[source]
        done = sum(self.finished.values())
        return sum(self.answered.values()) / done if done else 0.0

    def expected(self, source: str) -> float:
        return self.answered[source] + self.in_flight[source] * self.mean(source)

    def total(self) -> float:
        return sum(self.answered.values()) + sum(n * self.mean(s) for s, n in self.in_flight.items())


def balanced(jobs: Iterable[batch_gen.Job], shares: SourceShares, cap: float = ANSWER_SHARE_CAP,
             after: int = BALANCE_AFTER) -> Iterator[batch_gen.Job]:
    """``jobs`` in order, except that a job whose answer would take its source past ``cap`` of the answer tokens
    (those in flight counted, ``SourceShares``) waits until there is room again.  When the list runs out, the
    waiting jobs come least-represented source first, each only while its source has room; the first time none has,
    the rest are not answered (a message counts them; the answers still in flight may make room, for a rerun): the
    cap is the data's promise, not a preference.  With a cap of 1/N, N sources or fewer at equal shares never have
    room for one more: the cap is meant for many sources (``ANSWER_SHARE_CAP``, ~20 here).
    The caller reports each finished conversation (``shares.finish``); ``batch_gen.generate`` pulls the next job
    only when a slot frees, so the shares are current at each pull."""
    waiting: dict[str, collections.deque] = collections.defaultdict(collections.deque)

    def over(source: str) -> bool:  # were one more of its jobs started now (at its mean length)
        total, mean = shares.total(), shares.mean(source)
        return total >= after and shares.expected(source) + mean > cap * (total + mean)

    def take(job: batch_gen.Job) -> batch_gen.Job:
        shares.start(job.meta["source"])
        return job

    for job in jobs:
        for source, queue in waiting.items():  # a source back under the cap: its oldest waiting job first
            if queue and not over(source):
                yield take(queue.popleft())
        source = job.meta["source"]
        if over(source):
            waiting[source].append(job)
        else:
            yield take(job)
    while True:
        under = [s for s, q in waiting.items() if q and not over(s)]
        if not under:
            break
        yield take(waiting[min(under, key=shares.expected)].popleft())
    left = {s: len(q) for s, q in waiting.items() if q}
    if left:
        print(f"{sum(left.values())} prompts not answered: each would take its source past {cap:.0%} of the answer "
              f"tokens ({', '.join(f'{s} {n}' for s, n in sorted(left.items()))}); a rerun answers them once other "
              "sources' answers make room", file=sys.stderr)


def stage_answers(args, tok: Tokens, prompts: list[dict], generate: bool = True) -> None:
    """Rebuild the shards of the kept answers (``--keep``), then answer the prompts not answered yet.  Prompts are
    matched by their text's sha (``prompt_sha``), never by list position: ids number this machine's list."""
    shards = finished_shards(args.out)
    by_id = {p["id"]: p for p in prompts}
    by_sha = {prompt_sha(p): p for p in prompts}

    def conv_sha(c: dict) -> str | None:  # shards written before convs recorded their prompt's sha: by id
        return c.get("prompt_sha") or (prompt_sha(by_id[c["id"]]) if c["id"] in by_id else None)

    convs_of = {s: json.loads((s / "convs.json").read_text()) for s in shards}
    done = {conv_sha(c) for convs in convs_of.values() for c in convs} - {None}
    rng = np.random.default_rng(args.seed)
    # one draw per prompt in list order, answered or not: which answers are sampled never depends on what is done
    sampled = {p["id"]: rng.random() < args.sampled for p in prompts}
    kept = kept_answers(args.keep)
    if args.keep:  # shards answered without --keep: their answers too
        kept_shas = {k["prompt_sha"] for k in kept}
        for shard_convs in convs_of.values():  # one file per shard, as they are kept when written
            convs = [c for c in shard_convs if conv_sha(c) not in kept_shas and ("turns" in c or c["id"] in by_id)]
            if convs:
                keep_answers(args.keep, by_id, convs)
    # a prompt answered twice (earlier runs kept a few) is rebuilt once: the first kept answer
    first: dict[str, dict] = {}
    for k in kept:
        if k["prompt_sha"] not in done:
            first.setdefault(k["prompt_sha"], k)
    kept = list(first.values())
    replayable = [(k, p) for k in kept if (p := kept_prompt(k, by_sha)) is not None]
    if len(replayable) < len(kept):
        print(f"{len(kept) - len(replayable)} kept answers lack their prompt's text, and this prompt list does not "
              "hold it (another Debian package version?): skipped", file=sys.stderr)
    answered_shas = done | {k["prompt_sha"] for k, _ in replayable}
    todo = [p for p in prompts if prompt_sha(p) not in answered_shas]
    if replayable and todo:  # a list built elsewhere also holds near-duplicates of kept prompts: not again
        kept_texts = [p for _, p in replayable]
        fresh = {id(p) for p in head_prompts.dedup(kept_texts + todo)}
        dropped = sum(id(p) not in fresh for p in todo)
        todo = [p for p in todo if id(p) in fresh]
        if dropped:
            print(f"{dropped} prompts are near-duplicates of kept ones: not answered", file=sys.stderr)
    unbuilt = replayable if args.no_rebuild else []  # kept, not rebuilt here: still counted as answered
    if args.no_rebuild:
        print(f"--no-rebuild: {len(replayable)} kept conversations are not rebuilt into shards here", file=sys.stderr)
        replayable = []
    if not replayable and (not todo or not generate):
        return
    target = load_target(args)
    next_index = int(shards[-1].name.split("_")[1]) + 1 if shards else 0
    # Ctrl-C or a kill (SIGTERM) stops between conversations and keeps every finished one (a shorter last shard);
    # a rerun goes on from there
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if replayable:  # the answers are in git: rebuild their shards by teacher-forced passes, no generation
        writer = ShardWriter(args.out, next_index)
        bar = Progress(len(replayable), "rebuild from kept answers")
        try:
            for k, p in replayable:
                job = job_for(p, tok, args, k["sampled"])
                d = batch_gen.replay(target, job, k["answers"], TOP_K, looped=bool(k.get("looped"))) if job else None
                if d is not None:
                    writer.add(d)
                bar(1)
        except KeyboardInterrupt:
            print(f"\nstopped: keeping the {len(writer.items)} conversations rebuilt since the last shard; rerun to "
                  "resume", file=sys.stderr)
            return
        finally:
            writer.flush()
        next_index = writer.index
    if not generate:
        return
    if args.only:
        todo = [p for p in todo if p["source"] in args.only]
    jobs = first_sources([j for j in (job_for(p, tok, args, sampled[p["id"]]) for p in todo) if j is not None],
                         args.first)
    answered, conversations = collections.Counter(), collections.Counter()  # per source, for ``balanced``
    for s in finished_shards(args.out):
        for c in json.loads((s / "convs.json").read_text()):
            answered[c["source"]] += sum(len(a) for a in c["answers"])
            conversations[c["source"]] += 1
    for k, p in unbuilt:
        answered[p["source"]] += sum(len(a) for a in k["answers"])
        conversations[p["source"]] += 1
    shares = SourceShares(answered, conversations)
    keep = (lambda items: keep_answers(args.keep, by_id, [{"id": d.job.key, **d.job.meta, "answers": d.answers,
                                                           "looped": d.looped} for d in items])) if args.keep else None
    writer = ShardWriter(args.out, next_index, keep)
    print(f"{len(done) + len(replayable) + len(unbuilt)} conversations done; {len(jobs)} to go", file=sys.stderr)
    bar = Progress(len(jobs), "verifier answers")
    t0, tokens = time.time(), 0
    # the same for answering: only the conversations still being written are lost, and a rerun answers them again
    try:
        for d in batch_gen.generate(target, balanced(jobs, shares), args.max_new_tokens, tok.eos,
                                    turn_end=tok.turn_end, top_k=TOP_K, seed=args.seed,
                                    stop_repeats=args.stop_loops):
            writer.add(d)
            tokens += sum(len(a) for a in d.answers)
            shares.finish(d.job.meta["source"], sum(len(a) for a in d.answers))
            bar(1)
            bar.bar.set_postfix(answer_tok_s=f"{tokens / (time.time() - t0):.0f}")
    except KeyboardInterrupt:
        print(f"\nstopped: keeping the {len(writer.items)} conversations finished since the last shard; rerun to "
              "resume", file=sys.stderr)
    finally:
        writer.flush()


def stage_card(args, prompts: list[dict]) -> dict:
    """Sources, kinds, conversations and tokens per source, and their shares, over the shards (``tally``)."""
    def convs() -> Iterator[dict]:
        for s in finished_shards(args.out):
            starts = np.load(s / "starts.npy")
            for i, c in enumerate(json.loads((s / "convs.json").read_text())):
                yield c | {"recorded_tokens": int(starts[i + 1] - starts[i])}

    counts = tally(convs())
    card = {"prompts": len(prompts), "conversations": counts["conversations"],
            "answer_tokens": counts["answer_tokens"],
            "recorded_tokens": sum(v.get("recorded_tokens", 0) for v in counts["sources"].values()),
            "feature_layers": list(FEATURE_LAYERS), "max_new_tokens": args.max_new_tokens,
            "kinds": counts["kinds"], "sources": counts["sources"]}
    (args.out / "card.json").write_text(json.dumps(card, indent=1))
    return card


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verifier", type=Path, required=True, help="HuggingFace checkpoint of the verifier (target)")
    ap.add_argument("--out", type=Path, required=True, help="the data folder (created; resumed when it exists)")
    ap.add_argument("--stage", choices=("all", "seeds", "prompts", "answers", "rebuild", "card"), default="all",
                    help="run up to this stage (rebuild: the shards of the answers kept in --keep only, no "
                    "generation; then the card)")
    ap.add_argument("--magpie", type=int, default=2600, help="verifier-written requests (default 2600)")
    ap.add_argument("--passages", type=int, default=1200, help="verifier-written passages (default 1200)")
    ap.add_argument("--scale", type=float, default=1.0, help="scales the offline sources' counts")
    ap.add_argument("--max-new-tokens", type=int, default=320, help="per answer (default 320)")
    ap.add_argument("--stop-loops", type=int, default=32, metavar="N",
                    help="end an answer once its last N tokens each completed a 16-gram it already held: a loop "
                    "the 135M verifier would repeat to --max-new-tokens, which the head learns nothing new from "
                    "(default 32; 0: never)")
    ap.add_argument("--sampled", type=float, default=0.1, help="share of answers sampled at temperature 0.7")
    ap.add_argument("--slots", type=int, default=32, help="conversations per pass (default 32)")
    ap.add_argument("--first", type=lambda v: [x for x in v.split(",") if x], default=[], metavar="SOURCES",
                    help="answer these sources' prompts before the others (comma-separated, e.g. "
                    "magpie,verifier-passages: what a run cut short should have; each still capped at its share)")
    ap.add_argument("--only", type=lambda v: {x for x in v.split(",") if x}, default=set(), metavar="SOURCES",
                    help="answer only these sources' prompts (comma-separated, e.g. long-passages,long-documents)")
    ap.add_argument("--long-passages", type=int, default=1200,
                    help="long prompts (2-4 of the verifier's passages: one article to summarise, or documents to "
                    "answer from; default 1200)")
    ap.add_argument("--prompt-tail", type=int, default=PROMPT_TAIL, metavar="N",
                    help=f"record each prompt's last N tokens before the answer (default {PROMPT_TAIL}: the "
                    "runtime head's window); the head trains on what is recorded")
    ap.add_argument("--max-context", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, metavar="DIR",
                    help="also keep the seeds and every answer as token ids here, gzipped, small enough for git "
                    "(engines/demo/head-data); a run on a machine without the shards rebuilds them from DIR by "
                    "teacher-forced passes instead of generating the answers again")
    ap.add_argument("--no-rebuild", action="store_true",
                    help="with --keep: answer only the prompts not kept yet and leave the kept answers' shards "
                    "unbuilt (a machine that adds data but does not train: rebuilding takes about as long as "
                    "generating did); the data card, which counts shards, is then written only by --stage card")
    args = ap.parse_args()
    if args.no_rebuild and not args.keep:
        ap.error("--no-rebuild needs --keep DIR: the answers it adds are kept only there")
    if args.no_rebuild and args.stage == "rebuild":
        ap.error("--stage rebuild and --no-rebuild ask for opposite things")
    args.out.mkdir(parents=True, exist_ok=True)
    tok = Tokens(args.verifier)
    kept_seeds = args.keep / "seeds.jsonl.gz" if args.keep else None
    if kept_seeds and kept_seeds.is_file() and not (args.out / "seeds.jsonl").is_file():
        (args.out / "seeds.jsonl").write_bytes(gzip.decompress(kept_seeds.read_bytes()))
    seed_file = args.out / "seeds.jsonl"
    seeds = stage_seeds(args, tok) if args.stage in ("all", "seeds", "prompts") else \
        [json.loads(line) for line in seed_file.read_text().splitlines()] if seed_file.is_file() else []
    if kept_seeds and (args.out / "seeds.jsonl").is_file():
        data = gzip.compress((args.out / "seeds.jsonl").read_bytes(), mtime=0)
        if not kept_seeds.is_file() or kept_seeds.read_bytes() != data:
            args.keep.mkdir(parents=True, exist_ok=True)
            kept_seeds.write_bytes(data)
    if args.stage == "seeds":
        return 0
    prompts = stage_prompts(args, tok, seeds) if args.stage != "card" or not (args.out / "prompts.jsonl").is_file() \
        else [json.loads(line) for line in (args.out / "prompts.jsonl").read_text().splitlines()]
    if args.stage in ("all", "answers", "rebuild"):
        stage_answers(args, tok, prompts, generate=args.stage != "rebuild")
    if args.keep and args.stage in ("all", "answers", "rebuild", "card"):  # what is kept, from the kept files alone
        card = write_kept_card(args.keep)
        print(f"kept: {card['conversations']:,} conversations, {card['distinct_prompts']:,} distinct prompts, "
              f"{card['answer_tokens']:,} answer tokens ({args.keep / 'card.json'})", file=sys.stderr)
    if args.no_rebuild and args.stage == "all":
        print("--no-rebuild: the shards' data card is not written (its shards are not all here)", file=sys.stderr)
    elif args.stage in ("all", "rebuild", "card"):
        card = stage_card(args, prompts)
        print(json.dumps({k: card[k] for k in ("prompts", "conversations", "answer_tokens")}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
