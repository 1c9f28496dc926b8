"""Side-by-side benchmark: target-only vs speculative decoding, in one process, alternating runs.

Speed claims come from here, never from timed unit tests.  Each repeat runs the
target-only baseline and then every k on the same prompt, so machine noise hits
all of them alike; the table reports medians and the ratio of medians.
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from specrt.runtime.engine import Engine
from tqdm.auto import tqdm

DEFAULT_PROMPTS = [
    {"name": "code", "prompt": "import os\n\n\ndef list_python_files(root):\n    \"\"\"Return every .py file under root.\"\"\"\n"},
    {"name": "chat", "chat": [{"role": "user", "content": "Explain what a hash table is, in three sentences."}]},
]


@dataclass
class BenchRow:
    prompt: str
    k: int | None  # None = target only
    tokens_per_s: list[float] = field(default_factory=list)
    acceptance_rate: list[float] = field(default_factory=list)
    tokens_per_step: list[float] = field(default_factory=list)
    draft_s: list[float] = field(default_factory=list)
    verify_s: list[float] = field(default_factory=list)
    other_s: list[float] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    same_as_target: list[bool] = field(default_factory=list)

    def summary(self, baseline: float) -> dict:
        med = statistics.median
        tps = med(self.tokens_per_s)
        n = max(1, med(self.new_tokens))
        return {
            "prompt": self.prompt, "k": self.k, "tokens_per_s": round(tps, 2),
            "speedup": round(tps / baseline, 3) if baseline else None,
            "acceptance_rate": round(med(self.acceptance_rate), 3), "tokens_per_step": round(med(self.tokens_per_step), 3),
            "ms_per_token": {"draft": round(1e3 * med(self.draft_s) / n, 2), "verify": round(1e3 * med(self.verify_s) / n, 2),
                             "other": round(1e3 * med(self.other_s) / n, 2)},
            "identical_to_target_only": all(self.same_as_target),
            "runs": len(self.tokens_per_s),
        }


def prompt_ids(engine: Engine, item: dict) -> list[int]:
    if "chat" in item:
        return engine.chat_prompt(item["chat"])
    if "prompt_ids" in item:
        return list(item["prompt_ids"])
    return engine.encode(item["prompt"])


def bench(engine: Engine, prompts: Sequence[dict] = DEFAULT_PROMPTS, ks: Sequence[int] = (2, 4, 8),
          max_new_tokens: int = 64, repeats: int = 3, progress: bool = True) -> list[dict]:
    """Return one summary row per (prompt, k), k=None being the target-only baseline."""
    results: list[dict] = []
    total = len(prompts) * repeats * (len(ks) + 1)
    with tqdm(total=total, desc="bench", disable=not progress, unit="run") as bar:
        for item in prompts:
            ids = prompt_ids(engine, item)
            name = item.get("name", "prompt")
            engine.generate(ids, max_new_tokens=8, use_draft=False)  # warm-up (allocations, ORT arenas)
            rows = {k: BenchRow(name, k) for k in [None, *ks]}
            for _ in range(repeats):
                reference = None
                for k in [None, *ks]:
                    r = engine.generate(ids, max_new_tokens=max_new_tokens, k=k, use_draft=k is not None)
                    reference = r.token_ids if k is None else reference
                    row, s = rows[k], r.stats
                    row.tokens_per_s.append(s.tokens_per_s)
                    row.acceptance_rate.append(s.acceptance_rate)
                    row.tokens_per_step.append(s.tokens_per_step)
                    row.draft_s.append(s.draft_s)
                    row.verify_s.append(s.verify_s)
                    row.other_s.append(s.other_s + s.prefill_s)
                    row.new_tokens.append(s.new_tokens)
                    row.same_as_target.append(r.token_ids == reference)
                    bar.update(1)
            baseline = statistics.median(rows[None].tokens_per_s)
            results += [rows[k].summary(baseline) for k in [None, *ks]]
    return results


def format_table(rows: list[dict]) -> str:
    head = f"{'prompt':<8} {'k':>6} {'tok/s':>8} {'speedup':>8} {'accept':>7} {'tok/step':>8} " \
           f"{'draft ms/t':>10} {'verify ms/t':>11} {'other ms/t':>10} {'same':>5}"
    lines = [head, "-" * len(head)]
    for r in rows:
        ms = r["ms_per_token"]
        lines.append(f"{r['prompt']:<8} {('target' if r['k'] is None else r['k']):>6} {r['tokens_per_s']:>8.1f} "
                     f"{r['speedup']:>7.2f}x {r['acceptance_rate']:>7.2f} {r['tokens_per_step']:>8.2f} "
                     f"{ms['draft']:>10.2f} {ms['verify']:>11.2f} {ms['other']:>10.2f} "
                     f"{'yes' if r['identical_to_target_only'] else 'NO':>5}")
    return "\n".join(lines)
