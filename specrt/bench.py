"""Side-by-side benchmark: target-only vs speculative configurations, in one process, alternating runs.

Speed claims come from here, never from timed unit tests.  Each repeat runs every
configuration on the same prompt in turn, so machine noise hits all of them alike; the table
reports medians and speedup = median tokens/s over the median of the target-only run at the
same temperature.  Greedy strict rows must be identical to target-only ("same"); relaxed
(LOSSY) rows report their token agreement with the strict output instead, so a fast-but-wrong
configuration is visible next to its speed.
"""
from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from specrt.runtime.engine import Engine

DEFAULT_PROMPTS = [
    {"name": "code", "prompt": "import os\n\n\ndef list_python_files(root):\n    \"\"\"Return every .py file under root.\"\"\"\n"},
    {"name": "chat", "chat": [{"role": "user", "content": "How do I choose a good name for a variable?"}]},
]


@dataclass(frozen=True)
class Config:
    label: str
    k: int | None = None  # None = target only
    policy: str = "fixed"
    temperature: float = 0.0
    acceptance: str = "strict"
    accept_tau: float | None = None
    confidence_tau: float | None = None
    drafter: str | None = None  # None = the engine's default

    def kwargs(self) -> dict:
        # every row prefills its prompt afresh: a row after another on the same prompt must not reuse its KV
        return {"reuse_prefix": False, "k": self.k, "use_draft": self.k is not None, "policy": self.policy, "temperature": self.temperature,
                "acceptance": self.acceptance, "accept_tau": self.accept_tau, "confidence_tau": self.confidence_tau,
                "drafter": self.drafter if self.k is not None else None, "tree_nodes": 0}


def fixed_configs(ks: Sequence[int]) -> list[Config]:
    return [Config("target-only")] + [Config(f"fixed k={k}", k) for k in ks]


def policy_configs(ks: Sequence[int], k: int = 4, temperatures: Sequence[float] = (0.0, 0.8)) -> list[Config]:
    out = []
    for t in temperatures:
        sfx = "" if t == 0 else f" T={t}"
        out += [Config("target-only" + sfx, temperature=t)]
        out += [Config(f"fixed k={kk}{sfx}", kk, temperature=t) for kk in ks]
        out += [Config(f"confidence k={k} tau=0.5{sfx}", k, "confidence", t, confidence_tau=0.5),
                Config(f"adaptive{sfx}", k, "adaptive", t),
                Config(f"budget k={k} 1/tok{sfx}", k, "budget", t)]
    return out


def relaxed_configs(taus: Sequence[float], k: int = 4) -> list[Config]:
    return [Config(f"RELAXED k={k} tau={t}", k, acceptance="relaxed", accept_tau=t) for t in taus]


@dataclass
class Row:
    prompt: str
    config: Config
    tokens_per_s: list[float] = field(default_factory=list)
    acceptance_rate: list[float] = field(default_factory=list)
    tokens_per_step: list[float] = field(default_factory=list)
    draft_s: list[float] = field(default_factory=list)
    verify_s: list[float] = field(default_factory=list)
    prefill_s: list[float] = field(default_factory=list)
    other_s: list[float] = field(default_factory=list)
    new_tokens: list[int] = field(default_factory=list)
    agreement: list[float] = field(default_factory=list)  # with target-only greedy output

    def summary(self, baseline: float | None) -> dict:
        med = statistics.median
        tps = med(self.tokens_per_s)
        n = max(1, med(self.new_tokens))
        c = self.config
        return {
            "prompt": self.prompt, "config": c.label, "k": c.k, "policy": c.policy if c.k else "target-only",
            "temperature": c.temperature, "acceptance": c.acceptance, "accept_tau": c.accept_tau,
            "tokens_per_s": round(tps, 2), "speedup": round(tps / baseline, 3) if baseline else None,
            "acceptance_rate": round(med(self.acceptance_rate), 3),
            "tokens_per_step": round(med(self.tokens_per_step), 3),
            "ms_per_token": {"draft": round(1e3 * med(self.draft_s) / n, 2),
                             "verify": round(1e3 * med(self.verify_s) / n, 2),
                             "prefill": round(1e3 * med(self.prefill_s) / n, 2),
                             "other": round(1e3 * med(self.other_s) / n, 2)},
            "agreement_with_target": round(min(self.agreement), 4) if self.agreement else None,
            "runs": len(self.tokens_per_s),
        }


def prompt_ids(engine: Engine, item: dict) -> list[int]:
    if "chat" in item:
        return engine.chat_prompt(item["chat"])
    if "prompt_ids" in item:
        return list(item["prompt_ids"])
    return engine.encode(item["prompt"])


def _agreement(ids: list[int], reference: list[int]) -> float:
    n = max(len(ids), len(reference))
    return sum(a == b for a, b in zip(ids, reference)) / n if n else 1.0


def bench(engine: Engine, prompts: Sequence[dict] = DEFAULT_PROMPTS, configs: Sequence[Config] | None = None,
          max_new_tokens: int = 64, repeats: int = 3, progress: bool = True, seed: int = 0) -> list[dict]:
    """One summary row per (prompt, config)."""
    configs = list(configs or fixed_configs([k for k in engine.manifest.k_values if k > 1]))
    results: list[dict] = []
    with tqdm(total=len(prompts) * repeats * len(configs), desc="bench", disable=not progress, unit="run") as bar:
        for item in prompts:
            ids = prompt_ids(engine, item)
            name = item.get("name", "prompt")
            engine.generate(ids, max_new_tokens=8, use_draft=False, reuse_prefix=False)  # warm-up (allocations, ORT arenas)
            rows = {c: Row(name, c) for c in configs}
            for rep in range(repeats):
                reference = engine.generate(ids, max_new_tokens=max_new_tokens, use_draft=False,
                                            reuse_prefix=False).token_ids
                for c in configs:
                    r = engine.generate(ids, max_new_tokens=max_new_tokens, seed=seed + rep, **c.kwargs())
                    row, s = rows[c], r.stats
                    row.tokens_per_s.append(s.tokens_per_s)
                    row.acceptance_rate.append(s.acceptance_rate)
                    row.tokens_per_step.append(s.tokens_per_step)
                    row.draft_s.append(s.draft_s)
                    row.verify_s.append(s.verify_s)
                    row.prefill_s.append(s.prefill_s)
                    row.other_s.append(s.other_s)
                    row.new_tokens.append(s.new_tokens)
                    if c.temperature == 0:
                        row.agreement.append(_agreement(r.token_ids, reference))
                    bar.update(1)
            for c in configs:
                base = next((rows[b] for b in configs if b.k is None and b.temperature == c.temperature), None)
                baseline = statistics.median(base.tokens_per_s) if base else None
                results.append(rows[c].summary(baseline))
    return results


def format_table(rows: list[dict]) -> str:
    head = (f"{'prompt':<6} {'config':<30} {'tok/s':>7} {'speedup':>8} {'accept':>7} {'tok/pass':>8} "
            f"{'draft ms/t':>10} {'verify ms/t':>11} {'prefill ms/t':>12} {'other ms/t':>10} {'same as target':>14}")
    lines = [head, "-" * len(head)]
    for r in rows:
        ms = r["ms_per_token"]
        agree = r["agreement_with_target"]
        if agree is None:
            same = "(sampled)"
        elif r["acceptance"] == "relaxed":
            same = f"{100 * agree:.0f}% LOSSY"
        else:
            same = "yes" if agree == 1.0 else "NO (bug)"
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        lines.append(f"{r['prompt']:<6} {r['config']:<30} {r['tokens_per_s']:>7.1f} {speed:>8} "
                     f"{r['acceptance_rate']:>7.2f} {r['tokens_per_step']:>8.2f} {ms['draft']:>10.2f} "
                     f"{ms['verify']:>11.2f} {ms['prefill']:>12.2f} {ms['other']:>10.2f} {same:>14}")
    return "\n".join(lines)
