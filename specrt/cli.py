"""``specrt`` command line: export, generate, bench, info."""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
from pathlib import Path

from specrt import __version__
from specrt.runtime import request, tensorrt_lib
from specrt.runtime.backend import BACKENDS
from specrt.runtime.policy import POLICIES
from specrt.server import EXTRA as SERVER_EXTRA_FIELDS

EPILOG = """examples:
  specrt export --target ./SmolLM2-135M --draft ./draft --out ./engine
  specrt generate ./engine --prompt "def fib(n):" --k 4
  specrt generate ./engine --chat "What is a hash table?" --drafter ngram --json
  specrt serve ./engine --port 8000
  specrt bench ./engine --k 2,4,8 --json-out bench.json
  specrt bench ./engine --spec-bench question.jsonl --report reports/spec_bench.md
"""
# Where `specrt bench --peers` / `--spec-bench` write their report when --report is not given: a folder of its own
# under the current directory, one time-stamped file set per run, never loose files beside the user's own.
REPORT_DIR = Path("specrt-reports")


def _engine_plan(text: str) -> list[tuple[str, int]]:
    """'model,eagle@12' -> [("model", 0), ("eagle", 12)]; '-' -> [] (target-only alone)."""
    if text.strip() == "-":
        return []
    plan = []
    for item in (x.strip() for x in text.split(",")):
        name, _, nodes = item.partition("@")
        if not name or (nodes and not nodes.isdigit()):
            raise argparse.ArgumentTypeError(f"{item!r}: expected DRAFTER or DRAFTER@NODES, e.g. eagle@12")
        plan.append((name, int(nodes or 0)))
    return plan


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specrt", description="Speculative decoding runtime. A drafter proposes "
                                "tokens -- a draft model, a feature head reading the target's hidden states (EAGLE), "
                                "n-gram prompt lookup, a suffix cache, the target's own recycled predictions, or a "
                                "hybrid of these -- as a chain or a tree of candidates; the target (verification) "
                                "model checks them all in one pass. The output is exactly the target's own (greedy: "
                                "the same tokens; sampling: the same distribution).", epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"specrt {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("export", help="HuggingFace draft + target checkpoints -> engine directory (needs torch)",
                       description="Check that the two checkpoints tokenize identically, export both to ONNX with a "
                       "static KV cache, verify the ONNX logits against PyTorch, and write a self-describing engine "
                       "directory (manifest.json + ONNX files + tokenizer).")
    e.add_argument("--target", required=True, help="local checkpoint directory of the target (verification) model")
    e.add_argument("--draft", default=None,
                   help="local checkpoint directory of the draft model (same tokenizer); without it the engine is "
                   "target-only and drafts from the context and the target's own predictions (--drafter ngram | suffix | recycle | "
                   "ngram+recycle)")
    e.add_argument("--draft-head", type=Path, default=None,
                   help="a feature-level draft head trained on this target (scripts/train_head.py --export), instead "
                   "of --draft: the target graph also outputs the hidden states the head reads (--drafter eagle)")
    e.add_argument("--out", required=True, type=Path, help="engine directory to write")
    e.add_argument("--max-context", type=int, default=None,
                   help="prompt + generated tokens the KV caches hold (default: min(2048, model limit))")
    e.add_argument("--k", type=_ints, default=[1, 2, 4, 8], help="draft lengths to support (default 1,2,4,8)")
    e.add_argument("--force", action="store_true", help="replace --out if it exists and is not empty")
    e.add_argument("--no-verify", action="store_true", help="skip the ONNX-vs-PyTorch logits check")
    e.add_argument("--tolerance", type=float, default=None, help="max |logits diff| accepted by the check (2e-3)")
    quants = ("fp32", "int8-rows", "int4", "int8")
    e.add_argument("--quant", nargs="?", const="int8-rows", choices=quants, default="fp32",
                   help="quantize both models after the fp32 graphs are verified (the drift is measured and "
                   "recorded; a --draft-head is int4 unless --quant or --draft-quant quantizes it otherwise). "
                   "--quant alone = int8-rows: 7-bit weights and int8 activations per row on an integer "
                   "GEMM -- multi-row passes row-invariant, extra verification rows nearly free (measured: the best "
                   "expected speculative tokens/s, docs/quantization.md); int4 / int8: ONNX Runtime's "
                   "MatMulNBits (weight-only, blockwise)")
    e.add_argument("--target-quant", choices=quants, default=None, help="override --quant for the target")
    e.add_argument("--draft-quant", choices=quants, default=None,
                   help="override --quant for the draft (default: --quant; a --draft-head with --quant fp32: int4 -- "
                   "a draft's weights change only what is proposed, never the output, and the head's are read on "
                   "every pass)")
    e.add_argument("--block-size", type=int, default=32, help="int4/int8 quantization block size (default 32)")
    e.add_argument("--accuracy-level", type=int, default=4, choices=(0, 1, 2, 3, 4),
                   help="the target's MatMulNBits compute: 4 = int8 activations (default, ~3x faster on CPU; "
                   "its 1-token passes differ from multi-token passes, which export and load measure, and "
                   "1-token target steps are then run as 2-token passes so speculation stays lossless); "
                   "1 = fp32 compute (no padding needed, slower)")
    e.add_argument("--draft-accuracy-level", type=int, default=4, choices=(0, 1, 2, 3, 4),
                   help="the draft's MatMulNBits compute (default 4 = int8 activations: the draft's numerics change "
                   "only the acceptance, never the output)")
    e.add_argument("--attention", choices=("auto", "gqa", "concat", "bucketed"), default="auto",
                   help="graph builder: gqa = ONNX Runtime GroupQueryAttention writing the KV cache in place (Llama, "
                   "Mistral, Qwen2; no KV copies); concat = optimum's export (any architecture it supports; slices "
                   "and concatenates the cache every step); bucketed = concat reading whole context buckets, masked, so "
                   "shapes are fixed per bucket (for TensorRT + CUDA graphs); auto (default) = gqa where the "
                   "checkpoint allows")
    e.add_argument("--prefill-quant", choices=("int8-rows", "level1"), default="int8-rows",
                   help="an int4 target at accuracy level 4 also gets target.prefill.onnx, which the runtime prefills "
                   "prompts through on CPUs where that is faster (`--prefill-graph` of generate/bench/serve): "
                   "int8-rows (default) = the checkpoint quantized int8-rows in weights of its own (the demo target: "
                   "+135 MB; the embedding table is read from the target's file; integer GEMM, which runs on AMX: a "
                   "1,024-token prompt's first token in 0.83 s against 1.53 s for level1 on a Xeon with AMX); level1 = "
                   "the target's own weights file at fp32 compute (~100 KB; faster than int8 activations on CPUs "
                   "without VNNI)")
    e.add_argument("--no-prefill-graph", action="store_true",
                   help="leave target.prefill.onnx out (smaller engine; every prefill runs through the target graph)")
    e.add_argument("--datastore", type=Path, default=None, metavar="FILE",
                   help="a .npz from scripts/build_datastore.py (the target's own answers as a continuation table), "
                   "checked and copied into the engine: its suffix drafter drafts from it, and suffix becomes the "
                   "default drafter where it would be ngram (measured: +6%% tok/s on the int8-rows demo target)")
    e.add_argument("--batch", action="store_true",
                   help="also write target-batch.onnx, the target with one cache slot per sequence, quantized like "
                   "the target and checked against it: `specrt serve --max-batch` decodes several requests in one "
                   "pass with it (gqa targets)")

    bench_outputs = (" Output: the plain bench prints its table and writes only --json-out; --peers and "
                     "--spec-bench print theirs and write a report, REPORT.md with REPORT.json (the rows) and "
                     f"REPORT.png (the chart) beside it, at --report (default: {REPORT_DIR}/peers-DATE-TIME.md or "
                     f"{REPORT_DIR}/spec_bench-DATE-TIME.md under the current directory).")
    for name, helptext in (("generate", "generate text with speculative decoding"),
                           ("bench", "target-only vs speculative tokens/s, side by side")):
        g = sub.add_parser(name, help=helptext, description=helptext + ("." + bench_outputs if name == "bench" else ""))
        g.add_argument("engine", type=Path, help="engine directory (from `specrt export`)")
        g.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                       help="onnxruntime (the CPU; default) or tensorrt (the engine's plans from `specrt build`, on an "
                       "NVIDIA GPU)")
        g.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: all cores, max 8)")
        g.add_argument("--draft-threads", type=int, default=None, help="threads for the draft (default 1)")
        g.add_argument("--no-spin", action="store_true",
                       help="idle ONNX Runtime threads sleep instead of busy-waiting between runs")
        _datastore_arguments(g)
        _ort_session_arguments(g)
        if name == "generate":
            src = g.add_mutually_exclusive_group(required=True)
            src.add_argument("--prompt", help="prompt text")
            src.add_argument("--prompt-ids", type=_ints, help="prompt token ids, comma-separated")
            src.add_argument("--chat", help="a user message, rendered with the model's chat template")
            request.add_arguments(g)  # one flag per request field, from runtime/request.py
            g.add_argument("--num-samples", type=int, default=1,
                           help="draw N independent samples (seeds seed..seed+N-1); with --json one object per line")
            g.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
            g.add_argument("--trace", type=Path, default=None,
                           help="append a JSON Lines trace (header, one record per step, summary) to this file; "
                           "analyze it with `specrt trace analyze`")
        else:
            g.add_argument("--max-new-tokens", type=int, default=64)
            g.add_argument("--k", type=_ints, default=None, help="k values to compare (default: the engine's, >1)")
            g.add_argument("--prompts", type=Path, default=None,
                           help='JSON list of {"name", "prompt" | "chat" | "prompt_ids"} (default: a code and a chat prompt)')
            g.add_argument("--repeats", type=int, default=3)
            g.add_argument("--policies", action="store_true",
                           help="compare the policies (fixed, confidence, adaptive, budget), greedy and at T=0.8")
            g.add_argument("--relaxed", type=lambda t: [float(x) for x in t.split(",")], default=None,
                           metavar="TAUS", help="also measure LOSSY relaxed acceptance at these thresholds, e.g. 0.1,0.3")
            g.add_argument("--json-out", type=Path, default=None,
                           help="the plain bench: also write the rows as JSON to this file (nothing is written "
                           "without it; --peers and --spec-bench write --report instead)")
            peers = g.add_argument_group(
                "peers", "--peers: specrt beside transformers generate()/assisted generation and onnxruntime-genai on "
                "the same checkpoint and prompts, in one run (see docs/usage.md, 'Bench')")
            peers.add_argument("--peers", action="store_true",
                               help="run the peer comparison (k = the first --k value, default 2) and write a report")
            peers.add_argument("--also-engine", type=Path, action="append", default=[],
                               help="another engine directory of the same pair (e.g. its int4 export); repeatable")
            peers.add_argument("--hf-target", type=Path, default=None,
                               help="HuggingFace checkpoint of the target, for the transformers rows (needs torch)")
            peers.add_argument("--hf-draft", type=Path, default=None,
                               help="HuggingFace checkpoint of the draft, for transformers' assisted generation")
            peers.add_argument("--genai-model", type=Path, action="append", default=[],
                               help="a model directory built by onnxruntime-genai's model builder; repeatable")
            peers.add_argument("--genai-python", default=None,
                               help="the Python that has onnxruntime-genai installed (default: this one)")
            peers.add_argument("--temperatures", type=lambda t: [float(x) for x in t.split(",")], default=[0.0, 0.8],
                               help="temperatures to measure (default 0,0.8)")
            peers.add_argument("--openvino-model", type=Path, action="append", default=[],
                               help="an OpenVINO IR folder (optimum-cli export openvino) of the target: OpenVINO GenAI "
                               "plain decoding and its prompt lookup; repeatable")
            peers.add_argument("--openvino-draft", type=Path, default=None,
                               help="an OpenVINO IR folder of the draft: adds OpenVINO GenAI's draft-model speculation")
            peers.add_argument("--openvino-python", default=None,
                               help="the Python that has openvino-genai installed (default: this one)")
            peers.add_argument("--report", type=Path, default=None, metavar="REPORT.md",
                               help="--peers / --spec-bench: the markdown report to write, with the rows as .json "
                               "and a .png chart beside it (folders are created; an existing folder gets the default "
                               f"name inside). Default: {REPORT_DIR}/peers-DATE-TIME.md or "
                               f"{REPORT_DIR}/spec_bench-DATE-TIME.md under the current directory")
            sb = g.add_argument_group(
                "spec-bench", "--spec-bench FILE: Spec-Bench questions through the chat template, per category, every "
                "system (specrt drafters on this engine and --also-engine, and the peers above) side by side in one run")
            sb.add_argument("--spec-bench", type=Path, default=None, metavar="FILE",
                            help="Spec-Bench question.jsonl (e.g. ../shared/benchmarks/spec_bench/dev.jsonl)")
            sb.add_argument("--drafters", type=lambda t: [x for x in t.split(",") if x], default=None,
                            help="drafters to run, comma-separated (Spec-Bench and --peers: default all the engine can "
                            "run; the plain bench: default the engine's default drafter)")
            sb.add_argument("--policy", choices=POLICIES, default="fixed",
                            help="the policy of every speculative row (default fixed)")
            sb.add_argument("--limit", type=int, default=None, help="only the first N questions")
            sb.add_argument("--tree-nodes", type=lambda t: [int(x) for x in t.split(",")], default=[0],
                            help="tree sizes to run every drafter with, comma-separated (0 = chains; default 0)")
            sb.add_argument("--engine-drafters", type=_engine_plan, action="append", default=[], metavar="PLAN",
                            help="repeatable, in engine order (ENGINE, then each --also-engine): the speculative rows "
                            "to run on that engine, comma-separated DRAFTER or DRAFTER@NODES (a tree of NODES "
                            "candidates), or '-' for target-only alone; overrides --drafters and --tree-nodes there. "
                            "e.g. --engine-drafters model,ngram,suffix --engine-drafters eagle,eagle@12")

    b = sub.add_parser(
        "build", help="build TensorRT plans for an engine directory (TensorRT-RTX builds with no GPU)",
        description="Build a TensorRT plan per model of an engine directory, one static optimization profile per "
        "stage (draft decode, every k+1 verification width, dynamic prefill), and record them in its manifest. "
        "Uses NVIDIA TensorRT when it imports, TensorRT for RTX otherwise (pip install 'specrt[tensorrt]'): "
        "TensorRT-RTX builds ahead of time without a GPU, for the compute capabilities asked. Needs a concat or "
        "bucketed export (specrt export --attention concat|bucketed). Running a plan needs an NVIDIA GPU; no plan "
        "built by specrt has run on one yet (docs/gpu.md).")
    b.add_argument("engine", type=Path)
    b.add_argument("--compute-capability", type=lambda t: [x.strip() for x in t.split(",") if x.strip()],
                   default=None, metavar="CC[,CC...]",
                   help="TensorRT-RTX: the GPUs to build for, e.g. 8.6,12.0 (default: this machine's GPU, else "
                   f"{','.join(tensorrt_lib.RTX_PORTABLE)}: NVIDIA's portable set, whose plans also run on later "
                   "GPUs). TensorRT 10 builds for this machine's GPU only")
    b.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="fp32 (default). TensorRT 10 lowers an fp32 graph with its builder flags; TensorRT-RTX "
                   "networks are strongly typed and build the graph's own precision only")
    b.add_argument("--flavour", choices=("tensorrt", "tensorrt-rtx"), default=None,
                   help="which TensorRT to build with (default: tensorrt if it imports, else tensorrt-rtx)")
    b.add_argument("--timing-cache", type=Path, default=None,
                   help="reuse/update this timing cache (only with a GPU to time on; default: beside the plans)")
    b.add_argument("--lean", action="store_true",
                   help="no 1-row profile for the target: TensorRT stores the weights a second time, in another "
                   "layout, for a 1-row profile, so this halves the target's plan (measured: demo target 1.0 GB -> "
                   "0.58 GB); its 1-row passes then run under the prefill profile")
    b.add_argument("--force", action="store_true", help="rebuild existing plans")

    s = sub.add_parser(
        "serve", help="an OpenAI-compatible HTTP server over an engine directory (needs specrt[serve])",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="POST /v1/chat/completions and /v1/completions (stream: true for server-sent events), GET "
        "/v1/models, /health, /metrics (Prometheus).  N engines share one copy of the weights and run N generations "
        "at once; more requests wait in a bounded queue, beyond which they get 429 with Retry-After.",
        epilog="request fields: OpenAI's (model, messages | prompt, max_tokens, temperature [default 1], top_p, seed, "
        "stop, n, stream, stream_options.include_usage), and specrt's own:\n" + "\n".join(
            f"  {name:<10} {what}" for name, what in SERVER_EXTRA_FIELDS.items()) + "\n\nexample:\n  specrt serve ./engine --engines 2 && "
        "curl http://127.0.0.1:8000/v1/chat/completions -d '{\"messages\": [{\"role\": \"user\", \"content\": "
        "\"Hi\"}], \"temperature\": 0}'")
    s.add_argument("engine", type=Path, help="engine directory (from `specrt export`)")
    s.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--engines", type=int, default=1,
                   help="concurrent generations, each running passes of its own; they share one copy of the weights "
                   "(default 1; with --max-batch the batch's slots are the concurrent generations)")
    s.add_argument("--max-batch", type=int, default=None,
                   help="sequences whose one-token steps share each target pass (an engine exported with --batch); "
                   "each still speculates alone when that yields more tokens per second. Default: 4 per core, at "
                   "most 16, on engines with a batch graph and float activations; 1 otherwise (an int8-rows target "
                   "scores a batched row differently from the same row alone, so it does not batch)")
    s.add_argument("--max-queue", type=int, default=16,
                   help="requests that may wait for an engine; more get 429 + Retry-After (default 16)")
    s.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every /v1 request")
    s.add_argument("--timeout", type=float, default=600.0, help="seconds a request may wait + run (default 600)")
    s.add_argument("--max-body-bytes", type=int, default=4 << 20, help="larger request bodies get 413 (default 4 MiB)")
    s.add_argument("--model-name", default=None, help="the model id clients use (default: the directory's name)")
    s.add_argument("--backend", choices=BACKENDS, default="onnxruntime",
                   help="onnxruntime (the CPU; default) or tensorrt (the engine's plans, on an NVIDIA GPU)")
    s.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads for the target")
    _datastore_arguments(s)
    _ort_session_arguments(s)
    s.add_argument("--ray", action="store_true",
                   help="serve through Ray Serve instead (one engine per replica; needs ray[serve]; see docs/serving.md)")
    s.add_argument("--replicas", default="1",
                   help="with --ray: a number of replicas, or MIN:MAX to autoscale between (default 1)")

    i = sub.add_parser("info", help="validate an engine directory and summarise its manifest")
    i.add_argument("engine", type=Path)

    t = sub.add_parser("trace", help="analyze a trace written with --trace",
                       description="Acceptance overall and by draft position, tokens per target pass, the time "
                       "split, predicted vs achieved speedup, and a diagnosis naming the bottleneck and its fix.")
    tsub = t.add_subparsers(dest="trace_command", required=True)
    ta = tsub.add_parser("analyze", help="summarise a trace and name the bottleneck")
    ta.add_argument("file", type=Path)
    ta.add_argument("--plot", type=Path, default=None, help="write a PNG (needs matplotlib)")
    ta.add_argument("--json", action="store_true", help="print the analysis as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from specrt.runtime.errors import SpecrtError

    try:
        return {"export": _export, "generate": _generate, "bench": _bench, "info": _info,
                "trace": _trace, "build": _build, "serve": _serve}[args.command](args)
    except (SpecrtError, ValueError, RuntimeError, OSError) as e:
        print(f"specrt {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 -- a bug of ours: one line for the user, the traceback on request
        print(f"specrt {args.command}: internal error: {type(e).__name__}: {e}. This is a bug in specrt; rerun "
              "with -v for the traceback and please report it.", file=sys.stderr)
        if args.verbose:
            import traceback

            traceback.print_exc()
        return 3


def _export(args) -> int:
    try:
        from specrt.export import export_pair
        from specrt.export.pair import DEFAULT_TOLERANCE
    except ImportError as e:
        print(f"specrt export: error: {e}. Export needs the build-time extras: pip install 'specrt[export]'",
              file=sys.stderr)
        return 2
    report = export_pair(args.target, args.draft, args.out, max_context=args.max_context, k_values=args.k,
                         force=args.force, verify=not args.no_verify, tolerance=args.tolerance or DEFAULT_TOLERANCE,
                         quant=args.quant, target_quant=args.target_quant, draft_quant=args.draft_quant,
                         block_size=args.block_size, accuracy_level=args.accuracy_level,
                         draft_accuracy_level=args.draft_accuracy_level, attention=args.attention,
                         draft_head=args.draft_head, batch=args.batch,
                         prefill_graph=None if args.no_prefill_graph else args.prefill_quant,
                         datastore=args.datastore)
    for role, diffs in report.max_abs_diff.items():
        shown = ", ".join(f"{k} {v:.1e}" for k, v in diffs.items() if not k.endswith("argmax_equal"))
        same = ", ".join(f"{k.removesuffix('_argmax_equal')} {v:.1%}" for k, v in diffs.items()
                         if k.endswith("argmax_equal") and v < 1)
        print(f"{role}: max |ONNX - PyTorch| logits: {shown}" + (f"; same first choice: {same}" if same else ""))
    for role, d in report.text_drift.items():
        print(f"{role} quantized, on {d['tokens']} held-out tokens: top-1 agreement with fp32 "
              f"{d['top1_agreement']:.1%}, perplexity {d['perplexity_quantized']:.2f} (fp32 {d['perplexity_fp32']:.2f})")
    if args.draft_head is not None and args.draft_quant is None and args.quant == "fp32":
        print("draft head quantized to int4 (the default with --quant fp32: it changes only what is proposed; "
              "--draft-quant fp32 keeps it fp32)")
    print(f"wrote {report.out}")
    return 0


def _ort_session_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prefill-graph", choices=("auto", "on", "off"), default="auto",
                        help="run prompts' prefill through the target's prefill graph (int4 engines: the checkpoint "
                        "at int8-rows, or the same int4 weights at fp32 compute; faster on long prompts where "
                        "measured); auto (default) decides by the CPU and the graph, see `specrt info`")
    parser.add_argument("--attention-kernel", choices=("auto", "flash", "unfused"), default="auto",
                        help="ONNX Runtime's GroupQueryAttention kernel for the target: flash (its default) or "
                        "unfused (faster prefill of long prompts where measured: x86 with AVX-512); auto (default) "
                        "decides by the CPU, see `specrt info`")


def _datastore_arguments(parser) -> None:
    """--datastore FILE | --no-datastore (generate, bench, serve): Engine.load's ``datastore``."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--datastore", type=Path, default=None, metavar="FILE",
                       help="a .npz from scripts/build_datastore.py: the suffix drafter also drafts from it "
                       "(default: the engine's own, if it ships one)")
    group.add_argument("--no-datastore", action="store_true",
                       help="leave the engine's own datastore unused (its default drafter is then ngram again)")


def _datastore(args) -> str | bool | None:
    """What those options ask of Engine.load: False (none), a file, or None (the engine's own, if any)."""
    return False if args.no_datastore else (str(args.datastore) if args.datastore else None)


def _generate(args) -> int:
    from specrt.runtime import Engine, GenerationError

    engine = Engine.load(args.engine, backend=args.backend, threads=args.threads, draft_threads=args.draft_threads,
                         spin=not args.no_spin, datastore=_datastore(args),
                         prefill_graph=args.prefill_graph,
                         attention_kernel=args.attention_kernel)
    prompt = (args.prompt_ids if args.prompt_ids is not None else
              engine.chat_prompt([{"role": "user", "content": args.chat}]) if args.chat is not None else args.prompt)
    drafter = request.from_arguments(args).get("drafter") or engine.default_drafter
    if args.datastore is not None and drafter != "suffix":
        print(f"specrt generate: warning: --datastore is read by the suffix drafter only; this run drafts with "
              f"{drafter!r} (add --drafter suffix)", file=sys.stderr)
    from specrt.runtime.request import MAX_SAMPLES

    if not 1 <= args.num_samples <= MAX_SAMPLES:
        raise GenerationError(f"--num-samples must be in [1, {MAX_SAMPLES}], got {args.num_samples}")
    for i in range(args.num_samples):
        seed = None if args.seed is None else args.seed + i
        if seed is None and args.num_samples > 1:
            seed = i  # independent, and reproducible
        stream = engine.stream(prompt, trace=args.trace, **{**request.from_arguments(args), "seed": seed})
        if not args.json and args.num_samples > 1:
            print(f"--- sample {i + 1}/{args.num_samples} (seed {seed}) ---")
        for chunk in stream:
            if not args.json:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
        r = stream.result
        if args.json:
            d = r.as_dict()
            keys = ("new_tokens", "steps", "proposed", "accepted", "acceptance_rate", "tokens_per_step", "draft_s",
                    "verify_s", "total_s", "tokens_per_s", "prefill_s", "other_s", "recovered", "bonus",
                    "stop_reason", "policy", "drafter", "acceptance", "accept_tau", "lossless")
            d["stats"] = {k: d["stats"][k] for k in keys}
            print(json.dumps(d), flush=True)
        else:
            s = r.stats
            lossy = "" if s.lossless else f", LOSSY relaxed acceptance tau={s.accept_tau}"
            print(f"\n\n[{s.new_tokens} tokens, {s.tokens_per_s:.1f} tok/s, {s.steps} target passes, "
                  f"acceptance {s.acceptance_rate:.2f}, stop: {s.stop_reason}{lossy}]", file=sys.stderr)
    return 0


def _bench(args) -> int:
    from specrt.bench import (
        DEFAULT_PROMPTS,
        bench,
        fixed_configs,
        format_table,
        policy_configs,
        relaxed_configs,
    )
    from specrt.runtime import Engine

    # where the results go, settled (and its folder made) before any engine loads: a bad path fails now, not after
    # an hour of benchmarking
    if args.spec_bench and args.peers:
        raise ValueError("--peers and --spec-bench are two different runs: give one of them")
    if args.spec_bench or args.peers:
        if args.json_out:
            raise ValueError("--json-out is for the plain bench: --peers and --spec-bench write their rows to "
                             "REPORT.json beside --report REPORT.md")
        args.report = _report_path(args.report, "spec_bench" if args.spec_bench else "peers")
    elif args.report:
        raise ValueError("--report is for --peers and --spec-bench: the plain bench prints its table and writes "
                         "its rows with --json-out FILE")
    elif args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
    engine = Engine.load(args.engine, backend=args.backend, threads=args.threads, draft_threads=args.draft_threads,
                         spin=not args.no_spin, datastore=_datastore(args),
                         prefill_graph=args.prefill_graph,
                         attention_kernel=args.attention_kernel)
    prompts = json.loads(args.prompts.read_text()) if args.prompts else DEFAULT_PROMPTS
    if engine.manifest.chat_template is None:
        prompts = [p for p in prompts if "chat" not in p]
    if args.spec_bench:
        return _bench_spec(args, engine)
    if args.peers:
        return _bench_peers(args, engine, prompts)
    ks = args.k or [k for k in engine.manifest.k_values if k > 1] or list(engine.manifest.k_values)
    k_mid = 4 if 4 in engine.manifest.k_values else ks[len(ks) // 2]
    configs = policy_configs(ks, k_mid) if args.policies else fixed_configs(ks)
    if args.relaxed:
        configs += relaxed_configs(args.relaxed, k_mid)
    if args.drafters:  # speculative rows once per drafter named; target-only rows once
        configs = [c for c in configs if c.k is None] + [
            dataclasses.replace(c, drafter=d, label=c.label if len(args.drafters) == 1 else f"{c.label} [{d}]")
            for d in args.drafters for c in configs if c.k is not None]
    rows = bench(engine, prompts, configs, max_new_tokens=args.max_new_tokens, repeats=args.repeats)
    print(format_table(rows))
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=1))
        print(f"\nwrote {args.json_out}")
    return 0


def _report_path(report: Path | None, kind: str) -> Path:
    """--report as given, or REPORT_DIR/<kind>-<date>-<time>.md (an existing folder gets that name inside); its
    folder is created here."""
    name = f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}.md"
    path = REPORT_DIR / name if report is None else report / name if report.is_dir() else report
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _bench_spec(args, engine) -> int:
    from specrt import peers, spec_bench
    from specrt.runtime import Engine, GenerationError

    questions = spec_bench.load_questions(args.spec_bench)[: args.limit]
    if engine.manifest.chat_template is None:
        raise GenerationError("Spec-Bench goes through the chat template and this engine has none")
    ks = args.k or [4]
    engines = [(engine, peers.engine_label(engine))]
    for path in args.also_engine:
        other = Engine.load(path, backend=args.backend, threads=args.threads, draft_threads=args.draft_threads,
                            spin=not args.no_spin, prefill_graph=args.prefill_graph,
                            attention_kernel=args.attention_kernel)
        label = peers.engine_label(other)
        engines.append((other, label if label not in {lb for _, lb in engines} else f"{label} {path.name}"))
    if len(args.engine_drafters) > len(engines):
        raise GenerationError(f"--engine-drafters given {len(args.engine_drafters)} times for {len(engines)} engine(s)")
    systems = []
    for i, (e, label) in enumerate(engines):
        plan = args.engine_drafters[i] if i < len(args.engine_drafters) else None
        for drafter, nodes in plan or []:
            if drafter not in e.drafters:
                raise GenerationError(f"--engine-drafters: engine {i} ({label}) cannot run drafter {drafter!r}; "
                                      f"it can run {', '.join(e.drafters)}")
            if nodes and not e.trees_lossless:
                raise GenerationError(f"--engine-drafters: engine {i} ({label}) verifies chains only: "
                                      f"{e.chains_only_reason}")
        drafters = [d for d in (args.drafters or e.drafters) if d in e.drafters]
        systems += peers.specrt_systems(e, ks, args.max_new_tokens, label, drafters=drafters, policy=args.policy,
                                        tree_nodes=args.tree_nodes if e.trees_lossless else [0], plan=plan)
    if args.hf_target:
        systems += peers.transformers_systems(args.hf_target, args.hf_draft, ks[0], args.max_new_tokens,
                                              sorted(engine.manifest.eos_token_ids), args.threads or 2)
    for model_dir in args.genai_model:
        systems.append(peers.genai_system(args.genai_python or sys.executable, model_dir,
                                          engine.manifest.target.vocab_size, args.max_new_tokens))
    for model_dir in args.openvino_model:
        systems += peers.openvino_systems(args.openvino_python or sys.executable, model_dir, args.max_new_tokens,
                                          args.openvino_draft)
    report = args.report
    try:
        prompts = spec_bench.build_prompts(engine, questions, args.max_new_tokens)
        rows = spec_bench.run_spec_bench(systems, prompts, args.repeats)
    finally:
        for s in systems:
            s.close()
    text = spec_bench.format_report(rows)
    header = (f"Spec-Bench: {len(questions)} questions ({len(prompts)} turns) from {args.spec_bench}, greedy, "
              f"{args.max_new_tokens} new tokens at most, {args.repeats} repeat(s), policy {args.policy}.\n\n")
    print(header + text)
    report.write_text(header + text + "\n")
    report.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    png = report.with_suffix(".png")
    print(f"\nwrote {report}, {report.with_suffix('.json')}"
          + (f", {png}" if spec_bench.plot_report(rows, png) else " (no plot: matplotlib is not installed)"))
    return 0


def _bench_peers(args, engine, prompts) -> int:
    from specrt import peers
    from specrt.runtime import Engine

    k = (args.k or [2])[0]
    label = peers.engine_label(engine)
    systems = peers.specrt_systems(engine, [k], args.max_new_tokens, label)
    labels = {label}
    for path in args.also_engine:
        other = Engine.load(path, backend=args.backend, threads=args.threads, draft_threads=args.draft_threads,
                            spin=not args.no_spin, prefill_graph=args.prefill_graph,
                            attention_kernel=args.attention_kernel)
        other_label = peers.engine_label(other)
        if other_label in labels:  # e.g. two fp32 exports with different graphs: tell them apart
            other_label = f"{other_label} {path.name}"
        labels.add(other_label)
        systems += peers.specrt_systems(other, [k], args.max_new_tokens, other_label)
    if args.hf_target:
        systems += peers.transformers_systems(args.hf_target, args.hf_draft, k, args.max_new_tokens,
                                              sorted(engine.manifest.eos_token_ids), args.threads or 2)
    python = args.genai_python or sys.executable
    for model_dir in args.genai_model:
        systems.append(peers.genai_system(python, model_dir, engine.manifest.target.vocab_size, args.max_new_tokens))
    for model_dir in args.openvino_model:
        systems += peers.openvino_systems(args.openvino_python or sys.executable, model_dir, args.max_new_tokens,
                                          args.openvino_draft)
    try:
        rows = peers.run_peers(engine, systems, prompts, args.temperatures, args.repeats)
    finally:
        for s in systems:
            s.close()
    report = peers.format_report(rows, systems[0].name)
    print(report)
    path = args.report
    path.write_text(report + "\n")
    path.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    png = path.with_suffix(".png")
    print(f"\nwrote {path}, {path.with_suffix('.json')}"
          + (f", {png}" if peers.plot_report(rows, png) else " (no plot: matplotlib is not installed)"))
    return 0


def _info(args) -> int:
    from specrt.runtime.manifest import load_manifest

    m = load_manifest(args.engine)
    for spec in (s for s in (m.target, m.draft) if s is not None):
        raw = spec.raw
        print(f"{spec.role:>6}: {_printable(raw['architecture'])} ({_printable(raw['model_type'])}), "
              f"{raw.get('num_parameters', 0) / 1e6:.1f}M "
              f"params, {spec.num_layers} layers, {spec.num_kv_heads} KV heads x {spec.head_dim}, {spec.dtype}, "
              f"vocab {spec.vocab_size}")
        q = raw.get("quantization")
        quant = "7-bit weights, int8 activations per row (integer GEMM)" if q and q.get("scheme") == "int8-rows" else (
                f"int{q['bits']} MatMulNBits (block {q['block_size']}, accuracy level {q['accuracy_level']}"
                 f"{'' if q.get('batch_invariant', True) or spec.role == 'draft' else ', NOT batch-invariant'})"
                 ) if q else "not quantized"
        inv = raw.get("batch_invariance")
        rows = "" if not inv else (f", 1-token steps padded to {inv['min_rows']} rows" if inv["min_rows"] == 2
                                   else ", rows NOT invariant" if inv["min_rows"] is None else "")
        print(f"        attention {raw['kv_cache'].get('attention', 'concat')}, KV update "
              f"{spec.kv.update}, {quant}{rows}")
        if spec.prefill_graph is not None:
            from specrt.runtime.ort_backend import PREFILL_GRAPH_MIN_ROWS, use_prefill_graph

            record = raw["prefill_graph"]
            use, why = use_prefill_graph("auto", scheme=spec.prefill_graph_scheme)
            form = "int8-rows, weights of its own, the embedding table read from the target's" \
                if spec.prefill_graph_scheme == "int8-rows" else f"accuracy level {record.get('accuracy_level')}"
            print(f"        prefill graph {_printable(spec.prefill_graph.path.name)} ({form}) for prefill chunks of "
                  f"{PREFILL_GRAPH_MIN_ROWS}+ tokens: ONNX Runtime "
                  f"{'uses' if use else 'does not use'} it on this machine by default, {why} (--prefill-graph on | off)")
        if spec.role == "target" and spec.kv.in_place:
            from specrt.runtime.ort_backend import attention_flash, built_kernel

            flash, why = attention_flash("auto")
            print(f"        attention kernel on this machine by default: {built_kernel(flash)}, {why} "
                  "(--attention-kernel flash | unfused)")
    if m.draft is None:
        print("   draft: none (target-only engine: drafts from the context and the target's own predictions, "
              "--drafter ngram | suffix | recycle | ngram+recycle)")
    from specrt.runtime.drafters import Datastore, available
    from specrt.runtime.engine import request_defaults

    if m.datastore is not None:
        store = Datastore.load(m.datastore, m.target.vocab_size)  # read and checked now, as a generation would
        print(f"  datastore: {_printable(m.datastore.name)}, {len(store):,} contexts of 1-{store.ngram_max} tokens "
              f"seen >= {store.min_count} times, {store.nbytes / 1e6:.1f} MB in memory: the suffix drafter drafts "
              "from it (--no-datastore leaves it unused)")
    kind = m.draft.kind if m.draft is not None else None
    d = request_defaults(m)
    print(f"  drafters: {', '.join(available(kind))}; a request that names none: {d['drafter']}, "
          f"{d['policy']} k up to {d['k']}" + (f", trees of {d['tree_nodes']}" if d["tree_nodes"] else ", chains")
          + " (measured fastest on Spec-Bench; docs/benchmarks.md)")
    print(f"  pair: k {list(m.k_values)}, max context {m.max_context}, EOS {sorted(m.eos_token_ids)}")
    print("  manifest valid, all file hashes match")
    return 0


def _serve(args) -> int:
    from specrt.runtime.errors import GenerationError

    try:
        from specrt import server
    except ImportError as e:
        raise GenerationError(f"`specrt serve` needs the serve extra ({e}): pip install 'specrt[serve]'") from None
    for name in ("engines", "max_queue"):
        if getattr(args, name) < (1 if name == "engines" else 0):
            raise GenerationError(f"--{name.replace('_', '-')} must be >= {1 if name == 'engines' else 0}")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"specrt serve: warning: listening on {args.host} without --api-key: anyone who can reach it can "
              "use it", file=sys.stderr)
    max_batch = args.max_batch
    if max_batch is None:  # from the machine, where the engine can batch
        from specrt.runtime.invariance import integer_activations
        from specrt.runtime.manifest import load_manifest

        target = load_manifest(args.engine, check_hashes=False).target
        # a target with int8 activations cannot batch without changing answers (runtime/batch.py)
        can_batch = target.batch_graph is not None and not integer_activations(target.raw.get("quantization"))
        max_batch = min(16, 4 * (os.cpu_count() or 1)) if can_batch and args.engines == 1 else 1
    if max_batch < 1 or (max_batch > 1 and args.engines > 1):
        raise GenerationError("--max-batch must be >= 1, and --engines 1 with --max-batch > 1 (the batch's slots "
                              "are the concurrent generations)")
    config = server.Config(str(args.engine), engines=args.engines, max_queue=args.max_queue, api_key=args.api_key,
                           model_name=args.model_name, timeout_s=args.timeout, max_body_bytes=args.max_body_bytes,
                           threads=args.threads, backend=args.backend, max_batch=max_batch,
                           prefill_graph=args.prefill_graph,
                           attention_kernel=args.attention_kernel,
                           datastore=_datastore(args))
    if args.ray:
        from specrt import ray_serve

        ray_serve.run(config, args.host, args.port, args.replicas)
        return 0
    server.serve(config, args.host, args.port)
    return 0


def _printable(text: str) -> str:
    """Untrusted text from a manifest, with control characters escaped (no terminal escape sequences)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))


def _build(args) -> int:
    from specrt.export.tensorrt_build import build_engines

    report = build_engines(args.engine, precision=args.precision, compute_capabilities=args.compute_capability,
                           flavour=args.flavour, timing_cache=args.timing_cache, force=args.force, lean=args.lean)
    for role, plan in report.plans.items():
        print(f"{role}: {plan['file']}, {plan['bytes'] / 1e6:.0f} MB, {plan['profiles']} profiles, "
              f"{plan['seconds']:.0f} s")
    print(f"built {report.flavour} {report.version} plans for compute capabilit"
          f"{'y' if len(report.compute_capabilities) == 1 else 'ies'} {', '.join(report.compute_capabilities)} in "
          f"{args.engine} (recorded in its manifest.json)")
    return 0


def _trace(args) -> int:
    from specrt.runtime.trace import analyze, format_analysis, plot, read

    gens = read(args.file)
    a = analyze(gens)
    print(json.dumps(a.as_dict(), indent=1) if args.json else format_analysis(a))
    if args.plot:
        plot(gens, a, args.plot)
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
