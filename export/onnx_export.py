"""One model → ``<role>.onnx`` with the static-cache interface, plus its manifest entry.

Two graph builders share that interface (see the manifest's ``kv_cache.update``):
``gqa`` (``gqa_graph``: our own graph with ONNX Runtime's GroupQueryAttention writing
the cache in place; Llama, Mistral, Qwen2) and ``concat`` (optimum's export rewritten
by ``static_cache``; every architecture optimum exports; ``bucketed`` is the same graph with
shapes fixed per context bucket, for CUDA-graph replay).  ``auto`` picks ``gqa`` where the
checkpoint supports it.
"""
from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

import onnx
from specrt.export import gqa_graph, static_cache
from specrt.runtime.tensorrt_plan import context_buckets

log = logging.getLogger(__name__)
EXTERNAL_DATA_ABOVE = 100 * 2**20  # bytes; bigger graphs keep their weights in <file>.data
ATTENTION_CHOICES = ("auto", "gqa", "concat", "bucketed")

_ONNX_DTYPES = {onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
                onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32"}


def optimum_export(checkpoint: Path, workdir: Path) -> Path:
    """Run optimum's exporter (task text-generation-with-past, fp32) quietly; return the model.onnx path."""
    from optimum.exporters.onnx import main_export

    workdir.mkdir(parents=True, exist_ok=True)
    sink = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(sink):
        warnings.simplefilter("ignore")
        main_export(str(checkpoint), output=str(workdir), task="text-generation-with-past", do_validation=False, dtype="fp32",
                    local_files_only=True, library_name="transformers")
    path = workdir / "model.onnx"
    if not path.is_file():
        raise RuntimeError(f"optimum produced no model.onnx for {checkpoint} (files: {sorted(workdir.iterdir())})")
    return path


def _tensor(vi: onnx.ValueInfoProto) -> dict:
    t = vi.type.tensor_type
    return {"name": vi.name, "dtype": _ONNX_DTYPES[t.elem_type],
            "shape": [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]}


def choose_attention(attention: str, config, max_context: int) -> str:
    """Resolve ``auto`` to ``gqa`` or ``concat``; refuse ``gqa`` where the checkpoint cannot use it."""
    if attention not in ATTENTION_CHOICES:
        raise ValueError(f"attention must be one of {', '.join(ATTENTION_CHOICES)}, got {attention!r}")
    reason = gqa_graph.unsupported_reason(config, max_context)
    if attention == "gqa" and reason:
        raise ValueError(f"--attention gqa is not available for this checkpoint: {reason}. Use --attention concat "
                         "(or auto).")
    if attention == "auto":
        return "concat" if reason else "gqa"
    return attention


def export_model(checkpoint: Path, role: str, out_dir: Path, workdir: Path, max_context: int, config,
                 attention: str = "auto", feature_layers: tuple[int, ...] = (), tree: bool = False) -> dict:
    """Export, rewrite to the static cache, save ``out_dir/<role>.onnx``; return the manifest entry.

    ``feature_layers``: the target also outputs these layers' hidden states (for a feature head; gqa only).
    """
    attention = choose_attention(attention, config, max_context)
    if feature_layers and attention != "gqa":
        raise ValueError("a feature head needs the target's in-place (gqa) graph: Llama, Mistral or Qwen2 "
                         f"checkpoints with --attention auto or gqa, not {attention!r}")
    if attention == "gqa":
        import torch
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
        model = gqa_graph.build(hf, max_context, tuple(feature_layers), tree=tree)
        del hf
        num_layers, kv_heads = config.num_hidden_layers, config.num_key_value_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        cache_dtype, n = "float32", gqa_graph.names(num_layers)
        layout = {"update": "in-place", "attention": "group-query-attention", "logits_from": gqa_graph.LOGITS_FROM}
        if tree:
            layout["tree"] = {"position_ids": gqa_graph.POSITION_IDS, "bias": gqa_graph.TREE_BIAS}
    else:
        raw = onnx.load(str(optimum_export(checkpoint, workdir / role)))
        past = [i for i in raw.graph.input if i.name.startswith("past_key_values.") and i.name.endswith(".key")]
        if not past:
            raise RuntimeError(f"{checkpoint}: optimum's export has no past_key_values inputs; this architecture "
                               "is not supported by specrt export yet")
        dims = past[0].type.tensor_type.shape.dim
        num_layers, kv_heads, head_dim = len(past), dims[1].dim_value, dims[3].dim_value
        if not kv_heads or not head_dim:
            raise RuntimeError(f"{checkpoint}: cannot read kv heads / head dim from the exported graph ({dims})")
        model = static_cache.to_static_cache(raw, num_layers, kv_heads, head_dim, max_context,
                                             bucketed=attention == "bucketed")
        # Only this graph goes through the onnx checker: the in-place one uses ORT contrib ops it does not
        # know (ONNX Runtime validates both on load, and export verifies both against PyTorch).
        onnx.checker.check_model(model)
        cache_dtype, n = _ONNX_DTYPES[past[0].type.tensor_type.elem_type], static_cache.names(num_layers)
        layout = {"update": "write-new", "attention": "concat"}
        if attention == "bucketed":
            layout = {"update": "write-new", "attention": "concat-bucketed",
                      "bucket_length": static_cache.BUCKET_LENGTH, "context_buckets": context_buckets(max_context, smallest=max(16, min(64, max_context // 4)))}
    path = out_dir / f"{role}.onnx"
    external = None
    if model.ByteSize() > EXTERNAL_DATA_ABOVE:
        external = f"{role}.onnx.data"
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external, size_threshold=1024)
    else:
        onnx.save_model(model, str(path))
    logits = next(o for o in model.graph.output if o.name == static_cache.LOGITS)
    vocab = logits.type.tensor_type.shape.dim[2].dim_value or config.vocab_size
    entry = model_entry(model, path, external, (config.architectures or [type(config).__name__])[0], config.model_type,
                        num_layers, int(getattr(config, "num_attention_heads", 0) or getattr(config, "n_head", 0))
                        or kv_heads, kv_heads, head_dim,
                        int(getattr(config, "hidden_size", 0) or getattr(config, "n_embd", 0)) or 1, cache_dtype,
                        int(vocab), max_context, n, layout)
    if feature_layers:
        entry["features"] = {"output": gqa_graph.HIDDEN_STATES, "layers": list(feature_layers),
                             "size": len(feature_layers) * config.hidden_size}
    return entry


def model_entry(model, path: Path, external: str | None, architecture: str, model_type: str, num_layers: int,
                num_heads: int, kv_heads: int, head_dim: int, hidden_size: int, cache_dtype: str, vocab: int,
                max_context: int, names: dict, layout: dict) -> dict:
    """A model's manifest entry (FORMAT.md): files, shapes, every graph tensor, the step interface."""
    return {
        "file": path.name,
        "external_data": external,
        "architecture": architecture,
        "model_type": model_type,
        "num_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_kv_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_size": hidden_size,
        "dtype": cache_dtype,
        "vocab_size": int(vocab),
        "num_parameters": sum(int(_numel(t)) for t in model.graph.initializer),
        "opset": max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")),
        "inputs": [_tensor(i) for i in model.graph.input],
        "outputs": [_tensor(o) for o in model.graph.output],
        "kv_cache": {
            "layout": "static-buffer-bhsd",
            "buffer_shape": [1, kv_heads, max_context, head_dim],
            "input_ids": static_cache.INPUT_IDS,
            "past_length": static_cache.PAST_LENGTH,
            "logits": static_cache.LOGITS,
            **names,
            **layout,
        },
    }


def _numel(t: onnx.TensorProto) -> int:
    size = 1
    for d in t.dims:
        size *= d
    return size
