"""``specrt bench --peers``: specrt beside what a user would run instead -- same checkpoint, same
prompts, same process, one run.

Systems (a row each, per prompt and temperature):

* ``specrt target-only`` / ``specrt k=K``: the engine directory, and every ``--also-engine`` (for
  example the int4 export of the same pair), labelled by the directory's quantization;
* ``transformers generate()`` and ``transformers assisted k=K`` (``assistant_model=`` the draft):
  PyTorch fp32 on ``--hf-target`` / ``--hf-draft`` (needs torch: ``pip install specrt[export]``);
* ``onnxruntime-genai <dir>``: plain decoding of a model built by onnxruntime-genai's model builder,
  one per ``--genai-model``.  onnxruntime-genai has no speculative decoding; it is the speed an
  ONNX Runtime user gets otherwise.  Its 0.18 builder needs transformers 5 while specrt's exporter
  needs transformers < 4.58, so it runs in its own virtual environment: ``--genai-python`` is that
  environment's Python, which runs ``specrt/genai_worker.py`` as a subprocess.

Every system runs once per repeat, alternating, so machine noise hits all of them alike; the
table reports medians.  Speed is new tokens / wall time including the prompt's prefill, for all
systems.  The report is a markdown table, the rows as JSON, and a PNG bar chart.
"""
from __future__ import annotations

import json
import statistics
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from specrt.bench import prompt_ids
from specrt.runtime import Engine
from specrt.runtime.drafters import RecycleTable
from specrt.runtime.engine import Sequence as EngineSequence

BASELINE = "specrt target-only"


@dataclass
class Run:
    """One generation by one system: its new token ids and wall time, and speculation counters if it has them."""

    token_ids: list[int]
    seconds: float
    steps: int | None = None  # target passes
    proposed: int | None = None
    accepted: int | None = None

    @property
    def acceptance(self) -> float | None:
        return None if not self.proposed else self.accepted / self.proposed


RunFn = Callable[[list[int], float, int], Run]  # (prompt ids, temperature, seed) -> Run


@dataclass
class System:
    name: str
    run: RunFn
    close: Callable[[], None] = field(default=lambda: None)
    # the system whose greedy tokens this one must reproduce (None: the report's first system)
    reference: str | None = None
    reset: Callable[[], None] = field(default=lambda: None)  # before each repeat (e.g. a suffix cache)


def engine_label(engine: Engine) -> str:
    """'fp32', 'int4', 'int4 (draft int4)' ... from the manifest's quantization records."""
    def bits(spec) -> str:
        q = spec.raw.get("quantization")
        if not q:
            return spec.dtype.replace("float", "fp")
        if q.get("scheme") == "int8-rows":
            return "int8-rows"
        label = f"int{q['bits']}"
        if spec.role == "target" and q.get("accuracy_level", 1) > 1:
            label += f" acc{q['accuracy_level']}"
            if q.get("batch_invariant") is False:
                label += ", not batch-invariant"
            elif spec.min_rows > 1:
                label += f", {spec.min_rows}-row steps"
        return label

    target = bits(engine.manifest.target)
    if getattr(engine.target_model, "prefill_session", None) is not None:
        record = engine.manifest.target.raw["prefill_graph"]
        target += ", prefill int8-rows" if engine.manifest.target.prefill_graph_scheme == "int8-rows" else \
            f", prefill acc{record['accuracy_level']}"
    if engine.manifest.draft is None:
        return f"{target}, no draft"
    draft = bits(engine.manifest.draft)
    return target if target.startswith(draft) else f"{target}, draft {draft}"


def specrt_run(engine: Engine | EngineSequence, max_new_tokens: int, **params) -> RunFn:
    """A RunFn for one specrt configuration (``params``: Request fields, e.g. k, drafter, policy), on an engine's
    default sequence or on a sequence of its own."""
    def go(ids: list[int], temperature: float, seed: int) -> Run:
        # afresh: every system runs the same prompts, and a reused prefix would skip the prefill being compared
        r = engine.generate(ids, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, reuse_prefix=False,
                            **params)
        s = r.stats
        return Run(r.token_ids, s.total_s, s.steps, s.proposed, s.accepted)
    return go


def specrt_systems(engine: Engine, ks: Sequence[int], max_new_tokens: int, label: str | None = None,
                   drafters: Sequence[str] = ("model",), policy: str = "fixed",
                   tree_nodes: Sequence[int] = (0,), plan: Sequence[tuple[str, int]] | None = None) -> list[System]:
    """Target-only and one speculative system per (drafter, k, tree size) on one engine directory.

    ``plan`` lists the (drafter, tree size) pairs to run instead of every drafter with every tree size.
    """
    suffix = f" [{label}]" if label else ""
    base = f"{BASELINE}{suffix}"
    systems = [System(base, specrt_run(engine, max_new_tokens, use_draft=False))]
    pairs = list(plan) if plan is not None else [(d, n) for d in drafters for n in tree_nodes]
    for drafter, nodes in pairs:
        for k in ks:
            shown = drafter + (" + datastore" if drafter == "suffix" and engine.datastore is not None else "")
            name = f"specrt {shown} k={k}" + (f" {policy}" if policy != "fixed" else "") + \
                (f" tree {nodes}" if nodes else "") + suffix
            if drafter == "model" and len(pairs) == 1 and not nodes:
                name = f"specrt k={k}{suffix}"
            # speculative rows are checked against their own engine's target-only decoding (losslessness);
            # the suffix and recycle drafters learn from earlier generations: emptied before every repeat, so
            # a repeat never drafts from its own earlier answer to the same prompt -- and each recycling system
            # has a table of its own, so it never drafts from another system's run of the same prompt either
            # (it still learns from the earlier prompts, as a deployed engine would)
            reset = engine.suffix_cache.clear if drafter == "suffix" else (lambda: None)
            on = engine
            if "recycle" in drafter:  # a sequence with a table of its own
                table = RecycleTable(engine.manifest.target.vocab_size)
                on, reset = engine.sequence(recycle_table=table), table.clear
            run = specrt_run(on, max_new_tokens, k=k, drafter=drafter, policy=policy, tree_nodes=nodes)
            systems.append(System(name, run, reference=base, reset=reset))
    return systems


def transformers_systems(target_dir: Path, draft_dir: Path | None, k: int, max_new_tokens: int,
                         eos_ids: Sequence[int], threads: int) -> list[System]:
    """HuggingFace transformers' plain and assisted generation (PyTorch, fp32, CPU)."""
    import time

    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    target = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    draft = AutoModelForCausalLM.from_pretrained(draft_dir, dtype=torch.float32).eval() if draft_dir else None
    eos = list(eos_ids)

    def run(assisted: bool) -> RunFn:
        def go(ids: list[int], temperature: float, seed: int):
            torch.manual_seed(seed)
            kw = {"max_new_tokens": max_new_tokens, "eos_token_id": eos, "pad_token_id": eos[0],
                  "do_sample": temperature > 0, "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
            if temperature > 0:
                kw.update(temperature=temperature, top_k=0, top_p=1.0)
            else:
                kw.update(temperature=None, top_k=None, top_p=None)
            if assisted:
                draft.generation_config.num_assistant_tokens = k
                draft.generation_config.num_assistant_tokens_schedule = "constant"
                kw["assistant_model"] = draft
            start = time.perf_counter()
            with torch.no_grad():
                out = target.generate(torch.tensor([ids]), **kw)
            seconds = time.perf_counter() - start
            return Run(out[0, len(ids):].tolist(), seconds)
        return go

    systems = [System("transformers generate()", run(False))]
    if draft is not None:
        systems.append(System(f"transformers assisted k={k}", run(True)))
    return systems


class Worker:
    """A peer in its own Python (its own virtual environment), spoken to over JSON Lines: ``genai_worker.py``
    (onnxruntime-genai) or ``openvino_worker.py`` (OpenVINO GenAI).  The first line sets it up; each
    request ``{"ids", "max_new_tokens", "temperature", "seed"}`` gets ``{"ids": new ids, "seconds"}``."""

    def __init__(self, python: str, script: str, setup: dict, what: str, hint: str):
        worker = Path(__file__).with_name(script)
        self.what, self.hint = what, hint
        self.proc = subprocess.Popen([python, str(worker)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self._send(setup)
        ready = self._receive()
        self.version = ready.get("genai_version") or ready.get("version", "?")

    def _send(self, obj: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def _receive(self) -> dict:
        assert self.proc.stdout is not None and self.proc.stderr is not None
        line = self.proc.stdout.readline()
        if not line:
            err = self.proc.stderr.read()[-2000:]
            raise RuntimeError(f"the {self.what} worker exited: {err.strip() or 'no message'}. {self.hint}")
        return json.loads(line)

    def run(self, ids: list[int], temperature: float, seed: int, max_new_tokens: int, **extra) -> Run:
        self._send({"ids": ids, "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed, **extra})
        out = self._receive()
        return Run(out["ids"], out["seconds"])

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()  # type: ignore[union-attr]
            self.proc.wait(timeout=30)


def genai_system(python: str, model_dir: Path, vocab_size: int, max_new_tokens: int) -> System:
    worker = Worker(python, "genai_worker.py", {"model": str(Path(model_dir).resolve())}, "onnxruntime-genai",
                    "Check that --genai-python is a Python with onnxruntime-genai installed and --genai-model a "
                    "directory made by its model builder (see docs/usage.md, 'Bench').")
    return System(f"onnxruntime-genai {Path(model_dir).name}",
                  lambda ids, t, seed: worker.run(ids, t, seed, max_new_tokens, vocab_size=vocab_size), worker.close)


OPENVINO_MODES = ("plain", "prompt_lookup", "draft")


def openvino_systems(python: str, model_dir: Path, max_new_tokens: int, draft_dir: Path | None = None,
                     modes: Sequence[str] = OPENVINO_MODES, k: int = 4, draft_k: int = 2,
                     max_ngram_size: int = 3) -> list[System]:
    """OpenVINO GenAI on an IR folder made by optimum-intel: plain decoding, its prompt lookup (k, n-gram
    size) and its draft-model speculation (``draft_dir``, draft_k).  Speculative rows are checked against
    OpenVINO's own plain decoding."""
    hint = ("Check that --openvino-python is a Python with openvino-genai installed and --openvino-model an IR "
            "folder made by `optimum-cli export openvino` (see docs/usage.md, 'Bench').")
    name = f"OpenVINO GenAI {Path(model_dir).name}"
    systems = []
    for mode in modes:
        if mode == "draft" and draft_dir is None:
            continue
        setup = {"model": str(Path(model_dir).resolve()), "mode": mode, "num_assistant_tokens":
                 draft_k if mode == "draft" else k, "max_ngram_size": max_ngram_size,
                 "draft": str(Path(draft_dir).resolve()) if draft_dir else None}
        worker = Worker(python, "openvino_worker.py", setup, "OpenVINO GenAI", hint)
        label = {"plain": name, "prompt_lookup": f"{name} + prompt lookup k={k} n={max_ngram_size}",
                 "draft": f"{name} + draft k={draft_k}"}[mode]

        def go(ids, t, seed, worker=worker):
            return worker.run(ids, t, seed, max_new_tokens)
        systems.append(System(label, go, worker.close, reference=name if mode != "plain" and "plain" in modes
                              else None))
    return systems


def run_peers(engine: Engine, systems: list[System], prompts: Sequence[dict], temperatures: Sequence[float],
              repeats: int, progress: bool = True) -> list[dict]:
    """Alternate every system once per repeat; return one row per (prompt, temperature, system)."""
    from tqdm.auto import tqdm

    names = [s.name for s in systems]
    if len(set(names)) != len(names):
        raise ValueError(f"peer systems need distinct names, got {names}")
    rows = []
    total = len(prompts) * len(temperatures) * repeats * len(systems)
    with tqdm(total=total, desc="peers", unit="run", disable=not progress) as bar:
        for item in prompts:
            ids = prompt_ids(engine, item)
            for temperature in temperatures:
                speeds: dict[str, list[float]] = {s.name: [] for s in systems}
                accept: dict[str, list[float]] = {s.name: [] for s in systems}
                outputs: dict[str, list[int]] = {}
                for rep in range(repeats):
                    for s in systems:
                        bar.set_description(f"peers: {s.name[:28]}")
                        run = s.run(ids, temperature, 1000 + rep)
                        speeds[s.name].append(len(run.token_ids) / run.seconds if run.seconds > 0 else 0.0)
                        if run.acceptance is not None:
                            accept[s.name].append(run.acceptance)
                        outputs.setdefault(s.name, run.token_ids)
                        bar.update(1)
                base = statistics.median(speeds[systems[0].name])
                for s in systems:
                    tps = statistics.median(speeds[s.name])
                    reference = s.reference or systems[0].name
                    same = (outputs[s.name] == outputs[reference]) if temperature == 0 and s.name != reference else None
                    rows.append({"prompt": item.get("name", "prompt"), "temperature": temperature, "system": s.name,
                                 "tokens_per_s": round(tps, 2), "vs_target_only": round(tps / base, 3) if base else None,
                                 "acceptance": round(statistics.median(accept[s.name]), 3) if accept[s.name] else None,
                                 "new_tokens": len(outputs[s.name]), "same_greedy_tokens": same,
                                 "reference": reference})
    return rows


def format_report(rows: list[dict], baseline: str) -> str:
    lines = [f"| prompt | T | system | tok/s | vs {baseline} | acceptance | greedy tokens identical to |",
             "|---|---|---|---:|---:|---:|---|"]
    for r in rows:
        same = "-" if r["same_greedy_tokens"] is None else (
            f"{'yes' if r['same_greedy_tokens'] else 'NO'}: {r['reference']}")
        acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
        lines.append(f"| {r['prompt']} | {r['temperature']:g} | {r['system']} | {r['tokens_per_s']:.1f} | "
                     f"{r['vs_target_only']:.2f}x | {acc} | {same} |")
    lines += ["", "Median over prompts:", "", "| T | system | tok/s | vs " + baseline + " |", "|---|---|---:|---:|"]
    for t in sorted({r["temperature"] for r in rows}):
        for name in dict.fromkeys(r["system"] for r in rows):
            sel = [r for r in rows if r["temperature"] == t and r["system"] == name]
            lines.append(f"| {t:g} | {name} | {statistics.median(r['tokens_per_s'] for r in sel):.1f} | "
                         f"{statistics.median(r['vs_target_only'] for r in sel):.2f}x |")
    return "\n".join(lines)


def grouped_bars(path: Path, groups: list[str], series: dict[str, list[float]], ylabel: str, title: str = "",
                 rotate: bool = False) -> bool:
    """A bar chart, one bar per series in every group, as a PNG; False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(groups) + 0.25 * len(series)), 4.8))
    width = 0.85 / max(1, len(series))
    for j, (name, values) in enumerate(series.items()):
        ax.bar([i + j * width for i in range(len(groups))], values, width, label=name)
    ax.set_xticks([i + width * (len(series) - 1) / 2 for i in range(len(groups))])
    ax.set_xticklabels(groups, rotation=30 if rotate else 0, ha="right" if rotate else "center", fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_report(rows: list[dict], path: Path) -> bool:
    """Bar chart of median tok/s per system, greedy and sampled; False when matplotlib is missing."""
    names = list(dict.fromkeys(r["system"] for r in rows))
    series = {f"T={t:g}": [statistics.median([r["tokens_per_s"] for r in rows if r["system"] == n
                                              and r["temperature"] == t]) for n in names]
              for t in sorted({r["temperature"] for r in rows})}
    return grouped_bars(path, names, series, "tokens/s (median over prompts)", rotate=True)
