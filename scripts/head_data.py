#!/usr/bin/env python
"""Training data for the feature-level draft head: the verifier's own answers, its hidden states and logits.

Three resumable stages, each with a progress bar (hours of CPU in all; CI never runs this):

1. ``prompts``  the templated prompt set of ``head_prompts.py`` plus Magpie prompts (user messages the
                verifier writes itself from the bare start of a user turn, sampled)  -> prompts.jsonl
2. ``answers``  the verifier's greedy answers, batched in PyTorch -- or, with ``--engine DIR``, one at a
                time through specrt's own runtime (an int8-rows engine with n-gram drafting writes
                passages' answers ~1.5x faster here than batched bf16 PyTorch, whose padding grows
                with the prompts); two-turn prompts get their second answer after the first (as
                Spec-Bench's two-turn questions)                                     -> answers.jsonl
3. ``features`` one fp32 forward pass per conversation: the hidden states the head may read (inputs of
                layers 3, 15 and 27 -- EAGLE-3's low / middle / high -- and the last layer's output
                before the final norm -- EAGLE-1's), and the verifier's top-8 next-token log-probs
                (the soft targets), written as memory-mappable shards                 -> shard_*/

A corpus can be scored instead of generated (``--corpus DIR``: every text file under it, chunked):
that skips stage 2 and measures what the verifier's own text buys over plain text.

    python scripts/head_data.py --verifier .cache/demo/verifier-hf --out .cache/head/data
    python scripts/head_data.py --verifier .cache/demo/verifier-hf --out .cache/head/corpus --corpus DIR

Needs the Debian packages python3.11-doc, fortunes and fortunes-de for the passages, German text and
quotes (``apt-get install python3.11-doc fortunes fortunes-de``); without them those kinds are skipped.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import head_prompts

FEATURE_LAYERS = (3, 15, 27, 30)  # hidden_states indices: the input of layer i; 30 = last layer, pre-norm
TOP_K = 8
SHARD_TOKENS = 1 << 17


def load_model(path: Path, dtype: str = "fp32"):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16 if dtype == "bf16" else torch.float32)
    return tok, model.eval()


def chat_ids(tok, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return tok(text, add_special_tokens=False)["input_ids"]


def generate_batch(model, tok, batch: list[list[int]], max_new_tokens: int, sample: bool = False,
                   eos: list[int] | None = None) -> list[list[int]]:
    """Left-padded batched generate(); returns the new ids of each row (cut after its first EOS)."""
    import torch

    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    width = max(len(b) for b in batch)
    ids = torch.full((len(batch), width), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        ids[i, width - len(b):] = torch.tensor(b)
        mask[i, width - len(b):] = 1
    kw = {"do_sample": True, "temperature": 1.0, "top_p": 0.95, "top_k": 0} if sample else \
        {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=eos,
                             pad_token_id=pad, **kw)
    rows = []
    for r in out[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(r) if t in eos), len(r))
        rows.append(r[:cut])
    return rows


def stage_prompts(args, tok, model, eos) -> list[dict]:
    path = args.out / "prompts.jsonl"
    if path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines()]
    from tqdm import tqdm

    prompts = head_prompts.build(seed=args.seed, scale=args.scale)
    # Magpie: the start of a user turn, and the verifier writes the request.
    prefix = tok.apply_chat_template([{"role": "user", "content": "X"}], tokenize=False)
    prefix = prefix[: prefix.index("X")]
    start = tok(prefix, add_special_tokens=False)["input_ids"]
    end = tok.convert_tokens_to_ids("<|im_end|>")
    import torch

    torch.manual_seed(args.seed)
    magpie = []
    with tqdm(total=args.magpie, desc="magpie prompts", unit="prompt") as bar:
        while len(magpie) < args.magpie:
            for row in generate_batch(model, tok, [start] * args.batch, 64, sample=True, eos=[end, *eos]):
                text = tok.decode([t for t in row if t not in (end, *eos)]).strip()
                if row and row[-1] == end and 12 <= len(text) <= 400 and len(magpie) < args.magpie:
                    magpie.append({"id": f"magpie-{len(magpie)}", "kind": "magpie", "turns": [text]})
                    bar.update(1)
    prompts += magpie
    with path.open("w") as f:
        for p in prompts:
            f.write(json.dumps(p) + "\n")
    return prompts


def engine_answerer(engine_dir: Path, max_new_tokens: int):
    """generate_batch's contract through specrt's runtime: greedy, n-gram drafting, one prompt at a time."""
    from specrt.runtime import Engine

    engine = Engine.load(engine_dir)

    def answer(batch: list[list[int]]) -> list[list[int]]:
        return [engine.generate(ids, max_new_tokens=max_new_tokens, k=8, drafter="ngram",
                                policy="adaptive").token_ids for ids in batch]
    return answer


def stage_answers(args, tok, model, eos, prompts: list[dict]) -> None:
    from tqdm import tqdm

    path = args.out / "answers.jsonl"
    done = set()
    if path.is_file():
        done = {json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()}
    if args.max_conversations and len(prompts) > args.max_conversations:
        # a random subset (every kind in its share), not the first N: the batches below go shortest first
        rng = np.random.default_rng(args.seed)
        keep = set(rng.choice(len(prompts), args.max_conversations, replace=False).tolist())
        prompts = [p for i, p in enumerate(prompts) if i in keep or p["id"] in done]
    if args.kinds:
        prompts = [p for p in prompts if p["kind"] in args.kinds or p["id"] in done]
    todo = [p for p in prompts if p["id"] not in done]
    # A random order, so that a run stopped early still covers every kind (sorting all prompts by length
    # once left the long ones -- passages to translate, summarise, answer from -- out of a stopped run).
    todo = [todo[i] for i in np.random.default_rng(args.seed).permutation(len(todo))]
    if args.engine:
        answer = engine_answerer(args.engine, args.max_new_tokens)
    else:
        def answer(batch):
            return generate_batch(model, tok, batch, args.max_new_tokens, eos=eos)
        # Similar lengths in one batch waste less padding: sorted within blocks of 8 batches.
        block = 8 * args.batch
        todo = [p for i in range(0, len(todo), block)
                for p in sorted(todo[i:i + block], key=lambda p: len(p["turns"][0]))]
    t0, tokens = time.time(), 0
    with path.open("a") as f, tqdm(total=len(prompts), initial=len(done), desc="verifier answers", unit="conv") as bar:
        for i in range(0, len(todo), args.batch):
            chunk = todo[i:i + args.batch]
            messages = [[{"role": "user", "content": p["turns"][0]}] for p in chunk]
            first = answer([chat_ids(tok, m) for m in messages])
            for m, a in zip(messages, first):
                m.append({"role": "assistant", "content": tok.decode(a, skip_special_tokens=True)})
            two = [j for j, p in enumerate(chunk) if len(p["turns"]) > 1]
            second = {}
            if two:
                for j in two:
                    messages[j].append({"role": "user", "content": chunk[j]["turns"][1]})
                rows = answer([chat_ids(tok, messages[j]) for j in two])
                second = dict(zip(two, rows))
            for j, p in enumerate(chunk):
                answers = [first[j]] + ([second[j]] if j in second else [])
                tokens += sum(len(a) for a in answers)
                f.write(json.dumps({"id": p["id"], "kind": p["kind"], "turns": p["turns"], "answers": answers}) + "\n")
            f.flush()
            bar.update(len(chunk))
            bar.set_postfix(tok_s=f"{tokens / (time.time() - t0):.0f}")


def conversations(args, tok) -> list[tuple[str, list[int], list[int]]]:
    """(kind, token ids, role per token: 1 = written by the verifier) of every conversation."""
    out = []
    if args.corpus:
        files = sorted(p for p in Path(args.corpus).rglob("*") if p.is_file())
        for f in files:
            ids = tok(f.read_text(encoding="utf-8", errors="replace"), add_special_tokens=False)["input_ids"]
            for s in range(0, len(ids), args.max_len):
                if len(ids) - s > 32:
                    out.append(("corpus", ids[s:s + args.max_len], [1] * len(ids[s:s + args.max_len])))
        return out
    for line in (args.out / "answers.jsonl").read_text().splitlines():
        c = json.loads(line)
        messages = [{"role": "user", "content": c["turns"][0]}]
        if len(c["answers"]) > 1:
            messages += [{"role": "assistant", "content": tok.decode(c["answers"][0], skip_special_tokens=True)},
                         {"role": "user", "content": c["turns"][1]}]
        prompt = chat_ids(tok, messages)
        answer = c["answers"][-1]
        ids = (prompt + answer)[: args.max_len]
        roles = ([0] * len(prompt) + [1] * len(answer))[: args.max_len]
        if len(c["answers"]) > 1:  # the first answer, re-rendered in the prompt, is the verifier's text too
            first = chat_ids(tok, messages[:1])
            end = len(chat_ids(tok, messages[:2], add_generation_prompt=False))
            roles[len(first):min(end, len(roles))] = [1] * (min(end, len(roles)) - len(first))
        out.append((c["kind"], ids, roles))
    return out


def stage_features(args, tok, model) -> None:
    import torch
    from tqdm import tqdm

    convs = conversations(args, tok)
    rng = np.random.default_rng(args.seed)
    order = rng.permutation(len(convs))
    convs = [convs[i] for i in order]
    # shards of about SHARD_TOKENS tokens; a shard is written whole, so a restart redoes at most one
    shards, cur, size = [], [], 0
    for c in convs:
        cur.append(c)
        size += len(c[1])
        if size >= SHARD_TOKENS:
            shards.append(cur)
            cur, size = [], 0
    if cur:
        shards.append(cur)
    captured = {}
    last = model.model.layers[-1]
    hook = last.register_forward_hook(lambda m, i, o: captured.__setitem__("out", o[0] if isinstance(o, tuple) else o))
    total = sum(len(c[1]) for c in convs)
    with tqdm(total=total, desc="verifier features", unit="tok", unit_scale=True) as bar:
        for s, shard in enumerate(shards):
            d = args.out / f"shard_{s:04d}"
            n = sum(len(c[1]) for c in shard)
            if (d / "done").is_file():
                bar.update(n)
                continue
            d.mkdir(parents=True, exist_ok=True)
            feats = np.lib.format.open_memmap(d / "features.npy", "w+", np.float16, (n, len(FEATURE_LAYERS), model.config.hidden_size))
            top_ids = np.zeros((n, TOP_K), np.int32)
            top_logp = np.zeros((n, TOP_K), np.float16)
            tokens = np.zeros(n, np.int32)
            roles = np.zeros(n, np.uint8)
            starts = [0]
            pos = 0
            for kind, ids, role in shard:
                with torch.no_grad():
                    out = model(torch.tensor([ids]), output_hidden_states=True)
                hs = out.hidden_states
                layers = [hs[i][0] if i < len(hs) - 1 else captured["out"][0] for i in FEATURE_LAYERS]
                m = len(ids)
                feats[pos:pos + m] = torch.stack(layers, 1).numpy().astype(np.float16)
                logp = torch.log_softmax(out.logits[0].float(), -1)
                v, i = logp.topk(TOP_K, -1)
                top_ids[pos:pos + m], top_logp[pos:pos + m] = i.numpy(), v.numpy()
                tokens[pos:pos + m], roles[pos:pos + m] = ids, role
                pos += m
                starts.append(pos)
                bar.update(m)
            feats.flush()
            del feats
            np.save(d / "top_ids.npy", top_ids)
            np.save(d / "top_logp.npy", top_logp)
            np.save(d / "tokens.npy", tokens)
            np.save(d / "roles.npy", roles)
            np.save(d / "starts.npy", np.array(starts, np.int64))
            (d / "kinds.json").write_text(json.dumps([c[0] for c in shard]))
            (d / "done").write_text("ok")
    hook.remove()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--verifier", type=Path, required=True, help="HuggingFace checkpoint of the verifier (target)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--corpus", type=Path, default=None, help="score the text files under this folder instead")
    ap.add_argument("--magpie", type=int, default=1200, help="verifier-written prompts to add (default 1200)")
    ap.add_argument("--scale", type=float, default=1.0, help="scales the number of templated prompts")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--max-conversations", type=int, default=None,
                    help="answer a random subset of this many prompts (with those already answered)")
    ap.add_argument("--max-len", type=int, default=1024, help="tokens per conversation kept for features")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--engine", type=Path, default=None,
                    help="write the answers with this specrt engine directory (greedy, n-gram drafting) "
                         "instead of batched PyTorch")
    ap.add_argument("--kinds", type=lambda s: set(s.split(",")), default=None,
                    help="answer only prompts of these kinds (comma-separated, e.g. rag,summarization)")
    ap.add_argument("--gen-dtype", choices=("fp32", "bf16"), default="bf16",
                    help="generation compute (bf16 is ~2x faster here; features are always fp32)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage", choices=("all", "prompts", "answers", "features"), default="all")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    tok, model = load_model(args.verifier, args.gen_dtype)
    eos = sorted({t for t in [tok.eos_token_id, tok.convert_tokens_to_ids("<|im_end|>")] if t is not None})
    if not args.corpus and args.stage in ("all", "prompts", "answers"):
        prompts = stage_prompts(args, tok, model, eos)
        if args.stage != "prompts":
            stage_answers(args, tok, model, eos, prompts)
    if args.stage in ("all", "features"):
        if args.gen_dtype != "fp32":
            tok, model = load_model(args.verifier, "fp32")
        stage_features(args, tok, model)
    return 0


if __name__ == "__main__":
    sys.exit(main())
