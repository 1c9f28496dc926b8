#!/usr/bin/env python
"""ONNX Runtime's OpenVINO execution provider on a specrt target graph, beside ONNX Runtime's own CPU provider.

A second CPU backend is worth having only if it runs our graphs faster.  This measures, in one process and
alternating the two sessions, a prompt's prefill (chunks of 256 rows, as the engine prefills) and 1-/5-/9-row
passes at a given context, and how far the OpenVINO provider's logits are from the CPU provider's.

Both sessions here pass the KV caches as plain inputs and outputs (no in-place binding), because the OpenVINO
provider cannot share a buffer between a graph input and output; the engine's own ONNX Runtime backend binds
them in place and is faster still than the CPU column.

It needs ``onnxruntime-openvino`` (a whole ONNX Runtime build with the provider; it replaces ``onnxruntime``, so
give it its own virtual environment) -- the PyPI plugin ``onnxruntime-ep-openvino`` offers no device on a
non-Intel CPU.  That build reads ONNX IR version 13 at most (specrt writes 14); the graph is re-saved with
IR 10 into ``--work`` (its weights hard-linked, so ``--work`` must be on the engine's file system).

    python -m venv .cache/ort-ov-venv && .cache/ort-ov-venv/bin/pip install onnxruntime-openvino numpy onnx
    .cache/ort-ov-venv/bin/python benchmarks/ort_openvino_ep.py .cache/demo/engine-int4 --context 1024
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def ir10_copy(engine: Path, work: Path) -> Path:
    """The engine's target graph re-saved with IR version 10 beside a hard link to its weights."""
    import onnx

    work.mkdir(parents=True, exist_ok=True)
    for data in engine.glob("target.onnx.data"):
        link = work / data.name
        if link.exists() and not os.path.samefile(link, data):
            link.unlink()  # the engine was exported again since
        if not link.exists():
            os.link(data, link)
    model = onnx.load(engine / "target.onnx", load_external_data=False)
    model.ir_version = min(model.ir_version, 10)
    onnx.save(model, work / "target.onnx")
    return work / "target.onnx"


class Graph:
    """One session over the target graph with its own fp32 caches, fed as the engine feeds it (but not in place)."""

    def __init__(self, path: Path, providers: list, threads: int):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.log_severity_level = 3
        t = time.perf_counter()
        self.session = ort.InferenceSession(str(path), so, providers=providers)
        self.load_s = time.perf_counter() - t
        self.providers = self.session.get_providers()
        self.cache = {i.name: np.zeros(i.shape, np.float32) for i in self.session.get_inputs()
                      if i.name.startswith("cache_")}
        self.outputs = [o.name for o in self.session.get_outputs()]

    def run(self, ids: np.ndarray, past: int, prefill: bool) -> tuple[np.ndarray, float]:
        """One pass; a prefill chunk keeps its cache entries and, as the engine asks, only its last row's logits."""
        n = ids.shape[1]
        feed = {"input_ids": ids, "past_length": np.array([past], np.int64),
                "logits_from": np.array([n - 1 if prefill else 0], np.int64),
                "position_ids": (past + np.arange(n, dtype=np.int64))[None],
                "tree_bias": np.zeros((1, 1, n, n), np.float32), **self.cache}
        t = time.perf_counter()
        res = self.session.run(None, feed)
        dt = time.perf_counter() - t
        if prefill:
            for name, value in zip(self.outputs, res):
                if name.startswith("present_"):
                    self.cache["cache_" + name[len("present_"):]][...] = value
        return res[0], dt


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("engine", type=Path, help="an engine directory (its target.onnx is measured)")
    ap.add_argument("--context", type=int, default=1024, help="prompt tokens prefilled before the row passes")
    ap.add_argument("--rows", default="1,5,9")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", type=Path, default=Path(".cache/ovep"))
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()

    import onnxruntime as ort

    if "OpenVINOExecutionProvider" not in ort.get_available_providers():
        print("this onnxruntime has no OpenVINOExecutionProvider: run it with onnxruntime-openvino's Python "
              "(see --help)", file=sys.stderr)
        return 2
    try:
        path = ir10_copy(args.engine, args.work / args.engine.name)
    except OSError as exc:
        print(f"cannot prepare the IR 10 copy in {args.work} (it must be on the engine's file system): {exc}",
              file=sys.stderr)
        return 2
    openvino = ("OpenVINOExecutionProvider", {"device_type": "CPU", "num_of_threads": str(args.threads)})
    graphs = {"cpu": Graph(path, ["CPUExecutionProvider"], args.threads),
              "openvino": Graph(path, [openvino, "CPUExecutionProvider"], args.threads)}
    if graphs["openvino"].providers[0] != "OpenVINOExecutionProvider":
        print("the OpenVINO provider did not take the graph", file=sys.stderr)
        return 1
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 40000, (1, args.context)).astype(np.int64)
    result: dict = {"engine": str(args.engine), "context": args.context, "threads": args.threads,
                    "onnxruntime": ort.__version__}
    for name, g in graphs.items():
        prefill = 0.0
        for p in range(0, args.context, 256):
            try:
                _, dt = g.run(prompt[:, p:p + 256], p, prefill=True)
            except ort.capi.onnxruntime_pybind11_state.Fail as exc:  # OpenVINO compiles on the first run
                print(f"the {name} provider cannot run {args.engine}'s target graph: "
                      f"{str(exc).strip().splitlines()[0]}", file=sys.stderr)
                return 1
            prefill += dt
        result[name] = {"session_s": round(g.load_s, 2), "prefill_s": round(prefill, 3), "rows_ms": {}}
    logits = {}
    for rows in map(int, args.rows.split(",")):
        ids = rng.integers(100, 40000, (1, rows)).astype(np.int64)
        times: dict[str, list[float]] = {name: [] for name in graphs}
        for _ in range(args.repeats):
            for name, g in graphs.items():
                logits[name], dt = g.run(ids, args.context, prefill=False)
                times[name].append(dt)
        for name in graphs:
            result[name]["rows_ms"][rows] = round(1000 * float(np.median(times[name])), 1)
        result.setdefault("max_abs_logit_diff", {})[rows] = float(np.abs(logits["cpu"] - logits["openvino"]).max())
    print(f"{args.engine} ctx {args.context}, {args.threads} threads, onnxruntime {ort.__version__}")
    print(f"| provider | session load s | prefill {args.context} s | " +
          " | ".join(f"{r}-row pass ms" for r in result["cpu"]["rows_ms"]) + " |")
    print("|---|---:|---:|" + "---:|" * len(result["cpu"]["rows_ms"]))
    for name in graphs:
        r = result[name]
        print(f"| {name} | {r['session_s']} | {r['prefill_s']} | " +
              " | ".join(str(v) for v in r["rows_ms"].values()) + " |")
    print("max |logit difference| openvino vs cpu:", result["max_abs_logit_diff"])
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
