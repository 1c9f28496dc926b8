#!/usr/bin/env python
"""specrt against what a user would pick instead, on the same checkpoints, side by side in one run.

Rows: specrt target-only, specrt speculative (fixed k and adaptive), HuggingFace transformers'
plain ``generate()`` and its assisted generation (``assistant_model=`` the same draft), greedy and
at temperature 0.8, alternating per repeat, medians.  Writes a markdown table (and JSON).

Not included: onnxruntime-genai (its 0.18 model builder needs transformers 5, optimum-onnx needs
transformers < 4.58, so it needs its own virtual environment; not built here).  The shared notes
record genai's plain decoding of the demo verifier at 27.7 ms/token (fp32) and 7.3 ms/token (int4)
on this kind of machine.

Usage: python benchmarks/peers.py ENGINE --target-hf DIR --draft-hf DIR [--k 4] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from specrt.runtime import Engine
from specrt.runtime.bench import DEFAULT_PROMPTS, prompt_ids
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", type=Path)
    ap.add_argument("--target-hf", type=Path, required=True)
    ap.add_argument("--draft-hf", type=Path, required=True)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompts", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=Path("peers.md"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    engine = Engine.load(a.engine, threads=a.threads)
    target = AutoModelForCausalLM.from_pretrained(a.target_hf, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(a.draft_hf, dtype=torch.float32).eval()
    prompts = json.loads(a.prompts.read_text()) if a.prompts else DEFAULT_PROMPTS
    eos = target.generation_config.eos_token_id

    def hf(ids, temperature, assisted, seed):
        torch.manual_seed(seed)
        kw = {"do_sample": temperature > 0, "max_new_tokens": a.max_new_tokens, "eos_token_id": eos,
              "pad_token_id": eos if isinstance(eos, int) else eos[0]}
        if temperature > 0:
            kw.update(temperature=temperature, top_k=0, top_p=1.0)
        if assisted:
            kw["assistant_model"] = draft
            draft.generation_config.num_assistant_tokens = a.k
            draft.generation_config.num_assistant_tokens_schedule = "constant"
        t0 = time.perf_counter()
        with torch.no_grad():
            out = target.generate(torch.tensor([ids]), **kw)
        dt = time.perf_counter() - t0
        new = out[0, len(ids):].tolist()
        return new, len(new) / dt

    def ours(ids, temperature, k, policy, seed):
        r = engine.generate(ids, max_new_tokens=a.max_new_tokens, k=k, use_draft=k is not None, policy=policy,
                            temperature=temperature, seed=seed)
        return r.token_ids, r.stats.tokens_per_s

    systems = {
        "specrt target-only": lambda ids, t, s: ours(ids, t, None, "fixed", s),
        f"specrt speculative k={a.k}": lambda ids, t, s: ours(ids, t, a.k, "fixed", s),
        "specrt speculative adaptive": lambda ids, t, s: ours(ids, t, a.k, "adaptive", s),
        "transformers generate()": lambda ids, t, s: hf(ids, t, False, s),
        f"transformers assisted (k={a.k})": lambda ids, t, s: hf(ids, t, True, s),
    }
    rows = []
    total = len(prompts) * 2 * a.repeats * len(systems)
    with tqdm(total=total, desc="peers", unit="run") as bar:
        for item in prompts:
            ids = prompt_ids(engine, item)
            for temperature in (0.0, 0.8):
                speeds = {name: [] for name in systems}
                outputs = {}
                for rep in range(a.repeats):
                    for name, fn in systems.items():
                        out, tps = fn(ids, temperature, rep)
                        speeds[name].append(tps)
                        outputs.setdefault(name, out)
                        bar.update(1)
                base = statistics.median(speeds["specrt target-only"])
                for name in systems:
                    same = outputs[name] == outputs["transformers generate()"] if temperature == 0 else None
                    rows.append({"prompt": item.get("name", "prompt"), "temperature": temperature, "system": name,
                                 "tokens_per_s": round(statistics.median(speeds[name]), 2),
                                 "vs_specrt_target_only": round(statistics.median(speeds[name]) / base, 3),
                                 "same_tokens_as_transformers_greedy": same})
    lines = ["| prompt | T | system | tok/s | vs specrt target-only | same tokens as transformers greedy |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        same = "-" if r["same_tokens_as_transformers_greedy"] is None else (
            "yes" if r["same_tokens_as_transformers_greedy"] else "no")
        lines.append(f"| {r['prompt']} | {r['temperature']} | {r['system']} | {r['tokens_per_s']:.1f} | "
                     f"{r['vs_specrt_target_only']:.2f}x | {same} |")
    table = "\n".join(lines)
    print(table)
    a.out.write_text(table + "\n")
    a.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
