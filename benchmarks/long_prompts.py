#!/usr/bin/env python
"""What long prompts cost: time to first token and per-pass cost by rows at contexts of 128 to 2,048 tokens, for
specrt engines and the peers, in one run; plus ONNX Runtime's per-operator profile of a prefill chunk and of 1-, 5-
and 9-row passes at the longest context.

* time to first token: ``generate(prompt, max_new_tokens=1)`` on a prompt of N tokens (Spec-Bench RAG text, cut),
  afresh (no prefix reuse), median of 3; peers (onnxruntime-genai, OpenVINO GenAI) through their workers in their
  own Pythons.
* pass cost: a target pass of 1, 5 and 9 rows at a context of N cache entries (what verification costs as a
  prompt grows); for the peers, their time per generated token after the first (they expose no multi-row pass).
* profile: ms per operator type, summed over the passes.

    python benchmarks/long_prompts.py --engine .cache/demo/engine --engine .cache/demo/engine-q8d \\
        --engine .cache/demo/engine-int4 --genai-model .cache/genai/int4 --genai-python .cache/genai-venv/bin/python \\
        --openvino-model .cache/openvino/int4 --openvino-python .cache/openvino-venv/bin/python \\
        --json-out .cache/long_prompts.json --plot .cache/long_prompts.png
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

CONTEXTS = (128, 512, 1024, 2048)
ROWS = (1, 5, 9)
QUESTIONS = Path(__file__).resolve().parent.parent.parent / "shared" / "benchmarks" / "spec_bench" / "dev.jsonl"


def prompt_of(engine, n: int, variant: int = 0) -> list[int]:
    """n tokens of chat-rendered Spec-Bench RAG text (questions repeated to length).  Each ``variant`` starts from
    another question, so no two variants share a prefix: OpenVINO GenAI caches prefixes across calls by default,
    and a repeated prompt would time its cache, not a prefill."""
    from specrt.spec_bench import load_questions

    rag = [q for q in load_questions(QUESTIONS) if q["category"] == "rag"]
    rag = rag[variant % len(rag):] + rag[:variant % len(rag)]
    ids: list[int] = []
    for q in rag * 8:
        ids += engine.chat_prompt([{"role": "user", "content": q["turns"][0]}])
        if len(ids) >= n:
            break
    return ids[:n]


def median_time(fn, repeats: int = 3) -> float:
    """Median seconds of ``fn(i)`` for i in 1..repeats."""
    times = []
    for i in range(1, repeats + 1):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def specrt_rows(path: Path, contexts, repeats: int, prefill_graph: str = "auto", kernel: str = "auto") -> dict:
    from specrt.runtime import Engine

    engine = Engine.load(path, prefill_graph=prefill_graph, attention_kernel=kernel)
    out = {"ttft": {}, "pass_ms": {}}
    top = engine.max_context - max(ROWS) - 1
    for n in contexts:
        n = min(n, top)
        ids = prompt_of(engine, n)
        engine.generate(ids, max_new_tokens=1, use_draft=False, reuse_prefix=False)  # warm
        out["ttft"][n] = median_time(lambda i, n=n: engine.generate(prompt_of(engine, n, i), max_new_tokens=1,
                                                                    use_draft=False, reuse_prefix=False), repeats)
        step = engine.sequence().target
        step.prefill(np.asarray(ids, np.int64))
        for rows in ROWS:
            def one(_=0, rows=rows, step=step, ids=ids, n=n):
                step.forward(np.asarray(ids[:rows], np.int64), n)
                step.set_length(n)
            one()
            out["pass_ms"].setdefault(n, {})[rows] = median_time(one, 5) * 1e3
    return out


def alternating_ttft(path: Path, contexts, repeats: int) -> dict[str, dict[int, float]]:
    """Time to first token with the prefill graph on and off, the two engines taking turns on each prompt (machine
    drift hits both alike): {choice: {tokens: median seconds}}."""
    from specrt.runtime import Engine

    engines = {choice: Engine.load(path, prefill_graph=choice, check_invariance=False) for choice in ("on", "off")}
    out: dict[str, dict[int, float]] = {choice: {} for choice in engines}
    for n in contexts:
        times: dict[str, list[float]] = {choice: [] for choice in engines}
        for i in range(repeats + 1):  # the first round warms up
            ids = prompt_of(engines["on"], n, i)
            for choice, engine in engines.items():
                t0 = time.perf_counter()
                engine.generate(ids, max_new_tokens=1, use_draft=False, reuse_prefix=False)
                if i:
                    times[choice].append(time.perf_counter() - t0)
        for choice in engines:
            out[choice][n] = statistics.median(times[choice])
    return out


class EngineWorker:
    """A specrt engine in a process of its own, spoken to as ``specrt.peers.Worker`` speaks to the peers (JSON
    Lines: ``{"ids", "max_new_tokens"}`` -> ``{"ids", "seconds"}``): several systems can then take turns on each
    prompt without one process's spinning threads slowing another's passes."""

    def __init__(self, path: Path, kernel: str):
        import subprocess

        self.proc = subprocess.Popen([sys.executable, __file__, "--engine-worker", str(path), "--attention-kernels",
                                      kernel], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()  # type: ignore[union-attr]
        if not line or json.loads(line).get("ready") is not True:
            raise RuntimeError(f"the worker for {path} ({kernel} attention) did not start: see its message above")

    def run(self, ids: list[int], temperature: float, seed: int, max_new_tokens: int):
        self.proc.stdin.write(json.dumps({"ids": ids, "max_new_tokens": max_new_tokens}) + "\n")  # type: ignore
        self.proc.stdin.flush()  # type: ignore[union-attr]
        out = json.loads(self.proc.stdout.readline())  # type: ignore[union-attr]
        return types.SimpleNamespace(token_ids=out["ids"], seconds=out["seconds"])

    def close(self) -> None:
        self.proc.stdin.close()  # type: ignore[union-attr]
        self.proc.wait(timeout=60)


def serve_engine(path: Path, kernel: str) -> int:
    """The worker side of ``EngineWorker``: target-only generation, afresh each time (no prefix reuse)."""
    from specrt.runtime import Engine

    engine = Engine.load(path, attention_kernel=kernel)
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        t0 = time.perf_counter()
        r = engine.generate(req["ids"], max_new_tokens=req["max_new_tokens"], use_draft=False, reuse_prefix=False)
        print(json.dumps({"ids": r.token_ids, "seconds": time.perf_counter() - t0}), flush=True)
    return 0


def alternating_systems(systems: dict, engine, contexts, repeats: int) -> dict[str, dict[int, float]]:
    """Time to first token of each system (a worker: ``EngineWorker`` or a peer's), the systems taking turns on
    each prompt, another prompt each round (machine drift hits all alike): {system: {tokens: median seconds}}."""
    out: dict[str, dict[int, float]] = {name: {} for name in systems}
    for n in contexts:
        times: dict[str, list[float]] = {name: [] for name in systems}
        for i in range(repeats + 1):  # the first round warms up
            ids = prompt_of(engine, n, i)
            for name, worker in systems.items():
                seconds = worker.run(ids, 0.0, 0, 1).seconds
                if i:
                    times[name].append(seconds)
        for name in systems:
            out[name][n] = statistics.median(times[name])
    return out


def report_alternating(ttft: dict[str, dict[int, float]], contexts, header: str, label, cell,
                       json_out: Path | None) -> int:
    """Print an alternating run's medians as a table (one row per system, one column per prompt length)."""
    print(f"| {header} | " + " | ".join(map(str, contexts)) + " |\n|---|" + "---:|" * len(contexts))
    for name, row in ttft.items():
        print(f"| {label(name)} | " + " | ".join(cell(row[n]) for n in contexts) + " |")
    if json_out:
        json_out.write_text(json.dumps(ttft, indent=1))
    return 0


def profile(path: Path, context: int, kernel: str = "auto") -> dict:
    """ms per operator type: a prefill chunk at ``context``, and a pass of each row count at ``context``."""
    from specrt.runtime import ort_backend
    from specrt.runtime.backend import PREFILL_CHUNK
    from specrt.runtime.manifest import load_manifest

    spec = load_manifest(path, check_hashes=False).target
    context = min(context, spec.kv.buffer_shape[2] - PREFILL_CHUNK - 1)
    out = {}
    for label, rows in [("prefill chunk", PREFILL_CHUNK)] + [(f"{r} rows", r) for r in ROWS]:
        original = ort_backend.session_options
        tmp = Path(tempfile.mkdtemp())

        def options(t, s=True, tmp=tmp, original=original):
            so = original(t, s)
            so.enable_profiling, so.profile_file_prefix = True, str(tmp / "p")
            return so
        ort_backend.session_options = options
        try:
            model = ort_backend.OrtModel(spec, attention_kernel=kernel)
            step = ort_backend.OrtModelStep(model)
        finally:
            ort_backend.session_options = original
        ids = (np.arange(context + rows) * 7919 % 5000 + 10).astype(np.int64)
        step.prefill(ids[:context])
        runs = 3
        for _ in range(runs):
            if rows == PREFILL_CHUNK:  # as a prompt's chunk runs: through the prefill graph where the engine uses one
                step.extend(ids[context:context + rows], context)
            else:
                step.forward(ids[context:context + rows], context)
            step.set_length(context)
        session = model.prefill_session if rows == PREFILL_CHUNK and model.prefill_session is not None \
            else step.session
        if session is not step.session:
            label = "prefill chunk (prefill graph)"
        events = json.loads(Path(session.end_profiling()).read_text())
        last = [e for e in events if e.get("name") == "model_run"][-runs:]
        lo, hi = last[0]["ts"], last[-1]["ts"] + last[-1]["dur"]
        per = collections.Counter()
        for e in events:
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and lo <= e["ts"] <= hi:
                per[e["args"].get("op_name", "?")] += e["dur"] / 1e3 / runs
        out[label] = {op: round(ms, 2) for op, ms in per.most_common(8)}
        out[label]["wall"] = round(statistics.median(e["dur"] for e in last) / 1e3, 2)
    return out


def peer_rows(python: str, script: str, setup: dict, what: str, engine, contexts, repeats: int) -> dict:
    from specrt.peers import Worker

    worker = Worker(python, script, setup, what, f"check the {what} Python and model folder")
    out = {"ttft": {}, "per_token_ms": {}}
    try:
        for n in contexts:
            ids = prompt_of(engine, n)
            worker.run(ids, 0.0, 0, 1)  # warm
            out["ttft"][n] = statistics.median(worker.run(prompt_of(engine, n, i), 0.0, 0, 1).seconds
                                               for i in range(1, repeats + 1))
            r = worker.run(prompt_of(engine, n, repeats + 1), 0.0, 0, 17)
            out["per_token_ms"][n] = max(0.0, (r.seconds - out["ttft"][n]) / max(1, len(r.token_ids) - 1)) * 1e3
    finally:
        worker.close()
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", type=Path, action="append", default=[], help="specrt engine directories")
    ap.add_argument("--genai-model", type=Path, default=None)
    ap.add_argument("--genai-python", default=None)
    ap.add_argument("--openvino-model", type=Path, default=None)
    ap.add_argument("--openvino-python", default=None)
    ap.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--prefill-graphs", default="auto",
                    help="for engines with a prefill graph: the --prefill-graph choices to measure, one row each "
                    "(e.g. on,off; default auto); the profile is of the target graph")
    ap.add_argument("--attention-kernels", default="auto",
                    help="the --attention-kernel choices to measure, one row each (e.g. flash,unfused; default auto)")
    ap.add_argument("--alternate-prefill-graph", type=Path, default=None, metavar="ENGINE",
                    help="only this: time to first token of an engine with a prefill graph, on and off, the two "
                    "taking turns on each prompt (--contexts, --repeats)")
    ap.add_argument("--alternate", "--alternate-attention", dest="alternate", type=Path, action="append",
                    default=[], metavar="ENGINE",
                    help="only this (repeatable): time to first token of each such engine with each "
                    "--attention-kernels choice (e.g. flash,unfused) and of the peers given, each in a process of "
                    "its own, taking turns on each prompt (--contexts, --repeats)")
    ap.add_argument("--engine-worker", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--json-out", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None, help="a PNG: time to first token and 5-row pass cost by context")
    a = ap.parse_args()
    from specrt.runtime import Engine
    from specrt.runtime.ort_backend import ATTENTION_KERNELS

    kernels = a.attention_kernels.split(",")
    if set(kernels) - set(ATTENTION_KERNELS):
        ap.error(f"--attention-kernels: choose among {', '.join(ATTENTION_KERNELS)}")
    if a.engine_worker:
        return serve_engine(a.engine_worker, a.attention_kernels)
    contexts = [int(c) for c in a.contexts.split(",")]
    if a.alternate:
        from specrt.peers import Worker

        systems = {f"specrt {path.name} ({k} attention)": EngineWorker(path, k) for path in a.alternate
                   for k in kernels}
        if a.openvino_model:
            systems[f"OpenVINO GenAI {a.openvino_model.name}"] = Worker(
                a.openvino_python or sys.executable, "openvino_worker.py",
                {"model": str(a.openvino_model.resolve()), "mode": "plain", "num_assistant_tokens": 4,
                 "max_ngram_size": 3, "draft": None}, "OpenVINO GenAI", "check --openvino-python and --openvino-model")
        if a.genai_model:
            systems[f"onnxruntime-genai {a.genai_model.name}"] = Worker(
                a.genai_python or sys.executable, "genai_worker.py", {"model": str(a.genai_model.resolve())},
                "onnxruntime-genai", "check --genai-python and --genai-model")
        try:
            ttft = alternating_systems(systems, Engine.load(a.alternate[0], check_invariance=False), contexts,
                                       a.repeats)
        finally:
            for worker in systems.values():
                worker.close()
        return report_alternating(ttft, contexts, "time to first token (s)", lambda name: name,
                                  lambda t: f"{t:.2f}", a.json_out)
    if a.alternate_prefill_graph:
        ttft = alternating_ttft(a.alternate_prefill_graph, contexts, a.repeats)
        return report_alternating(ttft, contexts, "prompt tokens", lambda choice: f"prefill graph {choice} (ms)",
                                  lambda t: f"{t * 1e3:,.0f}", a.json_out)
    results = {}
    from specrt.runtime.manifest import load_manifest

    for path in a.engine:
        choices = a.prefill_graphs.split(",") if load_manifest(path, check_hashes=False).target.prefill_graph \
            else ["auto"]
        for choice in choices:
            for kernel in kernels:
                name = f"specrt {path.name}" + (f" (prefill graph {choice})" if len(choices) > 1 else "") + \
                    (f" ({kernel} attention)" if len(kernels) > 1 else "")
                results[name] = specrt_rows(path, contexts, a.repeats, choice, kernel)
                if not a.no_profile and choice == choices[-1]:  # the profile is of the target graph: once a kernel
                    results[name]["profile_at_2048"] = profile(path, max(contexts), kernel)
    any_engine = Engine.load(a.engine[0], check_invariance=False)
    if a.genai_model:
        results[f"onnxruntime-genai {a.genai_model.name}"] = peer_rows(
            a.genai_python or sys.executable, "genai_worker.py", {"model": str(a.genai_model.resolve())},
            "onnxruntime-genai", any_engine, contexts, a.repeats)
    if a.openvino_model:
        results[f"OpenVINO GenAI {a.openvino_model.name}"] = peer_rows(
            a.openvino_python or sys.executable, "openvino_worker.py",
            {"model": str(a.openvino_model.resolve()), "mode": "plain", "num_assistant_tokens": 4,
             "max_ngram_size": 3, "draft": None}, "OpenVINO GenAI", any_engine, contexts, a.repeats)
    print("| system | " + " | ".join(f"TTFT {n}" for n in contexts) + " | "
          + " | ".join(f"{r}-row pass @{n}" for n in contexts for r in ROWS) + " |")
    for name, r in results.items():
        ttft = " | ".join(f"{r['ttft'].get(n, r['ttft'].get(min(r['ttft'], key=lambda m: abs(m - n)))):.2f} s"
                          for n in contexts)
        if "pass_ms" in r:
            passes = " | ".join(f"{r['pass_ms'][m][rows]:.1f}" for m in sorted(r["pass_ms"]) for rows in ROWS)
        else:
            passes = " | ".join(f"{r['per_token_ms'][n]:.1f} (per token)" if rows == 1 else "-"
                                for n in contexts for rows in ROWS)
        print(f"| {name} | {ttft} | {passes} |")
        for label, ops in r.get("profile_at_2048", {}).items():
            print(f"    {name}, {label}: {ops}")
    if a.json_out:
        a.json_out.write_text(json.dumps(results, indent=1))
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
        for name, r in results.items():
            xs = sorted(r["ttft"])
            left.plot(xs, [r["ttft"][x] for x in xs], marker="o", label=name)
            if "pass_ms" in r:
                xs = sorted(r["pass_ms"])
                right.plot(xs, [r["pass_ms"][x][5] for x in xs], marker="o", label=f"{name} (5 rows)")
            else:
                right.plot(contexts, [r["per_token_ms"][x] for x in contexts], marker="x", linestyle="--",
                           label=f"{name} (per token)")
        left.set(xlabel="prompt tokens", ylabel="time to first token (s)", title="time to first token")
        right.set(xlabel="context (tokens)", ylabel="ms", title="a verification pass / a decode step")
        left.legend(fontsize=7)
        right.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(a.plot, dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
