#!/usr/bin/env python
"""Where a verification pass's time goes, by rows, for the fp32 and quantized targets -- and what the kernels
here offer instead.

1. ``profile``: ONNX Runtime's profiler, per operator, for passes of n = 1, 2, 3, 5, 9, 17 rows at contexts
   64 / 1000 / 2000: ms per pass in the transformer's MatMuls (MatMulNBits when quantized), the LM head,
   attention (GroupQueryAttention), norms and the rest, and the time outside the kernels (bindings, the
   logits copy).  The extra cost of each row beyond the first is the slope of those columns.
2. ``variants``: the same target quantized every way this ONNX Runtime offers -- MatMulNBits 4 and 8 bits,
   block sizes 32 / 64 / 128, accuracy levels 1 (fp32 compute) and 4 (int8 activations), with and without
   the LM head, and int8 dynamic quantization (MatMulInteger: integer GEMM, VNNI on this CPU) -- and thread
   settings: per variant the pass cost for 1..17 rows at context 200, row invariance (runtime/invariance.py),
   top-1 agreement with the fp32 target on a held-out text, and the expected speculative tokens/s of each
   measured acceptance (the speedup formula; the acceptance comes from the Spec-Bench run, --alpha).
3. ``limits``: this machine's memory bandwidth (a large copy) and int8 multiply-accumulate throughput
   (a MatMulInteger of the target's MLP shape, many rows), against what each variant reads and computes.

    python benchmarks/quant_profile.py profile .cache/demo/engine .cache/demo/engine-int4
    python benchmarks/quant_profile.py variants .cache/demo/engine --out .cache/quant --alpha 0.35,0.55
    python benchmarks/quant_profile.py limits .cache/demo/engine
"""
from __future__ import annotations

import argparse
import collections
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROWS = (1, 2, 3, 5, 9, 17)
HELD_OUT = ("The river rose slowly through the night, and by morning the lower streets of the town were under "
            "a hand's depth of brown water. Shopkeepers carried sacks of flour up to the first floors while the "
            "children watched from the bridge.\n\ndef parse_config(path):\n    with open(path) as f:\n"
            "        data = json.load(f)\n    return {k.lower(): v for k, v in data.items()}\n")


def step_for(spec, threads=2, spin=True, profile_prefix=None):
    """An OrtModelStep whose session may be profiling."""
    from specrt.runtime import ort_backend

    original = ort_backend.session_options

    def options(t, s=True):
        so = original(t, s)
        if profile_prefix:
            so.enable_profiling = True
            so.profile_file_prefix = str(profile_prefix)
        return so
    ort_backend.session_options = options
    try:
        return ort_backend.OrtModelStep(spec, threads=threads, spin=spin)
    finally:
        ort_backend.session_options = original


def timed_pass(step, ids, ctx, n, repeats=9):
    step.prefill(ids[:ctx])
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step.forward(ids[ctx:ctx + n], ctx)
        times.append(time.perf_counter() - t0)
        step.set_length(ctx)
    return statistics.median(times)


def categorize(event) -> str:
    op = event["args"].get("op_name", "")
    name = event["name"]
    if "lm_head" in name:
        return "lm_head"
    if op in ("MatMulNBits", "MatMul", "MatMulInteger", "DynamicQuantizeMatMul", "DynamicQuantizeLinear"):
        return "matmul"
    if op == "GroupQueryAttention":
        return "attention"
    if "LayerNormalization" in op:
        return "norm"
    return "other"


def cmd_profile(args) -> None:
    from specrt.runtime.manifest import load_manifest

    cats = ("matmul", "lm_head", "attention", "norm", "other", "outside")
    print("ms per pass, by operator category (ONNX Runtime profiler); 'outside' = wall time not in a kernel "
          "(bindings, output copies, scheduling)")
    print(f"{'engine':<22} {'ctx':>5} {'rows':>4} {'total':>7} " + " ".join(f"{c:>9}" for c in cats))
    for engine in args.engines:
        if (Path(engine) / "done").is_file():  # a variant directory of `variants`: the fp32 engine's tensors
            spec = spec_of(Path(engine), Path(args.fp32))
        else:
            spec = load_manifest(engine, check_hashes=False).target
        for ctx in args.contexts:
            for n in ROWS:
                if ctx + n > spec.kv.buffer_shape[2]:
                    continue
                tmp = Path(tempfile.mkdtemp())
                step = step_for(spec, profile_prefix=tmp / "p")
                ids = (np.arange(ctx + 32) * 7919 % min(5000, spec.vocab_size - 10) + 10).astype(np.int64)
                step.prefill(ids[:ctx])
                for _ in range(3):  # warm-up, profiled too: subtracted below by counting runs
                    step.forward(ids[ctx:ctx + n], ctx)
                    step.set_length(ctx)
                walls = []
                for _ in range(args.repeats):
                    t0 = time.perf_counter()
                    step.forward(ids[ctx:ctx + n], ctx)
                    walls.append(time.perf_counter() - t0)
                    step.set_length(ctx)
                events = json.loads(Path(step.session.end_profiling()).read_text())
                runs = [e for e in events if e.get("name") == "model_run"]
                nodes = [e for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
                # only the timed runs: the last `repeats` model_run windows
                timed_runs = runs[-args.repeats:]
                per = collections.Counter()
                for run in timed_runs:
                    start, end = run["ts"], run["ts"] + run["dur"]
                    for e in nodes:
                        if start <= e["ts"] <= end:
                            per[categorize(e)] += e["dur"] / 1e3
                k = len(timed_runs)
                wall = statistics.median(walls) * 1e3
                inside = sum(per.values()) / k
                row = {c: per[c] / k for c in cats[:-1]}
                row["outside"] = max(0.0, wall - inside)
                print(f"{Path(engine).name:<22} {ctx:>5} {n:>4} {wall:>7.2f} " + " ".join(f"{row[c]:>9.2f}" for c in cats),
                      flush=True)
                shutil.rmtree(tmp, ignore_errors=True)


def variant_specs(fp32_engine: Path, out: Path) -> list[tuple[str, Path]]:
    """Engine-like directories (manifest + quantized target) for every variant."""
    from specrt.export.quantize import quantize_file

    variants = [("int4 b32 acc4", ("int4", 32, 4, True)), ("int4 b64 acc4", ("int4", 64, 4, True)),
                ("int4 b128 acc4", ("int4", 128, 4, True)), ("int4 b32 acc1", ("int4", 32, 1, True)),
                ("int4 b32 acc4, fp32 LM head", ("int4", 32, 4, False)), ("int8 b32 acc4", ("int8", 32, 4, True)),
                ("int8 b128 acc4", ("int8", 128, 4, True)), ("int8 dynamic (MatMulInteger)", ("dynamic", 0, 0, True)),
                ("int8 rows (MatMulInteger, per-row)", ("int8-rows", 0, 0, True))]
    made = []
    for name, (quant, block, level, head) in variants:
        d = out / name.replace(" ", "_").replace(",", "").replace("(", "").replace(")", "")
        if not (d / "done").is_file():
            shutil.rmtree(d, ignore_errors=True)
            d.mkdir(parents=True)
            for f in ("target.onnx", "target.onnx.data", "manifest.json", "tokenizer.json"):
                if (fp32_engine / f).is_file():
                    shutil.copy(fp32_engine / f, d / f)
            if quant == "dynamic":
                quantize_dynamic(d / "target.onnx")
            else:
                quantize_file(d / "target.onnx", quant, block, level, lm_head=head)
            (d / "done").write_text("ok")
        made.append((name, d))
    return made


def quantize_dynamic(path: Path) -> None:
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as qd

    tmp = path.with_name("dyn.onnx")
    qd(str(path), str(tmp), weight_type=QuantType.QInt8, op_types_to_quantize=["MatMul"], per_channel=True,
       use_external_data_format=True,
       extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT})
    model = onnx.load(str(tmp))
    for f in (path, path.with_name(path.name + ".data")):
        f.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    for f in path.parent.glob("dyn.onnx*"):
        f.unlink()


def spec_of(d: Path, fp32_engine: Path):
    """The fp32 engine's target spec, pointed at this variant's file (same tensors, other weights)."""
    import dataclasses

    from specrt.runtime.manifest import load_manifest

    spec = load_manifest(fp32_engine, check_hashes=False).target
    return dataclasses.replace(spec, path=d / "target.onnx", raw={**spec.raw, "batch_invariance": None})


def agreement(step, ref_step, ids) -> float:
    out = []
    for s in (step, ref_step):
        s.set_length(0)
        logits = []
        for start in range(0, len(ids), 32):
            logits.append(s.forward(ids[start:start + 32], start).argmax(-1))
        out.append(np.concatenate(logits))
    return float((out[0] == out[1]).mean())


def cmd_variants(args) -> None:
    from specrt.runtime import invariance
    from specrt.runtime.policy import expected_tokens
    from specrt.runtime.text import TextCodec

    fp32 = Path(args.engine)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from specrt.runtime.manifest import load_manifest

    m = load_manifest(fp32, check_hashes=False)
    ref_spec = m.target
    codec = TextCodec(m.tokenizer_json, None, m.bos_token_id, m.eos_token_ids)
    text = np.array(codec.encode(HELD_OUT), dtype=np.int64)
    ids = (np.arange(args.context + 32) * 7919 % min(5000, m.target.vocab_size - 10) + 10).astype(np.int64)
    ref = step_for(ref_spec)
    rows = (1, 2, 3, 5, 9, 17)
    alphas = [float(a) for a in args.alpha.split(",")]
    print(f"target pass ms at context {args.context} (2 threads); agreement = top-1 with fp32 on {len(text)} held-out "
          "tokens; invariance: 1-token vs multi-token max logit diff -> rows every pass needs; expected tok/s of "
          f"chains with acceptance {alphas} at the best k (drafting cost 0: a context drafter)")
    print(f"{'variant':<32} " + " ".join(f"{f'n={n}':>7}" for n in rows) + f" {'5/1':>5} {'agree':>6} "
          f"{'min_rows':>8} " + " ".join(f"{f'a={a}':>9}" for a in alphas))
    results = {}
    for name, d in [("fp32", None)] + variant_specs(fp32, out):
        spec = ref_spec if d is None else spec_of(d, fp32)
        step = ref if d is None else step_for(spec)
        costs = {n: timed_pass(step, ids, args.context, n) for n in rows}
        inv = invariance.measure(step)
        agree = 1.0 if d is None else agreement(step, ref, text)
        pad = inv.min_rows or 0
        one = costs[2] if pad == 2 else costs[1]  # what a 1-token step costs as run
        speeds = []
        for a in alphas:
            best = max(((expected_tokens(a, k) / costs[min(k + 1, 17)] if k + 1 in costs else 0.0) for k in (1, 2, 4, 8, 16)),
                       default=0.0)
            speeds.append(max(best, 1.0 / one))
        results[name] = {"ms": {n: round(c * 1e3, 2) for n, c in costs.items()}, "agreement": agree,
                         "invariance": inv.as_dict(), "expected_tok_s": dict(zip(args.alpha.split(","), speeds))}
        print(f"{name:<32} " + " ".join(f"{costs[n] * 1e3:>7.2f}" for n in rows) +
              f" {costs[5] / costs[1]:>5.2f} {agree:>6.3f} {inv.min_rows!s:>8} " +
              " ".join(f"{s:>9.1f}" for s in speeds), flush=True)
    for threads, spin in ((1, True), (2, False)):
        step = step_for(ref_spec, threads=threads, spin=spin)
        costs = {n: timed_pass(step, ids, args.context, n) for n in (1, 5)}
        print(f"{f'fp32, {threads} thread(s), spin {spin}':<32} n=1 {costs[1] * 1e3:.2f} ms, n=5 {costs[5] * 1e3:.2f} ms")
    (out / "variants.json").write_text(json.dumps(results, indent=1))


def cmd_limits(args) -> None:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    a = np.ones(256 << 20 >> 3, dtype=np.float64)  # 256 MiB
    b = np.empty_like(a)
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - t0)
    copy_gbs = 2 * a.nbytes / min(times) / 1e9
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        float(a.sum())
        times.append(time.perf_counter() - t0)
    read_gbs = a.nbytes / min(times) / 1e9
    # int8 GEMM throughput: MatMulInteger of [rows, 576] x [576, 3072] (the target's packed gate|up), 2 threads
    K, N, R = 576, 3072, 2048
    w = np.random.default_rng(0).integers(-8, 8, (K, N)).astype(np.int8)
    g = helper.make_graph([helper.make_node("MatMulInteger", ["x", "w", "zp"], ["y"])], "g",
                          [helper.make_tensor_value_info("x", TensorProto.UINT8, [R, K])],
                          [helper.make_tensor_value_info("y", TensorProto.INT32, [R, N])],
                          [helper.make_tensor("w", TensorProto.INT8, [K, N], w.tobytes(), raw=True),
                           helper.make_tensor("zp", TensorProto.UINT8, [], [128])])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    path = Path(tempfile.mkdtemp()) / "mmi.onnx"
    onnx.save(model, str(path))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).integers(0, 255, (R, K)).astype(np.uint8)
    exact = np.array_equal(s.run(None, {"x": x})[0], (x.astype(np.int64) - 128) @ w.astype(np.int64))
    assert exact, "the integer GEMM's result is wrong: the throughput below would mean nothing"
    for _ in range(3):
        s.run(None, {"x": x})
    times = []
    for _ in range(10):
        t0 = time.perf_counter()
        s.run(None, {"x": x})
        times.append(time.perf_counter() - t0)
    gmacs = R * K * N / min(times) / 1e9
    print(f"memory: {read_gbs:.1f} GB/s read (sum), {copy_gbs:.1f} GB/s copy (read + write); int8 GEMM "
          f"(MatMulInteger {R}x{K}x{N}, 2 threads): {gmacs:.0f} GMAC/s")
    for engine in args.engines:
        from specrt.runtime.manifest import load_manifest

        m = load_manifest(engine, check_hashes=False)
        weight_bytes = sum(f.stat().st_size for f in Path(engine).glob("target.onnx*"))
        params = m.target.raw.get("num_parameters", 0)
        print(f"{Path(engine).name}: target weights {weight_bytes / 1e6:.0f} MB -> {1e3 * weight_bytes / (read_gbs * 1e9):.1f} ms "
              f"to stream once at {read_gbs:.1f} GB/s; {params / 1e6:.0f}M multiply-accumulates per row -> "
              f"{1e3 * params / (gmacs * 1e9):.2f} ms per row at {gmacs:.0f} GMAC/s (int8)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("profile")
    p.add_argument("engines", nargs="+")
    p.add_argument("--contexts", type=lambda t: [int(x) for x in t.split(",")], default=[64, 1000, 2000])
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--fp32", default=".cache/demo/engine", help="the fp32 engine (for variant directories)")
    v = sub.add_parser("variants")
    v.add_argument("engine", help="the fp32 engine directory (its target is quantized every way)")
    v.add_argument("--out", default=".cache/quant")
    v.add_argument("--context", type=int, default=200)
    v.add_argument("--alpha", default="0.35,0.55", help="acceptance rates to score the variants with")
    lim = sub.add_parser("limits")
    lim.add_argument("engines", nargs="*")
    args = ap.parse_args()
    {"profile": cmd_profile, "variants": cmd_variants, "limits": cmd_limits}[args.cmd](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
