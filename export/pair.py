"""``export_pair``: a HuggingFace draft + target pair → one engine directory.

Phases: check (tokenizers compatible) → export (optimum ONNX, rewritten to the
static-cache interface) → verify (ONNX Runtime vs PyTorch) → write (tokenizer,
manifest with SHA-256 of every file).  Everything is written to a temporary
sibling directory and renamed into place at the end, so a failed export never
leaves a directory the runtime would accept (it has no manifest.json).
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from specrt.engines import FORMAT_NAME, FORMAT_VERSION
from specrt.export.compat import check_tokenizers, require_local_checkpoint
from specrt.export.onnx_export import ATTENTION_CHOICES, choose_attention, export_model
from specrt.export.quantize import (
    PREFILL_ACCURACY_LEVEL,
    PREFILL_QUANTS,
    QUANT_CHOICES,
    quantize_file,
    share_tensors,
    write_prefill_graph,
    write_rows_prefill_graph,
)
from specrt.export.verify import HELD_OUT_TEXT, compare, compare_prefill_graph, text_drift
from specrt.runtime import invariance
from specrt.runtime.errors import SpecrtError
from specrt.runtime.manifest import MANIFEST, load_manifest, model_spec, sha256_file, validate_manifest
from specrt.runtime.ort_backend import OrtModelStep
from tqdm.auto import tqdm

import specrt

log = logging.getLogger(__name__)
DEFAULT_K = (1, 2, 4, 8)
DEFAULT_MAX_CONTEXT = 2048
DEFAULT_TOLERANCE = 2e-3
# what the runtime (and a C++ tokenizers port) needs; a slow tokenizer's model files are dropped
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "added_tokens.json"}


DATASTORE_FILE = "datastore.npz"


class ExportError(SpecrtError, RuntimeError):
    """Export failed; the output directory was left untouched."""


@dataclass
class ExportReport:
    out: Path
    max_abs_diff: dict[str, dict[str, float]] = field(default_factory=dict)
    text_drift: dict[str, dict[str, float]] = field(default_factory=dict)  # quantized models on held-out text


def _check_datastore(path: Path, vocab_size: int):
    """The datastore at ``path``, read and checked now (before minutes of export) against the target's vocabulary."""
    from specrt.runtime.drafters import Datastore

    try:
        store = Datastore.load(path, vocab_size)
        store.arrays()
    except SpecrtError as e:
        raise ExportError(f"--datastore: {e}") from None
    return store


def draft_default_quant(quant: str, draft_head: str | Path | None) -> str:
    """The draft's quantization when no ``draft_quant`` is given: ``quant`` -- except a feature head with ``quant``
    fp32 (the default), which is int4.  A draft's numerics change only which tokens are proposed, never the
    output, and the head's ~38 MB of fp32 projection weights are read on every commit pass: on the demo pair
    (Spec-Bench, hybrid tree) that pass took 3.5 ms per step in fp32, 1.8 in int8 and 1.25 in int4, at the
    same tokens per pass.  ``draft_quant="fp32"`` keeps a head fp32."""
    return "int4" if draft_head is not None and quant == "fp32" else quant


def export_pair(target: str | Path, draft: str | Path | None, out: str | Path, *, max_context: int | None = None,
                k_values: Sequence[int] = DEFAULT_K, force: bool = False, verify: bool = True,
                tolerance: float = DEFAULT_TOLERANCE, progress: bool = True, quant: str = "fp32",
                target_quant: str | None = None, draft_quant: str | None = None, block_size: int = 32,
                accuracy_level: int = 4, draft_accuracy_level: int = 4, attention: str = "auto",
                draft_head: str | Path | None = None, tree: bool = True, batch: bool = False,
                prefill_graph: str | None = "int8-rows", datastore: str | Path | None = None) -> ExportReport:
    """Export ``target`` (the verification model) and ``draft`` into the engine directory ``out``.

    ``draft=None`` writes a target-only engine: it runs the context drafters (ngram, suffix) and
    target-only decoding; the model and hybrid drafters need a draft.  ``draft_head`` (instead of
    ``draft``): a feature-level draft head trained on this target (``scripts/train_head.py --export``);
    the target graph then also outputs the hidden states the head reads.  ``tree`` (default on): the
    target's in-place graph also takes tree passes (measured: a chain pass costs the same).

    ``quant`` (fp32 | int8 | int4, overridable per model) applies ONNX Runtime's weight-only
    MatMulNBits quantizer after the fp32 graphs have been verified; the drift it causes is measured
    and recorded in the manifest (a feature head's: its logits against the fp32 PyTorch head).  A feature head
    with ``quant`` fp32 and no ``draft_quant`` is int4 (``draft_default_quant``).  ``accuracy_level`` is the target's MatMulNBits compute: 4 (default,
    int8 activations, fastest) scores a position in a 1-token pass differently from inside a
    multi-token pass on the CPUs measured, so export measures that and the runtime pads 1-token target
    steps to 2 rows (speculation stays lossless); 1 (fp32 compute) needs no padding but is ~3x slower
    on CPU.  ``draft_accuracy_level`` defaults to 4: the draft's numerics change only the acceptance.
    ``attention`` (auto | gqa | concat) picks the graph builder:
    ``gqa`` writes the KV cache in place with ONNX Runtime's GroupQueryAttention (Llama, Mistral,
    Qwen2), ``concat`` is optimum's export; ``auto`` uses ``gqa`` wherever the checkpoint allows.
    ``batch``: also write ``target-batch.onnx``, the target with a batch dimension (one cache slot per sequence;
    ``gqa_graph.build(batch=True)``), quantized like the target and checked against it: what a server runs to
    decode several requests in one pass (``runtime/batch.py``).
    ``prefill_graph``: an int4 target at an accuracy level other than 1 also gets ``target.prefill.onnx``, a graph
    of the same interface that a runtime may run a prompt's prefill chunks through (chosen per CPU at load time):
    ``int8-rows`` (default) the checkpoint quantized int8-rows, in a weights file of its own
    (``quantize.write_rows_prefill_graph``: integer GEMM, which runs on AMX); ``level1`` the target's own weights file
    at fp32 compute (``quantize.write_prefill_graph``); None, none.
    ``datastore``: an ``.npz`` from ``scripts/build_datastore.py`` (the target's own answers as a continuation
    table), checked against the target's vocabulary and copied in as ``datastore.npz``: the ``suffix`` drafter
    then drafts from it by default, and ``suffix`` replaces ``ngram`` as the engine's default drafter
    (``runtime.engine.request_defaults``).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    k_values = sorted({int(k) for k in k_values})
    if not k_values or k_values[0] < 1 or k_values[-1] > 64:
        raise ValueError(f"k values must be in 1..64, got {k_values}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not force:
        raise ExportError(f"{str(out)!r} exists and is not empty; pass --force (force=True) to replace it.")
    quants = {"target": target_quant or quant, "draft": draft_quant or draft_default_quant(quant, draft_head)}
    for role, q in quants.items():
        if q not in QUANT_CHOICES:
            raise ValueError(f"{role} quantization must be one of {', '.join(QUANT_CHOICES)}, got {q!r}")
    if prefill_graph is not None and prefill_graph not in PREFILL_QUANTS:
        raise ValueError(f"prefill_graph must be one of {', '.join(PREFILL_QUANTS)} or None, got {prefill_graph!r}")
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {attention!r}")
    if draft is not None and draft_head is not None:
        raise ValueError("give a draft model (--draft) or a draft head (--draft-head), not both")
    target_dir = require_local_checkpoint(target, "target")
    draft_dir = require_local_checkpoint(draft, "draft") if draft is not None else None
    head_cfg = None
    if draft_head is not None:
        from specrt.export import feature_head

        head_cfg = feature_head.load_head(Path(draft_head))[0]
    roles = {"target": target_dir, **({"draft": draft_dir} if draft_dir is not None else {})}
    bar = tqdm(total=4, desc="check", disable=not progress, unit="phase",
               bar_format="{desc:<28} {n_fmt}/{total_fmt} phases [{elapsed}]")

    # 1. check -------------------------------------------------------------------
    t_tok = AutoTokenizer.from_pretrained(target_dir)
    if draft_dir is not None:
        check_tokenizers(t_tok, AutoTokenizer.from_pretrained(draft_dir))
    if not t_tok.is_fast:
        raise ExportError("the target's tokenizer has no tokenizer.json (not a 'fast' tokenizer); the runtime "
                          "needs one. Convert it with transformers (`AutoTokenizer.from_pretrained(...).save_pretrained`).")
    configs = {role: AutoConfig.from_pretrained(ckpt) for role, ckpt in roles.items()}
    t_cfg = configs["target"]
    limit = min(getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 1 << 30
                for c in configs.values())
    store = _check_datastore(Path(datastore), t_cfg.vocab_size) if datastore is not None else None
    max_context = max_context or min(DEFAULT_MAX_CONTEXT, limit)
    if max_context > limit:
        raise ValueError(f"--max-context {max_context} exceeds the models' position limit {limit}")
    if max_context < k_values[-1] + 2:
        raise ValueError(f"--max-context {max_context} is too small for k={k_values[-1]}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    tmp.chmod(0o755)
    work = Path(tempfile.mkdtemp(prefix="specrt-export-"))
    report = ExportReport(out=out)
    try:
        # 2. export --------------------------------------------------------------
        bar.update(1)
        bar.set_description("export " + " + ".join(roles))
        models = {}
        for role, ckpt in roles.items():
            log.info("exporting %s from %s", role, ckpt)
            layers = tuple(head_cfg.feature_layers) if head_cfg is not None and role == "target" else ()
            models[role] = export_model(ckpt, role, tmp, work, max_context, configs[role], attention, layers,
                                        tree=tree and role == "target" and
                                        choose_attention(attention, configs[role], max_context) == "gqa")
        if head_cfg is not None:
            models["draft"] = feature_head.export_head(Path(draft_head), target_dir, tmp, max_context, t_cfg)
        # 3. verify --------------------------------------------------------------
        bar.update(1)
        bar.set_description("verify vs PyTorch")
        manifest = {
            # the oldest version that describes this directory: readers of format 3 can still run a concat export
            "format": FORMAT_NAME, "created_by": f"specrt {specrt.__version__}",
            "format_version": FORMAT_VERSION if any("logits_from" in m["kv_cache"] for m in models.values()) else 3,
            "models": models,
            "pair": {"k_values": k_values, "max_context": max_context,
                     "eos_token_ids": _eos_ids(t_cfg, t_tok), "bos_token_id": t_tok.bos_token_id},
            "tokenizer": {},
            "files": {},
        }
        if verify:
            for role, ckpt in roles.items():
                hf = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
                diffs = compare(model_spec(tmp, role, manifest), hf, k=k_values[-1], vocab_limit=len(t_tok))
                del hf
                report.max_abs_diff[role] = diffs
                worst = max(v for key, v in diffs.items() if not key.endswith("argmax_equal"))
                log.info("%s: max |ONNX - PyTorch| = %s", role, {k: f"{v:.2e}" for k, v in diffs.items()})
                if worst > tolerance:
                    raise ExportError(f"{role}: exported logits differ from PyTorch by {worst:.3g} > tolerance "
                                      f"{tolerance:g} ({diffs}). This is an exporter bug for this architecture; "
                                      "please report it (or pass --tolerance / --no-verify at your own risk).")
                models[role]["verification"] = {k: round(v, 8) for k, v in diffs.items()}
            if head_cfg is not None:  # the features the head reads, and the head itself, against PyTorch
                diffs = feature_head.verify(model_spec(tmp, "target", manifest), model_spec(tmp, "draft", manifest),
                                            target_dir, Path(draft_head))
                report.max_abs_diff["draft head"] = diffs
                worst = max(v for key, v in diffs.items() if not key.endswith("argmax_equal"))
                if worst > tolerance:
                    raise ExportError(f"the draft head or the target's features differ from PyTorch by "
                                      f"{worst:.3g} > tolerance {tolerance:g} ({diffs})")
                models["draft"]["verification"] = {k: round(v, 8) for k, v in diffs.items()}
        # int4 only: the one MatMulNBits width whose prefill was measured both ways (docs/quantization.md)
        with_prefill_graph = prefill_graph is not None and quants["target"] == "int4" and \
            accuracy_level != PREFILL_ACCURACY_LEVEL
        if with_prefill_graph and prefill_graph == "int8-rows":  # from the fp32 graph, before it is quantized
            bar.set_description("prefill graph (int8-rows)")
            rows_prefill = write_rows_prefill_graph(tmp / models["target"]["file"])
        for role, entry in models.items():  # a draft head too (no checkpoint of its own: no drift measured)
            if quants[role] == "fp32":
                continue
            bar.set_description(f"quantize {role} ({quants[role]})")
            level = accuracy_level if role == "target" else draft_accuracy_level
            record = quantize_file(tmp / entry["file"], quants[role], block_size, level)
            entry["external_data"] = entry["file"] + ".data"
            if verify and role in roles:
                # drift from the checkpoint, measured and recorded (not a failure: it is the point)
                hf = AutoModelForCausalLM.from_pretrained(roles[role], dtype=torch.float32).eval()
                record["drift_vs_pytorch"] = compare(model_spec(tmp, role, manifest), hf, k=k_values[-1],
                                                     vocab_limit=len(t_tok))
                text_ids = t_tok(HELD_OUT_TEXT)["input_ids"][: max_context]
                record["drift_on_text"] = {k: round(v, 4) for k, v in
                                           text_drift(model_spec(tmp, role, manifest), hf, text_ids).items()}
                report.text_drift[role] = record["drift_on_text"]
                del hf
                report.max_abs_diff[f"{role}-{quants[role]}"] = record["drift_vs_pytorch"]
            elif verify and head_cfg is not None:  # the quantized head against the fp32 PyTorch head: recorded
                record["drift_vs_pytorch"] = feature_head.verify(model_spec(tmp, "target", manifest),
                                                                 model_spec(tmp, role, manifest), target_dir,
                                                                 Path(draft_head))
                report.max_abs_diff[f"draft head-{quants[role]}"] = record["drift_vs_pytorch"]
            entry["quantization"] = record
        if batch:
            bar.set_description("batch graph")
            models["target"]["batch_graph"] = export_batch_graph(target_dir, tmp, max_context, models["target"],
                                                                 quants["target"], block_size, accuracy_level,
                                                                 manifest if verify else None)
        if with_prefill_graph:
            bar.set_description("prefill graph")
            record = rows_prefill if prefill_graph == "int8-rows" else write_prefill_graph(tmp / models["target"]["file"])
            if prefill_graph == "int8-rows":  # its fp32 embedding table is the int4 target's, byte for byte: stored once
                share_tensors(tmp / record["file"], tmp / models["target"]["file"])
            if record is not None:
                models["target"]["prefill_graph"] = record
                if verify:
                    record["verification"] = compare_prefill_graph(model_spec(tmp, "target", manifest),
                                                                   t_tok(HELD_OUT_TEXT)["input_ids"][:max_context])
        if verify:
            # Measured, not assumed: whether a verification pass scores each row as 1-token decoding
            # does (runtime/invariance.py); the runtime pads 1-token target steps when min_rows is 2.
            inv = invariance.measure(OrtModelStep(model_spec(tmp, "target", manifest)), vocab_limit=len(t_tok),
                                     trust_single=not invariance.integer_activations(
                                         models["target"].get("quantization")))
            models["target"]["batch_invariance"] = inv.as_dict()
            if models["target"].get("quantization"):
                models["target"]["quantization"]["batch_invariant"] = inv.min_rows is not None
        # 4. write -----------------------------------------------------------------
        bar.update(1)
        bar.set_description("write tokenizer + manifest")
        tok_files = []
        for f in t_tok.save_pretrained(tmp):
            name = Path(f).name
            if name in TOKENIZER_FILES and (tmp / name).is_file():
                tok_files.append(name)
            elif (tmp / name).is_file():  # e.g. a slow tokenizer's model file: not needed at run time
                (tmp / name).unlink()
        tok_files = sorted(set(tok_files))
        if store is not None:
            shutil.copyfile(store.path, tmp / DATASTORE_FILE)
            manifest["datastore"] = {"file": DATASTORE_FILE, "ngram_max": store.ngram_max,
                                     "min_count": store.min_count, "entries": len(store),
                                     "source": Path(datastore).name[:200]}
        for p in tmp.iterdir():
            p.chmod(0o644)
        if "tokenizer.json" not in tok_files:
            raise ExportError("the target tokenizer did not write tokenizer.json")
        manifest["tokenizer"] = {"files": tok_files, "tokenizer_json": "tokenizer.json",
                                 "chat_template": _chat_template(t_tok),
                                 "add_bos_token": bool(getattr(t_tok, "add_bos_token", False))}
        manifest["files"] = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                             for p in sorted(tmp.iterdir()) if p.is_file()}
        validate_manifest(manifest)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        load_manifest(tmp)  # the runtime must accept what we wrote
        _replace_dir(tmp, out)
        bar.update(1)
        bar.set_description("done")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
        bar.close()
    return report


def export_batch_graph(target_dir: Path, out: Path, max_context: int, entry: dict, quant: str, block_size: int,
                       accuracy_level: int, manifest: dict | None) -> dict:
    """``target-batch.onnx`` beside the target: the same model with a batch dimension, quantized the same way;
    with ``manifest``, its logits are checked against the target graph's, sequence by sequence."""
    import onnx
    import torch
    from specrt.export import gqa_graph
    from transformers import AutoModelForCausalLM

    if entry["kv_cache"].get("update") != "in-place":
        raise ExportError("a batch graph needs the in-place (gqa) target graph: Llama, Mistral or Qwen2 checkpoints "
                          "with --attention auto or gqa")
    hf = AutoModelForCausalLM.from_pretrained(target_dir, dtype=torch.float32).eval()
    layers = tuple((entry.get("features") or {}).get("layers", ()))
    model = gqa_graph.build(hf, max_context, layers, batch=True)
    del hf
    path = out / "target-batch.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    record = {"file": path.name, "external_data": path.name + ".data"}
    if quant != "fp32":
        quantize_file(path, quant, block_size, accuracy_level)
    if manifest is not None:
        from specrt.runtime.batch import compare_batch_graph

        record["verification"] = compare_batch_graph(model_spec(out, "target", manifest), path)
    return record


def _eos_ids(cfg, tok) -> list[int]:
    ids = cfg.eos_token_id if isinstance(cfg.eos_token_id, list) else [cfg.eos_token_id]
    ids = [i for i in ids + [tok.eos_token_id] if i is not None]
    return sorted({int(i) for i in ids})


def _chat_template(tok) -> str | None:
    t = getattr(tok, "chat_template", None)
    return t if isinstance(t, str) else None


def _replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished directory into place; the old one (only with --force) goes last."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        out.rename(old)
    tmp.rename(out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

