#!/usr/bin/env python
"""One layer's attention for a few new rows (or a prefill chunk) over a long cache, several ways in ONNX Runtime on
the CPU: its fused GroupQueryAttention (unfused kernel, the cache written in place -- what every specrt in-place
graph runs), the same node over an int8 cache (ONNX Runtime's quantized-cache path: ``kv_cache_bit_width`` 8 with
per-tensor or per-channel scales), and an explicit form of ordinary nodes that another graph layout would allow.

The explicit form: the query heads of each KV head stacked into one matrix, ``FusedMatMul`` (transB, the scale
folded in) against the cached keys and, apart, against the new rows' keys (plus a bias: causal or a tree's),
``Concat``, ``Softmax``, ``Split``, and two ``MatMul``s with the values, summed.  It reads each KV head's cache once
for all its query heads and needs the valid cache entries as a contiguous tensor of their own, so a graph built on
it would need a cache layout whose valid prefix is contiguous per head (or a copy per pass) and the new keys and
values written outside the graph; rotary embedding is left out of every form here.

This measures what a redesign could buy before it is built (demo verifier shapes: 9 query heads, 3 KV heads of
64; 2 threads; median ms per layer; the forms alternate call by call).  One layer's cache stays in the CPU's caches
between calls here, which a 30-layer pass's does not: a 1-row pass over a long context is bound by memory in a
whole graph and by arithmetic here, so the smaller int8 cache's 1-row numbers are a lower bound on what it saves.

    python benchmarks/attention_forms.py --contexts 1024,2000 --rows 1,2,5,9
    python benchmarks/attention_forms.py --forms gqa,int8-tensor,int8-channel --contexts 768 --rows 1,5,9,256
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

NUM_HEADS, KV_HEADS, HEAD_DIM = 9, 3, 64
GROUP = NUM_HEADS // KV_HEADS
BUFFER = 2048  # GroupQueryAttention's cache buffer, as an engine allocates it


def session(nodes, inputs, outputs, initializers=(), threads: int = 2) -> ort.InferenceSession:
    graph = helper.make_graph(nodes, "attention", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.log_severity_level = threads, 3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


# ONNX Runtime's quantized-cache attributes for an int8 cache, and its scale's length: one, or one per channel
INT8_CACHES = {"int8-tensor": ("PER_TENSOR", 1), "int8-channel": ("PER_CHANNEL", KV_HEADS * HEAD_DIM)}


def fused(rows: int, past: int, rng: np.random.Generator, cache: str = "fp32"):
    """GroupQueryAttention over an in-place cache buffer (its unfused CPU kernel, as specrt's auto choice on AVX-512),
    fp32 or int8 (``INT8_CACHES``: scales as inputs, new rows quantized by the node as it writes them)."""
    os.environ["ORT_GQA_DISABLE_FLASH_ATTENTION"] = "1"  # read when the session is built
    vi = helper.make_tensor_value_info
    cache_type = TensorProto.FLOAT if cache == "fp32" else TensorProto.INT8
    inputs = ["qkv", "", "", "past_key", "past_value", "seqlens_k", "total"]
    declared = [vi("qkv", TensorProto.FLOAT, [1, rows, (NUM_HEADS + 2 * KV_HEADS) * HEAD_DIM]),
                vi("past_key", cache_type, [1, KV_HEADS, BUFFER, HEAD_DIM]),
                vi("past_value", cache_type, [1, KV_HEADS, BUFFER, HEAD_DIM]),
                vi("seqlens_k", TensorProto.INT32, [1]), vi("total", TensorProto.INT32, [])]
    attributes = {}
    if cache != "fp32":
        quant_type, scales = INT8_CACHES[cache]
        inputs += [""] * 5 + ["k_scale", "v_scale"]  # no rotary, position ids, bias, head sink or smooth softmax
        declared += [vi("k_scale", TensorProto.FLOAT, [scales]), vi("v_scale", TensorProto.FLOAT, [scales])]
        attributes = {"k_quant_type": quant_type, "v_quant_type": quant_type, "kv_cache_bit_width": 8}
    node = helper.make_node("GroupQueryAttention", inputs, ["out", "present_key", "present_value"],
                            domain="com.microsoft", num_heads=NUM_HEADS, kv_num_heads=KV_HEADS,
                            scale=HEAD_DIM ** -0.5, **attributes)
    s = session([node], declared, [vi("out", TensorProto.FLOAT, None), vi("present_key", cache_type, None),
                                   vi("present_value", cache_type, None)])
    binding = s.io_binding()
    for name in ("key", "value"):  # one buffer, read and written in place
        shape = (1, KV_HEADS, BUFFER, HEAD_DIM)
        values = rng.standard_normal(shape, np.float32) if cache == "fp32" else \
            rng.integers(-127, 128, shape, dtype=np.int8)
        buffer = ort.OrtValue.ortvalue_from_numpy(values)
        binding.bind_ortvalue_input(f"past_{name}", buffer)
        binding.bind_ortvalue_output(f"present_{name}", buffer)
        if cache != "fp32":
            binding.bind_cpu_input(f"{name[0]}_scale", np.full(INT8_CACHES[cache][1], 0.02, np.float32))
    binding.bind_cpu_input("qkv", rng.standard_normal((1, rows, (NUM_HEADS + 2 * KV_HEADS) * HEAD_DIM), np.float32))
    binding.bind_cpu_input("seqlens_k", np.array([past + rows - 1], np.int32))
    binding.bind_cpu_input("total", np.array(past + rows, np.int32))
    binding.bind_output("out")
    return lambda: s.run_with_iobinding(binding)


def explicit(rows: int, past: int, rng: np.random.Generator):
    """The explicit form over a contiguous [1, kv_heads, past, head_dim] cache and the new rows' keys and values."""
    scale = HEAD_DIM ** -0.5
    nodes = [helper.make_node("FusedMatMul", ["q", "k_past"], ["s_past"], domain="com.microsoft", transB=1, alpha=scale),
             helper.make_node("FusedMatMul", ["q", "k_new"], ["s_new_raw"], domain="com.microsoft", transB=1,
                              alpha=scale),
             helper.make_node("Add", ["s_new_raw", "bias"], ["s_new"]),
             helper.make_node("Concat", ["s_past", "s_new"], ["scores"], axis=-1),
             helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
             helper.make_node("Split", ["probs", "split"], ["p_past", "p_new"], axis=-1),
             helper.make_node("MatMul", ["p_past", "v_past"], ["o_past"]),
             helper.make_node("MatMul", ["p_new", "v_new"], ["o_new"]),
             helper.make_node("Add", ["o_past", "o_new"], ["out"])]
    shapes = {"q": (1, KV_HEADS, GROUP * rows, HEAD_DIM), "k_past": (1, KV_HEADS, past, HEAD_DIM),
              "v_past": (1, KV_HEADS, past, HEAD_DIM), "k_new": (1, KV_HEADS, rows, HEAD_DIM),
              "v_new": (1, KV_HEADS, rows, HEAD_DIM), "bias": (GROUP * rows, rows)}
    vi = helper.make_tensor_value_info
    s = session(nodes, [vi(n, TensorProto.FLOAT, list(shape)) for n, shape in shapes.items()],
                [vi("out", TensorProto.FLOAT, None)],
                [numpy_helper.from_array(np.array([past, rows], np.int64), "split")])
    binding = s.io_binding()
    for name, shape in shapes.items():
        value = np.zeros(shape, np.float32) if name == "bias" else rng.standard_normal(shape, np.float32)
        binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value))
    binding.bind_output("out")
    return lambda: s.run_with_iobinding(binding)


FORMS = {"gqa": fused, "explicit": explicit,
         **{name: (lambda rows, past, rng, name=name: fused(rows, past, rng, name)) for name in INT8_CACHES}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--contexts", default="1024,2000", help="cache entries before the new rows")
    ap.add_argument("--rows", default="1,2,5,9", help="new rows per pass (256: a prefill chunk)")
    ap.add_argument("--forms", default="gqa,explicit",
                    help=f"comma-separated, the first is the reference of the ratios: {', '.join(FORMS)}")
    ap.add_argument("--repeats", type=int, default=60)
    args = ap.parse_args()
    forms = args.forms.split(",")
    if unknown := [f for f in forms if f not in FORMS]:
        ap.error(f"unknown form(s) {', '.join(unknown)}; choose from {', '.join(FORMS)}")
    rng = np.random.default_rng(0)
    print("| cache entries | rows | " + " | ".join(f"{f} (ms)" for f in forms) + " | " +
          " | ".join(f"{f} / {forms[0]}" for f in forms[1:]) + " |")
    print("|---:|---:|" + "---:|" * (2 * len(forms) - 1))
    for past in (int(c) for c in args.contexts.split(",")):
        for rows in (int(r) for r in args.rows.split(",")):
            runs = {name: FORMS[name](rows, past, rng) for name in forms}
            times: dict[str, list[float]] = {name: [] for name in runs}
            for i in range(args.repeats + 5):  # the first five warm up
                for name, run in runs.items():
                    t0 = time.perf_counter()
                    run()
                    if i >= 5:
                        times[name].append(time.perf_counter() - t0)
            ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
            print(f"| {past:,} | {rows} | " + " | ".join(f"{ms[f]:.3f}" for f in forms) + " | " +
                  " | ".join(f"{ms[f] / ms[forms[0]]:.2f}" for f in forms[1:]) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
