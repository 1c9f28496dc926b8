"""``specrt bench --spec-bench FILE``: Spec-Bench questions, every system side by side in one run.

Spec-Bench (Xia et al., ACL Findings 2024) is the benchmark speculative-decoding methods report
against: six categories -- multi-turn conversation (MT-bench), translation, summarisation, QA,
maths reasoning, RAG -- each with its own share of text a drafter can copy or predict.  Here:

* every question goes through the engine's chat template; a two-turn question's second turn is
  sent after the model's own first answer (target-only greedy, so every system sees the same
  prompt ids), and both turns are measured;
* every system (specrt configurations of one or more engine directories, and peers: transformers,
  onnxruntime-genai, OpenVINO GenAI) runs every prompt once per repeat, alternating, so machine
  noise hits all of them alike; greedy;
* per category and overall: tokens/s (new tokens / wall time including prefill, summed over the
  category), speedup over the system's reference (a specrt row: its own engine's target-only; a
  peer: the first system), acceptance and tokens per target pass (specrt), and whether every greedy
  output is identical to the reference's (it must be, for specrt rows).

The suffix drafter learns from earlier generations on its engine: each such system gets a cache of
its own, emptied before every repeat, so it never sees another system's (identical) answer to the
same question -- only the earlier questions of the same repeat, as in real use.
"""
from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from specrt.peers import Run, System, grouped_bars
from specrt.runtime import Engine
from specrt.runtime.errors import GenerationError

MT_BENCH = {"writing", "roleplay", "reasoning", "math", "coding", "extraction", "stem", "humanities"}
CATEGORIES = ("mt_bench", "translation", "summarization", "qa", "math_reasoning", "rag")
TITLES = {"mt_bench": "MT-bench", "translation": "translation", "summarization": "summarization", "qa": "QA",
          "math_reasoning": "math", "rag": "RAG"}


def load_questions(path: Path) -> list[dict]:
    """Spec-Bench's question.jsonl format: question_id, category, turns (1 or 2 user messages)."""
    questions = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            q = json.loads(line)
        except json.JSONDecodeError as e:
            raise GenerationError(f"{path}:{n}: not JSON ({e})") from None
        if not isinstance(q, dict) or not isinstance(q.get("turns"), list) or not q["turns"] or \
                not all(isinstance(t, str) for t in q["turns"]) or not isinstance(q.get("category"), str):
            raise GenerationError(f"{path}:{n}: a Spec-Bench question needs 'category' and 'turns' (a list of strings)")
        questions.append(q)
    if not questions:
        raise GenerationError(f"{path} holds no questions")
    return questions


def category(q: dict) -> str:
    return "mt_bench" if q["category"] in MT_BENCH else q["category"]


@dataclass
class Prompt:
    question_id: object
    category: str
    turn: int
    ids: list[int]


def build_prompts(engine: Engine, questions: Sequence[dict], max_new_tokens: int, progress: bool = True) -> list[Prompt]:
    """Chat-template prompt ids for every turn; a second turn follows target-only greedy's first answer."""
    from tqdm.auto import tqdm

    out = []
    for q in tqdm(questions, desc="spec-bench prompts", unit="question", disable=not progress):
        messages: list[dict] = []
        for turn, text in enumerate(q["turns"]):
            messages.append({"role": "user", "content": text})
            ids = engine.chat_prompt(messages)
            out.append(Prompt(q.get("question_id"), category(q), turn + 1, ids))
            if turn + 1 < len(q["turns"]):
                answer = engine.generate(ids, max_new_tokens=max_new_tokens, use_draft=False)
                messages.append({"role": "assistant", "content": answer.text})
    return out


@dataclass
class Tally:
    tokens: int = 0
    seconds: float = 0.0
    steps: int = 0
    proposed: int = 0
    accepted: int = 0
    runs: int = 0
    identical: list[bool] = field(default_factory=list)

    def add(self, run: Run) -> None:
        self.tokens += len(run.token_ids)
        self.seconds += run.seconds
        self.runs += 1
        if run.steps is not None:
            self.steps += run.steps
            self.proposed += run.proposed or 0
            self.accepted += run.accepted or 0

    def merged(self, other: Tally) -> Tally:
        return Tally(self.tokens + other.tokens, self.seconds + other.seconds, self.steps + other.steps,
                     self.proposed + other.proposed, self.accepted + other.accepted, self.runs + other.runs,
                     self.identical + other.identical)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class SideBySide:
    """Configurations of one engine timed turn by turn (a benchmark script's A/B): per configuration and category,
    seconds, tokens and target passes; printed as speed over a reference configuration / tokens per pass."""

    def __init__(self) -> None:
        self.tally: dict[tuple[str, str], Tally] = {}

    def run(self, engine: Engine, prompt: Prompt, config: str, max_new_tokens: int, reference: list[int] | None,
            **request) -> list[int]:
        """One greedy generation of ``prompt`` with ``request`` (no prefix reuse), timed and added; its token ids.
        Stops the benchmark (SystemExit) where they differ from ``reference`` (None: this is the reference)."""
        t0 = time.perf_counter()
        out = engine.generate(prompt.ids, max_new_tokens=max_new_tokens, reuse_prefix=False, **request)
        seconds = time.perf_counter() - t0
        ids = [int(t) for t in out.token_ids]
        if reference is not None and ids != reference:
            raise SystemExit(f"{config}: output differs from the reference on question {prompt.question_id}")
        self.add(config, prompt.category, seconds, len(ids), out.stats.steps)
        return ids

    def add(self, config: str, category: str, seconds: float, tokens: int, passes: int) -> None:
        for cat in (category, "overall"):
            t = self.tally.setdefault((config, cat), Tally())
            t.seconds += seconds
            t.tokens += tokens
            t.steps += passes
            t.runs += 1

    def table(self, configs: Sequence[str], reference: str) -> str:
        """Markdown: a row per configuration, a column per category (Spec-Bench's order, then overall)."""
        cats = [c for c in (*CATEGORIES, "overall") if (reference, c) in self.tally]
        lines = ["| configuration | " + " | ".join(TITLES.get(c, c) for c in cats) + " |",
                 "|---|" + "---:|" * len(cats)]
        for config in configs:
            cells = []
            for cat in cats:
                t, ref = self.tally[(config, cat)], self.tally[(reference, cat)]
                cells.append(f"{t.tokens_per_s / ref.tokens_per_s:.2f}x / {t.tokens / max(1, t.steps):.2f}")
            lines.append(f"| {config} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def run_spec_bench(systems: Sequence[System], prompts: Sequence[Prompt], repeats: int = 1,
                   progress: bool = True) -> list[dict]:
    """One row per system: per-category and overall tallies, speedups and identity with the reference."""
    from tqdm.auto import tqdm

    names = [s.name for s in systems]
    if len(set(names)) != len(names):
        raise ValueError(f"systems need distinct names, got {names}")
    tallies = {s.name: {c: Tally() for c in CATEGORIES} for s in systems}
    outputs: dict[str, list[list[int]]] = {s.name: [] for s in systems}
    with tqdm(total=repeats * len(prompts) * len(systems), desc="spec-bench", unit="run", disable=not progress) as bar:
        for rep in range(repeats):
            for s in systems:
                s.reset()
            for p in prompts:
                for s in systems:
                    bar.set_description(f"spec-bench: {s.name[:32]}")
                    run = s.run(p.ids, 0.0, 1000 + rep)
                    tallies[s.name].setdefault(p.category, Tally()).add(run)
                    if rep == 0:
                        outputs[s.name].append(run.token_ids)
                    bar.update(1)
    rows = []
    first = systems[0].name
    for s in systems:
        # identity is checked against an explicit reference (a speculative row's own target-only decoding);
        # a row without one is only timed against the first system
        reference = s.reference or first
        per_cat = {c: t for c, t in tallies[s.name].items() if t.runs}
        for i, p in enumerate(prompts):
            if s.reference is not None:
                per_cat[p.category].identical.append(outputs[s.name][i] == outputs[reference][i])
        overall = Tally()
        for t in per_cat.values():
            overall = overall.merged(t)
        row = {"system": s.name, "reference": reference, "categories": {}, "overall": None}
        for cat, t in [*per_cat.items(), ("overall", overall)]:
            ref = tallies[reference].get(cat) if cat != "overall" else None
            ref_tps = ref.tokens_per_s if ref is not None else None
            if cat == "overall":
                ref_all = Tally()
                for t2 in tallies[reference].values():
                    ref_all = ref_all.merged(t2)
                ref_tps = ref_all.tokens_per_s
            entry = {"tokens_per_s": round(t.tokens_per_s, 2),
                     "speedup": round(t.tokens_per_s / ref_tps, 3) if ref_tps else None,
                     "acceptance": round(t.accepted / t.proposed, 3) if t.proposed else None,
                     "tokens_per_pass": round(t.tokens / t.steps, 3) if t.steps else None,
                     "identical": (all(t.identical) if t.identical else None), "tokens": t.tokens,
                     "seconds": round(t.seconds, 3), "runs": t.runs}
            if cat == "overall":
                row["overall"] = entry
            else:
                row["categories"][cat] = entry
        rows.append(row)
    return rows


def format_report(rows: list[dict]) -> str:
    cats = [c for c in CATEGORIES if any(c in r["categories"] for r in rows)]
    head = "| system | " + " | ".join(TITLES[c] for c in cats) + " | overall | tok/s | acceptance | tokens/pass | " \
        "greedy output identical to |"
    lines = [("Speedup of each row over its reference: a speculative row over its own plain decoding (specrt: the "
              "same engine's target-only; OpenVINO: its plain pipeline), every other row over the first row; greedy."),
             "", head, "|---|" + "---:|" * (len(cats) + 4) + "---|"]
    for r in rows:
        cells = []
        for c in cats:
            e = r["categories"].get(c)
            cells.append("-" if e is None or e["speedup"] is None else f"{e['speedup']:.2f}x")
        o = r["overall"]
        same = "-" if o["identical"] is None else ("yes" if o["identical"] else "**NO**") + f" ({r['reference']})"
        acc = "-" if o["acceptance"] is None else f"{o['acceptance']:.2f}"
        tpp = "-" if o["tokens_per_pass"] is None else f"{o['tokens_per_pass']:.2f}"
        lines.append(f"| {r['system']} | " + " | ".join(cells) + f" | {o['speedup']:.2f}x | {o['tokens_per_s']:.1f} | "
                     f"{acc} | {tpp} | {same} |")
    lines += ["", "Tokens/s per category:", "", "| system | " + " | ".join(TITLES[c] for c in cats) + " | overall |",
              "|---|" + "---:|" * (len(cats) + 1)]
    for r in rows:
        cells = [f"{r['categories'][c]['tokens_per_s']:.1f}" if c in r["categories"] else "-" for c in cats]
        lines.append(f"| {r['system']} | " + " | ".join(cells) + f" | {r['overall']['tokens_per_s']:.1f} |")
    lines += ["", "Tokens per target pass (acceptance) per category, speculative specrt rows:", "",
              "| system | " + " | ".join(TITLES[c] for c in cats) + " |", "|---|" + "---:|" * len(cats)]
    for r in rows:
        if r["overall"]["acceptance"] is None:  # target-only rows and peers
            continue
        cells = []
        for c in cats:
            e = r["categories"].get(c)
            cells.append("-" if not e or e["tokens_per_pass"] is None else
                         f"{e['tokens_per_pass']:.2f} ({e['acceptance'] if e['acceptance'] is not None else 0:.2f})")
        lines.append(f"| {r['system']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_report(rows: list[dict], path: Path) -> bool:
    """Grouped bars: tokens/s per category for every system; False when matplotlib is missing."""
    cats = [c for c in CATEGORIES if any(c in r["categories"] for r in rows)] + ["overall"]
    series = {r["system"]: [r["overall"]["tokens_per_s"] if c == "overall" else
                            r["categories"][c]["tokens_per_s"] if c in r["categories"] else 0.0 for c in cats]
              for r in rows}
    return grouped_bars(path, [TITLES.get(c, c) for c in cats], series, "tokens/s (greedy)",
                        "Spec-Bench, side by side in one run")
