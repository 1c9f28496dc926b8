"""Traces (JSON Lines) of generations, and the analysis that names the bottleneck.

A trace file holds one or more generations, each a ``header`` record (engine, policy,
sampling), one ``step`` record per target pass, and a ``summary`` record (the Stats).
``analyze`` reads it back and answers "why is this slow?" with evidence and a fix.
"""
from __future__ import annotations

import json
import statistics
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from specrt.runtime.policy import expected_tokens


class TraceWriter:
    def __init__(self, sink: str | Path | IO[str]):
        self._own = not hasattr(sink, "write")
        self._f: IO[str] = open(sink, "a", encoding="utf-8") if self._own else sink  # noqa: SIM115
        self._last = time.perf_counter()

    def header(self, **fields: Any) -> None:
        self._write({"type": "header", "time": time.time(), **fields})
        self._last = time.perf_counter()

    def step(self, index: int, step, emitted: int) -> None:
        now = time.perf_counter()
        wall = now - self._last
        self._last = now
        self._write({
            "type": "step", "step": index, "context": step.length, "proposed": step.proposed,
            "accepted": step.accepted, "emitted": emitted,
            "rejected_at": step.accepted if step.accepted < step.proposed else None,
            "draft_top": step.draft_top, "draft_s": step.draft_s, "verify_s": step.verify_s,
            "host_s": max(0.0, wall - step.draft_s - step.verify_s),
        })

    def summary(self, stats: dict) -> None:
        self._write({"type": "summary", **stats})
        self._f.flush()

    def close(self) -> None:
        if self._own:
            self._f.close()

    def _write(self, record: dict) -> None:
        self._f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------ analysis
@dataclass
class Diagnosis:
    kind: str  # low_acceptance | draft_too_slow | verification_dominates | host_overhead | context_growth | healthy
    evidence: str
    fix: str


@dataclass
class Analysis:
    generations: int
    steps: int
    proposed: int
    accepted: int
    alpha: float  # per-token acceptance estimate: accepted / (accepted + rejections)
    acceptance_by_position: list[float]  # P(position i accepted | proposed and i-1 accepted)
    tokens_per_pass: float
    time_split: dict[str, float]  # seconds: draft, verify, host
    mean_k: float
    c: float  # draft token time / 1-token target pass time (estimated)
    v_k: float  # (k+1)-token target pass / 1-token pass (estimated)
    predicted_speedup: float
    achieved_speedup: float | None  # against target-only generations in the same file, if any
    diagnoses: list[Diagnosis] = field(default_factory=list)

    def as_dict(self) -> dict:
        d = dict(self.__dict__)
        d["diagnoses"] = [x.__dict__ for x in self.diagnoses]
        return d


def read(path: str | Path) -> list[dict]:
    """Split a trace file into generations: {"header", "steps", "summary"}."""
    gens: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n} is not JSON; is this a specrt trace (--trace)?") from None
            kind = rec.get("type")
            if kind == "header":
                gens.append({"header": rec, "steps": [], "summary": None})
            elif kind in ("step", "summary") and gens:
                if kind == "step":
                    gens[-1]["steps"].append(rec)
                else:
                    gens[-1]["summary"] = rec
            else:
                raise ValueError(f"{path}:{n}: unexpected record {kind!r}; is this a specrt trace?")
    if not gens:
        raise ValueError(f"{path} holds no generation (no header record)")
    return gens


def acceptance_by_position(steps: Sequence[dict], k: int | None = None) -> list[float]:
    """P(draft position i accepted | a draft was offered there and positions < i were accepted), i = 1..k
    (default: the most drafts any step offered), from step records; 0.0 where no step reached i."""
    kmax = k if k is not None else max((s["proposed"] for s in steps), default=0)
    out = []
    for i in range(kmax):
        reached = [s for s in steps if s["proposed"] > i and s["accepted"] >= i]
        out.append(round(sum(1 for s in reached if s["accepted"] > i) / len(reached), 4) if reached else 0.0)
    return out


def analyze(generations: Iterable[dict]) -> Analysis:
    gens = list(generations)
    spec = [g for g in gens if g["header"].get("policy") != "target-only"]
    base = [g for g in gens if g["header"].get("policy") == "target-only"]
    steps = [s for g in spec for s in g["steps"]]
    if not steps:
        raise ValueError("the trace has no speculative steps to analyze (only target-only generations?)")
    proposed = sum(s["proposed"] for s in steps)
    accepted = sum(s["accepted"] for s in steps)
    rejections = sum(1 for s in steps if s["rejected_at"] is not None)
    alpha = accepted / (accepted + rejections) if accepted + rejections else 0.0
    by_pos = acceptance_by_position(steps)
    emitted = sum(s["emitted"] for s in steps)
    draft_s = sum(s["draft_s"] for s in steps)
    verify_s = sum(s["verify_s"] for s in steps)
    host_s = sum(s["host_s"] for s in steps)
    mean_k = proposed / len(steps)

    # Cost model: 1-token target pass t1 from target-only steps in the same file if present,
    # else from a linear fit of verify time against pass width, else (one width only) assume v_k = 1.
    base_steps = [s for g in base for s in g["steps"]]
    t_pass = statistics.median(s["verify_s"] for s in steps)
    if base_steps:
        t1 = statistics.median(s["verify_s"] for s in base_steps)
    else:
        t1 = _fit_t1(steps) or t_pass
    draft_steps = [s for s in steps if s["proposed"]]
    t_draft_token = (sum(s["draft_s"] for s in draft_steps) / max(1, sum(s["proposed"] for s in draft_steps)))
    c = t_draft_token / t1
    v_k = t_pass / t1
    k_typ = round(mean_k) or 1
    predicted = expected_tokens(alpha, k_typ) / (k_typ * c + v_k)
    achieved = None
    if base:
        spec_tps = sum(g["summary"]["new_tokens"] for g in spec if g["summary"]) / max(
            1e-12, sum(g["summary"]["total_s"] for g in spec if g["summary"]))
        base_tps = sum(g["summary"]["new_tokens"] for g in base if g["summary"]) / max(
            1e-12, sum(g["summary"]["total_s"] for g in base if g["summary"]))
        achieved = spec_tps / base_tps if base_tps else None
    a = Analysis(len(gens), len(steps), proposed, accepted, round(alpha, 4), by_pos, round(emitted / len(steps), 3),
                 {"draft": round(draft_s, 4), "verify": round(verify_s, 4), "host": round(host_s, 4)},
                 round(mean_k, 2), round(c, 4), round(v_k, 3), round(predicted, 3),
                 None if achieved is None else round(achieved, 3))
    a.diagnoses = _diagnose(a, steps, t1)
    return a


def _fit_t1(steps: list[dict]) -> float | None:
    widths = sorted({s["proposed"] + 1 for s in steps})
    if len(widths) < 2:
        return None
    xs = [s["proposed"] + 1 for s in steps]
    ys = [s["verify_s"] for s in steps]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    t1 = my + slope * (1 - mx)
    return t1 if t1 > 0 else None


def _diagnose(a: Analysis, steps: list[dict], t1: float) -> list[Diagnosis]:
    out: list[Diagnosis] = []
    total = sum(a.time_split.values()) or 1e-12
    if a.alpha < 0.35:
        out.append(Diagnosis(
            "low_acceptance",
            f"acceptance alpha = {a.alpha:.2f} ({a.accepted}/{a.proposed} drafted tokens accepted); "
            f"by position {a.acceptance_by_position[:4]}",
            "the draft is misaligned with the target: check it was trained/distilled on this domain, that "
            "draft and target share the tokenizer and chat template, and that sampling temperature matches; "
            "until then use a smaller k or the adaptive policy"))
    if a.c > 0.25:
        out.append(Diagnosis(
            "draft_too_slow",
            f"one draft token costs c = {a.c:.2f} of a 1-token target pass "
            f"(draft {100 * a.time_split['draft'] / total:.0f}% of the time)",
            "use a smaller/shallower draft (or quantize it: --draft-quant int4); speculation pays only when "
            "c is well below alpha"))
    best_k = max(range(1, 17), key=lambda k: expected_tokens(a.alpha, k) / (k * max(a.c, 1e-3) + 1 + 0.05 * k))
    if a.mean_k >= best_k + 2 and a.alpha >= 0.35:
        out.append(Diagnosis(
            "verification_dominates",
            f"k = {a.mean_k:.1f} drafted per pass but only {a.tokens_per_pass:.2f} tokens emitted per pass; "
            f"for alpha = {a.alpha:.2f} and c = {a.c:.2f} the formula's best k is about {best_k}",
            f"lower k to about {best_k}, or use --policy adaptive / confidence"))
    if a.time_split["host"] / total > 0.3:
        out.append(Diagnosis(
            "host_overhead",
            f"{100 * a.time_split['host'] / total:.0f}% of the time is outside the models (host loop, "
            "detokenisation, the consumer of the stream)",
            "profile the caller's per-token work (printing, callbacks); keep the stream consumer light"))
    if len(steps) >= 8:
        ordered = sorted(steps, key=lambda s: s["context"])
        q = max(2, len(ordered) // 4)
        early = statistics.median(s["verify_s"] / (s["proposed"] + 1) for s in ordered[:q])
        late = statistics.median(s["verify_s"] / (s["proposed"] + 1) for s in ordered[-q:])
        if late > 1.5 * early and ordered[-1]["context"] > 2 * max(1, ordered[0]["context"]):
            out.append(Diagnosis(
                "context_growth",
                f"per-token verify time grows from {1e3 * early:.2f} ms at context ~{ordered[0]['context']} to "
                f"{1e3 * late:.2f} ms at ~{ordered[-1]['context']}",
                "attention/KV cost grows with context (the concat-style KV copy, see benchmarks/kv_copy.py): "
                "keep prompts shorter, or use an engine with in-place KV (not built yet)"))
    severity = {"low_acceptance": 0, "draft_too_slow": 1, "verification_dominates": 2, "context_growth": 3,
                "host_overhead": 4}
    out.sort(key=lambda d: severity[d.kind])
    if not out:
        out.append(Diagnosis("healthy", f"alpha = {a.alpha:.2f}, c = {a.c:.2f}, {a.tokens_per_pass:.2f} tokens "
                             f"per pass, predicted speedup {a.predicted_speedup:.2f}x", "nothing obvious to fix"))
    return out


def format_analysis(a: Analysis) -> str:
    lines = [
        f"generations {a.generations}, speculative steps {a.steps}, drafted {a.proposed}, accepted {a.accepted}",
        f"acceptance alpha {a.alpha:.3f}; by draft position: {a.acceptance_by_position}",
        f"tokens per target pass {a.tokens_per_pass:.2f} (mean k {a.mean_k:.2f})",
        "time: " + ", ".join(f"{k} {v:.3f}s" for k, v in a.time_split.items()),
        f"costs: c = {a.c:.3f} (draft token / 1-token target pass), v_k = {a.v_k:.2f}",
        f"speedup: predicted by E(alpha,k)/(k c + v_k) {a.predicted_speedup:.2f}x"
        + (f", achieved {a.achieved_speedup:.2f}x" if a.achieved_speedup is not None else
           " (no target-only generation in the trace to measure the achieved one)"),
        "",
        "diagnosis:",
    ]
    for d in a.diagnoses:
        lines += [f"  [{d.kind}] {d.evidence}", f"      fix: {d.fix}"]
    return "\n".join(lines)


def plot(gens: list[dict], a: Analysis, out: str | Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from None
    steps = [s for g in gens if g["header"].get("policy") != "target-only" for s in g["steps"]]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    ax[0].bar(range(1, len(a.acceptance_by_position) + 1), a.acceptance_by_position)
    ax[0].set(title="acceptance by draft position", xlabel="position", ylim=(0, 1))
    idx = range(len(steps))
    ax[1].stackplot(idx, [1e3 * s["draft_s"] for s in steps], [1e3 * s["verify_s"] for s in steps],
                    [1e3 * s["host_s"] for s in steps], labels=["draft", "verify", "host"])
    ax[1].set(title="time per step (ms)", xlabel="step")
    ax[1].legend()
    ax[2].plot(idx, [s["emitted"] for s in steps], ".")
    ax[2].set(title="tokens per target pass", xlabel="step")
    fig.tight_layout()
    fig.savefig(out)
