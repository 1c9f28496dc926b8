"""Build a Llama-family decoder as an ONNX graph whose attention writes the KV cache in place.

optimum's export uses concat-style attention: every step slices the cache to
``past_length`` and concatenates the new entries, an O(context) copy per layer
inside ONNX Runtime, and our runtime then copies the n new entries into the
buffers.  This module writes the graph itself instead, from the checkpoint's
weights, with ONNX Runtime's fused contrib ops (the ops onnxruntime-genai's
builder uses on the CPU):

    GroupQueryAttention   packed QKV, rotary inside, past and present *sharing one
                          buffer* [1, kv_heads, max_context, head_dim]: the n new
                          entries are written at [past_length, past_length + n)
                          and attention reads [0, past_length + n) in place
    SimplifiedLayerNormalization / SkipSimplifiedLayerNormalization   RMSNorm
                          with the residual add fused
    MatMul                packed q|k|v and gate|up projections (MatMulNBits after
                          ``--quant int4/int8``)

Interface (the manifest's ``kv_cache.update = "in-place"``):

    inputs   input_ids int64 [1, n]; past_length int64 [1]; logits_from int64 [1];
             cache_key.{i} / cache_value.{i} [1, kv_heads, max_context, head_dim]
    outputs  logits float32 [1, n - logits_from, vocab] (rows logits_from .. n - 1);
             present_key.{i} / present_value.{i}: the same buffers -- the caller
             binds each to the memory of the matching cache input.

``logits_from`` is 0 for decoding and verification (every row's logits) and n - 1 for a prefill chunk:
the LM head (a [hidden, vocab] MatMul, 28M of the demo verifier's 135M parameters) then runs on one row,
which takes about 15% off a prompt's prefill.

Rollback stays "move a length": entries written past the accepted prefix are
overwritten by the next step at that position.  Supported: ``llama``,
``mistral`` and ``qwen2`` checkpoints with SiLU MLPs, a head size that is a
multiple of 16 (ONNX Runtime's CPU rotary kernel requires it) and no sliding
window inside the context; :func:`unsupported_reason` says why not otherwise,
and the exporter then falls back to the concat-style graph.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INPUT_IDS, PAST_LENGTH, LOGITS = "input_ids", "past_length", "logits"
HIDDEN_STATES = "hidden_states"  # [1, n, len(feature_layers) * hidden]: what a feature-level draft head reads
POSITION_IDS, TREE_BIAS = "position_ids", "tree_bias"  # tree passes: each row's position, the rows' mutual mask
LOGITS_FROM = "logits_from"  # int64 [1]: logits only for rows [logits_from, n) (a prefill chunk asks for its last)
TOP_IDS, TOP_LOGP = "top_ids", "top_logp"  # each logits row's top-k ids and log-probabilities (``top_k``)
FAMILIES = ("llama", "mistral", "qwen2")
_MS = "com.microsoft"


def names(num_layers: int) -> dict[str, list[str]]:
    return {
        "key_buffers": [f"cache_key.{i}" for i in range(num_layers)],
        "value_buffers": [f"cache_value.{i}" for i in range(num_layers)],
        "new_keys": [f"present_key.{i}" for i in range(num_layers)],
        "new_values": [f"present_value.{i}" for i in range(num_layers)],
    }


def unsupported_reason(config, max_context: int) -> str | None:
    """Why this checkpoint cannot use the in-place graph (None when it can)."""
    if config.model_type not in FAMILIES:
        return f"model_type {config.model_type!r} (in-place attention is built for {', '.join(FAMILIES)})"
    if getattr(config, "hidden_act", "silu") != "silu":
        return f"hidden_act {config.hidden_act!r} (only SiLU MLPs)"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if head_dim % 16:
        return f"head_dim {head_dim} is not a multiple of 16 (ONNX Runtime's CPU rotary kernel)"
    window = getattr(config, "sliding_window", None)
    if window and (getattr(config, "use_sliding_window", True)) and window < max_context:
        return f"sliding window {window} < max context {max_context}"
    rope = (getattr(config, "rope_scaling", None) or {}).get("rope_type", "default")
    if rope in ("dynamic", "longrope"):
        return f"rope_type {rope!r} changes with the sequence length"
    return None


def _t(x) -> np.ndarray:
    return x.detach().float().cpu().numpy()


class _Graph:
    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []

    def weight(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=np.float32), name))
        return name

    def const(self, name: str, values: list[int], dtype=TensorProto.INT64) -> str:
        self.inits.append(helper.make_tensor(name, dtype, [len(values)], values))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: list[str] | str, domain: str = "", **attrs) -> list[str]:
        outs = [outputs] if isinstance(outputs, str) else outputs
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=outs[0] or f"{op_type}_{len(self.nodes)}",
                                           domain=domain, **attrs))
        return outs

    def linear(self, x: str, module_weights: list, biases: list, name: str) -> str:
        """x @ concat(W_i)^T (+ concat(b_i)): one MatMul for packed projections."""
        w = np.concatenate([_t(m) for m in module_weights], axis=0).T  # [in, out]
        y = self.op("MatMul", [x, self.weight(f"{name}.weight", w)], f"{name}/out")[0]
        if any(b is not None for b in biases):
            b = np.concatenate([_t(bb) if bb is not None else np.zeros(mw.shape[0], np.float32)
                                for bb, mw in zip(biases, module_weights)])
            y = self.op("Add", [y, self.weight(f"{name}.bias", b)], f"{name}/biased")[0]
        return y


def build(model, max_context: int, feature_layers: tuple[int, ...] = (), tree: bool = False,
          batch: bool = False, top_k: int = 0) -> onnx.ModelProto:
    """The in-place-cache ONNX graph of a transformers ``*ForCausalLM`` (fp32).

    ``feature_layers``: also output ``hidden_states`` [1, n, len(layers) * hidden], the residual stream
    entering each of these layers (transformers' ``hidden_states[i]``; i = num_layers is the last layer's
    output before the final norm), concatenated -- the features a draft head reads (EAGLE-3: a low, a
    middle and a high layer).  Only engines with a feature head pay for it.

    ``tree``: two more inputs for tree passes -- ``position_ids`` int64 [1, n] (each row's position: the
    root at past_length, a node at past_length + its depth; rotary uses them) and ``tree_bias`` float32
    [1, 1, n, n] (additive, among the n new rows: 0 where a row may attend, -1e9 elsewhere).  The graph
    makes the full bias [1, 1, n, past_length + n] itself (zeros over the committed context), so the
    caller's work per step stays O(n^2).  A chain pass gives positions past_length .. + n - 1 and a zero
    bias (the attention is causal anyway).
    """
    if batch and tree:
        raise ValueError("batch graphs take chain passes only")
    cfg = model.config
    reason = unsupported_reason(cfg, max_context)
    if reason:
        raise ValueError(f"in-place attention graph not available: {reason}")
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    inter, eps = cfg.intermediate_size, float(cfg.rms_norm_eps)
    body = model.model
    g = _Graph()

    # Rotary tables from the checkpoint's own rotary module (covers rope_theta and the static
    # rope scalings: default, linear, llama3, yarn): cos/sin [max_context, head_dim / 2].
    rotary = body.rotary_emb
    inv_freq = _t(rotary.inv_freq).astype(np.float64)
    scaling = float(getattr(rotary, "attention_scaling", 1.0))
    freqs = np.outer(np.arange(max_context, dtype=np.float64), inv_freq)
    cos = g.weight("rotary.cos", np.cos(freqs) * scaling)
    sin = g.weight("rotary.sin", np.sin(freqs) * scaling)

    # Positions come from past_length: seqlens_k = past_length + n - 1, total = past_length + n.
    one = g.const("one", [1])
    seq = g.op("Slice", [g.op("Shape", [INPUT_IDS], "ids_shape")[0], one, g.const("two", [2])], "seq")[0]
    total = g.op("Add", [PAST_LENGTH, seq], "total")[0]
    seqlens_k = g.op("Cast", [g.op("Sub", [total, one], "last_pos")[0]], "seqlens_k", to=TensorProto.INT32)[0]
    # total_sequence_length: the longest sequence's (a batch's slots have lengths of their own)
    total_len = g.op("Cast", [g.op("ReduceMax", [total], "total_scalar", keepdims=0)[0]], "total_len",
                     to=TensorProto.INT32)[0]

    position_ids = bias = ""
    if tree:
        position_ids = POSITION_IDS
        # [1, 1, n, past] zeros for the committed context, then the caller's [1, 1, n, n] among the new rows
        zeros_shape = g.op("Concat", [g.const("one_one", [1, 1]), seq, PAST_LENGTH], "ctx_bias_shape", axis=0)[0]
        ctx_bias = g.op("ConstantOfShape", [zeros_shape], "ctx_bias",
                        value=helper.make_tensor("zero", TensorProto.FLOAT, [1], [0.0]))[0]
        bias = g.op("Concat", [ctx_bias, TREE_BIAS], "attention_bias", axis=-1)[0]
    hidden = g.op("Gather", [g.weight("embed_tokens.weight", _t(body.embed_tokens.weight)), INPUT_IDS], "embeds")[0]
    n = names(cfg.num_hidden_layers)
    bad = [i for i in feature_layers if not 0 <= i <= cfg.num_hidden_layers]
    if bad:
        raise ValueError(f"feature layers {bad} outside [0, {cfg.num_hidden_layers}]")
    stream = {0: hidden}  # layer index -> the residual stream entering it
    residual = hidden
    branch = None  # output of the previous block, added to the residual by the next norm
    for i, layer in enumerate(body.layers):
        attn, mlp = layer.self_attn, layer.mlp
        in_norm = g.weight(f"layers.{i}.input_layernorm.weight", _t(layer.input_layernorm.weight))
        if branch is None:
            x = g.op("SimplifiedLayerNormalization", [residual, in_norm], f"layers.{i}/in_norm", axis=-1,
                     epsilon=eps, stash_type=1)[0]
        else:
            x, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [branch, residual, in_norm],
                                     [f"layers.{i}/in_norm", "", "", f"layers.{i}/residual_in"], _MS, epsilon=eps)
            stream[i] = residual
        qkv = g.linear(x, [attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight],
                       [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias], f"layers.{i}.qkv_proj")
        ctx = g.op("GroupQueryAttention",
                   [qkv, "", "", n["key_buffers"][i], n["value_buffers"][i], seqlens_k, total_len, cos, sin,
                    position_ids, bias][: 11 if tree else 9],
                   [f"layers.{i}/attn", n["new_keys"][i], n["new_values"][i]], _MS,
                   num_heads=heads, kv_num_heads=kv_heads, do_rotary=1, rotary_interleaved=0,
                   scale=float(head_dim) ** -0.5)[0]
        o = g.linear(ctx, [attn.o_proj.weight], [attn.o_proj.bias], f"layers.{i}.o_proj")
        post_norm = g.weight(f"layers.{i}.post_attention_layernorm.weight", _t(layer.post_attention_layernorm.weight))
        x, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [o, residual, post_norm],
                                 [f"layers.{i}/post_norm", "", "", f"layers.{i}/residual_mid"], _MS, epsilon=eps)
        gate_up = g.linear(x, [mlp.gate_proj.weight, mlp.up_proj.weight],
                           [getattr(mlp.gate_proj, "bias", None), getattr(mlp.up_proj, "bias", None)],
                           f"layers.{i}.gate_up_proj")
        gate, up = g.op("Split", [gate_up, g.const(f"layers.{i}/split", [inter, inter])],
                        [f"layers.{i}/gate", f"layers.{i}/up"], axis=-1)
        silu = g.op("Mul", [gate, g.op("Sigmoid", [gate], f"layers.{i}/sigmoid")[0]], f"layers.{i}/silu")[0]
        act = g.op("Mul", [silu, up], f"layers.{i}/act")[0]
        branch = g.linear(act, [mlp.down_proj.weight], [getattr(mlp.down_proj, "bias", None)], f"layers.{i}.down_proj")
    final = g.weight("norm.weight", _t(body.norm.weight))
    x, _, _, stream[cfg.num_hidden_layers] = g.op(
        "SkipSimplifiedLayerNormalization", [branch, residual, final],
        ["final_norm", "", "", "final_residual" if cfg.num_hidden_layers in feature_layers else ""], _MS, epsilon=eps)
    # the LM head reads only rows [logits_from, n): a prefill chunk asks for its last row alone
    x = g.op("Slice", [x, LOGITS_FROM, g.const("int64_max", [2**63 - 1]), one], "head_rows")[0]
    g.linear(x, [model.lm_head.weight], [getattr(model.lm_head, "bias", None)], "lm_head")
    g.nodes[-1].output[0] = LOGITS  # the last MatMul (or its bias Add) is the graph output

    b = "batch" if batch else 1  # the batch dimension of every input and output
    extra_outputs = []
    if top_k:
        values, _ = g.op("TopK", [LOGITS, g.const("top_k", [top_k])], ["top_values", TOP_IDS], axis=-1)
        lse = g.op("ReduceLogSumExp", [LOGITS], "logsumexp", axes=[-1], keepdims=1)[0]
        g.op("Sub", [values, lse], TOP_LOGP)
        extra_outputs += [helper.make_tensor_value_info(TOP_IDS, TensorProto.INT64, [b, "logits_rows", top_k]),
                          helper.make_tensor_value_info(TOP_LOGP, TensorProto.FLOAT, [b, "logits_rows", top_k])]
    if feature_layers:
        parts = [stream[i] for i in feature_layers]
        if len(parts) > 1:
            g.op("Concat", parts, HIDDEN_STATES, axis=-1)
        else:
            g.op("Identity", parts, HIDDEN_STATES)
        extra_outputs.append(helper.make_tensor_value_info(HIDDEN_STATES, TensorProto.FLOAT,
                                                           [b, "sequence_length", len(feature_layers) * cfg.hidden_size]))
    buffer = [b, kv_heads, max_context, head_dim]
    tree_inputs = [helper.make_tensor_value_info(POSITION_IDS, TensorProto.INT64, [1, "sequence_length"]),
                   helper.make_tensor_value_info(TREE_BIAS, TensorProto.FLOAT,
                                                 [1, 1, "sequence_length", "sequence_length"])] if tree else []
    graph = helper.make_graph(
        g.nodes, "specrt_inplace_decoder",
        [helper.make_tensor_value_info(INPUT_IDS, TensorProto.INT64, [b, "sequence_length"]),
         helper.make_tensor_value_info(PAST_LENGTH, TensorProto.INT64, [b]),
         helper.make_tensor_value_info(LOGITS_FROM, TensorProto.INT64, [1])] + tree_inputs
        + [helper.make_tensor_value_info(b, TensorProto.FLOAT, buffer) for b in n["key_buffers"] + n["value_buffers"]],
        [helper.make_tensor_value_info(LOGITS, TensorProto.FLOAT, [b, "logits_rows", cfg.vocab_size])]
        + [helper.make_tensor_value_info(o, TensorProto.FLOAT, buffer) for o in n["new_keys"] + n["new_values"]]
        + extra_outputs,
        g.inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(_MS, 1)],
                             producer_name="specrt")
