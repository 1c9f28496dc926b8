#!/usr/bin/env python
"""What OpenVINO's own stateful LLM model would give a speculative runtime: prefill, pass costs, row invariance
and the cost of a rollback, measured on the peers' OpenVINO int4 conversion of the demo verifier.

OpenVINO GenAI's speed on long prompts comes from this model form (attention fused with a KV cache kept inside
the model, in u8, computed in bf16 on CPUs with AVX-512 BF16), not from OpenVINO compiling a graph like ours
(`ort_openvino_ep.py`).  A specrt backend on it would need, per step:

* multi-row passes whose rows equal 1-row passes (else speculation changes the output): measured here, 1-row
  passes against one pass of the same rows, in the plugin's default precision and with an fp32 hint;
* the prompt's logits for its last row only (OpenVINO GenAI cuts the LM head the same way): prefill time with
  the LM head sliced to the last row;
* rollback of rejected drafts: a stateful model can only drop cache entries by reading every state and writing
  it back shorter (what OpenVINO GenAI's prompt lookup does), measured here per rollback.

Runs in the OpenVINO virtual environment of ``make peers-setup``:

    .cache/openvino-venv/bin/python benchmarks/openvino_stateful.py .cache/openvino/int4 --context 1024
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def last_row_logits(model):
    """Slice the LM head's input to the last row, as OpenVINO GenAI does before a prompt's prefill."""
    import openvino.opset13 as ops

    node = model.get_result().input_value(0).get_node()
    while node.get_type_name() != "MatMul":
        node = node.input_value(0).get_node()
    const = lambda v: ops.constant(np.array([v], np.int64))
    cut = ops.slice(node.input_value(0), const(-1), const(np.iinfo(np.int64).max), const(1), const(1))
    node.input(0).replace_source_output(cut.output(0))
    model.validate_nodes_and_infer_types()
    return model


class Stateful:
    def __init__(self, compiled):
        self.request = compiled.create_infer_request()

    def run(self, ids: np.ndarray, past: int) -> tuple[np.ndarray, float]:
        n = len(ids)
        t = time.perf_counter()
        self.request.infer({"input_ids": ids[None].astype(np.int64),
                            "attention_mask": np.ones((1, past + n), np.int64),
                            "position_ids": (past + np.arange(n, dtype=np.int64))[None],
                            "beam_idx": np.zeros(1, np.int32)})
        return self.request.get_tensor("logits").data.copy(), time.perf_counter() - t

    def save(self) -> list:
        return [(s, s.state.data.copy()) for s in self.request.query_state()]

    def restore(self, saved: list) -> None:
        import openvino as ov

        for state, data in saved:
            state.state = ov.Tensor(data.copy())

    def trim(self, drop: int) -> float:
        import openvino as ov

        t = time.perf_counter()
        for state in self.request.query_state():
            state.state = ov.Tensor(np.ascontiguousarray(state.state.data[:, :, :-drop]))
        return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path, help="an optimum-intel OpenVINO export (openvino_model.xml)")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--rows", default="1,5,9")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()

    import openvino as ov

    core = ov.Core()
    rng = np.random.default_rng(0)
    prompt = rng.integers(100, 40000, args.context)
    drafts = rng.integers(100, 40000, max(map(int, args.rows.split(","))))
    result: dict = {"model": str(args.model), "context": args.context, "openvino": ov.get_version()}
    for label, hint in (("default", {}), ("fp32 hint", {"INFERENCE_PRECISION_HINT": "f32"})):
        compiled = core.compile_model(args.model / "openvino_model.xml", "CPU",
                                      {"INFERENCE_NUM_THREADS": args.threads, **hint})
        r = {"precision": str(compiled.get_property("INFERENCE_PRECISION_HINT")),
             "kv_cache": str(compiled.get_property("KV_CACHE_PRECISION")), "rows_ms": {}}
        g = Stateful(compiled)
        g.run(prompt, 0)
        g.request.reset_state()
        _, r["prefill_all_logits_s"] = g.run(prompt, 0)
        saved = g.save()
        for rows in map(int, args.rows.split(",")):
            times = []
            for _ in range(args.repeats):
                g.restore(saved)
                times.append(g.run(drafts[:rows], args.context)[1])
            r["rows_ms"][rows] = round(1000 * float(np.median(times)), 1)
        n = max(r["rows_ms"])
        g.restore(saved)
        one = [g.run(drafts[i:i + 1], args.context + i)[0][0, -1] for i in range(n)]
        g.restore(saved)
        many = g.run(drafts[:n], args.context)[0][0]
        r["max_abs_diff_1row_vs_pass"] = float(max(np.abs(one[i] - many[i]).max() for i in range(n)))
        r["top_token_differs"] = sum(int(one[i].argmax() != many[i].argmax()) for i in range(n))
        trims = []
        for _ in range(args.repeats):
            g.restore(saved)
            trims.append(g.trim(3))
        r["trim_ms"] = round(1000 * float(np.median(trims)), 1)
        sliced = core.compile_model(last_row_logits(core.read_model(args.model / "openvino_model.xml")), "CPU",
                                    {"INFERENCE_NUM_THREADS": args.threads, **hint})
        s = Stateful(sliced)
        s.run(prompt, 0)
        s.request.reset_state()
        _, r["prefill_last_logits_s"] = s.run(prompt, 0)
        result[label] = r
        print(f"{label}: {r}", flush=True)
    print(f"\n{args.model}, ctx {args.context}, {args.threads} threads, OpenVINO {result['openvino']}")
    print("| precision | KV cache | prefill, last row's logits | prefill, every row's logits | "
          + " | ".join(f"{k}-row pass ms" for k in result["default"]["rows_ms"])
          + " | rows of one pass vs 1-row passes: max logit diff, top token differs | rollback of 3 |")
    print("|---|---|---:|---:|" + "---:|" * len(result["default"]["rows_ms"]) + "---:|---:|")
    for label in ("default", "fp32 hint"):
        r = result[label]
        print(f"| {r['precision']} | {r['kv_cache']} | {r['prefill_last_logits_s']:.2f} s | "
              f"{r['prefill_all_logits_s']:.2f} s | " + " | ".join(str(v) for v in r["rows_ms"].values())
              + f" | {r['max_abs_diff_1row_vs_pass']:.3g}, {r['top_token_differs']} of {max(r['rows_ms'])}"
              + f" | {r['trim_ms']} ms |")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
