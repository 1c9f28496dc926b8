"""Rewrite an optimum "text-generation-with-past" ONNX graph to the static-cache interface.

optimum's graph takes ``attention_mask``, ``position_ids`` and
``past_key_values.{i}.key/value`` [b, kvh, past, hd] and returns the full
``present.{i}.key/value`` [b, kvh, past + n, hd].  A runtime driving that graph
as-is has to hand in exactly ``past`` entries and take back ``past + n``: a
copy of the whole cache every step.  After this rewrite the graph takes

    input_ids    int64 [1, n]
    past_length  int64 [1]                     valid cache entries
    cache_key.{i}, cache_value.{i}  [1, kvh, max_context, hd]   the preallocated buffers

and returns ``logits`` [1, n, vocab] and ``new_key.{i}`` / ``new_value.{i}``
[1, kvh, n, hd] — only the new entries, which the caller writes into the
buffers at ``past_length``.  attention_mask and position_ids are derived in the
graph from ``past_length`` (batch 1, no padding).  The original attention
still concatenates inside the graph, so ONNX Runtime copies O(context) per
step internally (``gqa_graph`` is the in-place alternative for ONNX Runtime).

``bucketed=True`` makes every shape independent of ``past_length``, which CUDA
graphs need (a captured graph replays fixed shapes): one more input,

    bucket_length int64 [1]    a context bucket >= past_length (``kv_cache.context_buckets``)

and attention reads ``cache[:, :, :bucket_length]`` with the entries in
``[past_length, bucket_length)`` masked out through ``attention_mask``.  Shapes
then depend only on n and the bucket; ``past_length`` is plain data (positions
and mask values), so a graph captured per (n, bucket) replays at any context
in that bucket.
"""
from __future__ import annotations

import onnx
from onnx import TensorProto, helper

INPUT_IDS, PAST_LENGTH, LOGITS = "input_ids", "past_length", "logits"
BUCKET_LENGTH = "bucket_length"
INT64_MAX = 2**63 - 1


def names(num_layers: int) -> dict[str, list[str]]:
    return {
        "key_buffers": [f"cache_key.{i}" for i in range(num_layers)],
        "value_buffers": [f"cache_value.{i}" for i in range(num_layers)],
        "new_keys": [f"new_key.{i}" for i in range(num_layers)],
        "new_values": [f"new_value.{i}" for i in range(num_layers)],
    }


def _const(graph_nodes: list, name: str, values: list[int]) -> str:
    graph_nodes.append(helper.make_node("Constant", [], [name], value=helper.make_tensor(name, TensorProto.INT64,
                                                                                          [len(values)], values)))
    return name


def to_static_cache(model: onnx.ModelProto, num_layers: int, kv_heads: int, head_dim: int,
                    max_context: int, bucketed: bool = False) -> onnx.ModelProto:
    g = model.graph
    inputs = {i.name: i for i in g.input}
    past_k = [f"past_key_values.{i}.key" for i in range(num_layers)]
    past_v = [f"past_key_values.{i}.value" for i in range(num_layers)]
    missing = [n for n in [INPUT_IDS, *past_k, *past_v] if n not in inputs]
    if missing:
        raise ValueError(f"unexpected exported graph: inputs {missing} not found (have {sorted(inputs)})")
    cache_dtype = inputs[past_k[0]].type.tensor_type.elem_type
    n = names(num_layers)
    pre: list[onnx.NodeProto] = []
    _const(pre, "specrt/zero", [0])
    _const(pre, "specrt/one", [1])
    _const(pre, "specrt/two", [2])
    _const(pre, "specrt/int64_max", [INT64_MAX])
    _const(pre, "specrt/axis2", [2])
    # seq = shape(input_ids)[1]; total = past_length + seq
    pre.append(helper.make_node("Shape", [INPUT_IDS], ["specrt/ids_shape"]))
    pre.append(helper.make_node("Slice", ["specrt/ids_shape", "specrt/one", "specrt/two"], ["specrt/seq"]))
    pre.append(helper.make_node("Add", [PAST_LENGTH, "specrt/seq"], ["specrt/total"]))
    pre.append(helper.make_node("Constant", [], ["specrt/delta"],
                                value=helper.make_tensor("d", TensorProto.INT64, [], [1])))
    pre.append(helper.make_node("Constant", [], ["specrt/zero_scalar"],
                                value=helper.make_tensor("z", TensorProto.INT64, [], [0])))
    # The cache prefix the attention reads: exactly past_length entries, or a whole bucket.
    kept = BUCKET_LENGTH if bucketed else PAST_LENGTH
    if "attention_mask" in inputs:
        if bucketed:
            # mask over [0, bucket + n): 1 below past_length (valid cache), 0 in [past_length, bucket)
            # (stale entries of the bucket), 1 from bucket on (the n new tokens)
            pre.append(helper.make_node("Add", [BUCKET_LENGTH, "specrt/seq"], ["specrt/mask_len"]))
            pre.append(helper.make_node("Squeeze", ["specrt/mask_len", "specrt/zero"], ["specrt/mask_len_s"]))
            pre.append(helper.make_node("Range", ["specrt/zero_scalar", "specrt/mask_len_s", "specrt/delta"],
                                        ["specrt/key_pos"]))
            pre.append(helper.make_node("Less", ["specrt/key_pos", PAST_LENGTH], ["specrt/is_past"]))
            pre.append(helper.make_node("Less", ["specrt/key_pos", BUCKET_LENGTH], ["specrt/in_bucket"]))
            pre.append(helper.make_node("Not", ["specrt/in_bucket"], ["specrt/is_new"]))
            pre.append(helper.make_node("Or", ["specrt/is_past", "specrt/is_new"], ["specrt/mask_bool"]))
            pre.append(helper.make_node("Cast", ["specrt/mask_bool"], ["specrt/mask_1d"], to=TensorProto.INT64))
            pre.append(helper.make_node("Unsqueeze", ["specrt/mask_1d", "specrt/zero"], ["attention_mask"]))
        else:
            pre.append(helper.make_node("Concat", ["specrt/one", "specrt/total"], ["specrt/mask_shape"], axis=0))
            pre.append(helper.make_node("ConstantOfShape", ["specrt/mask_shape"], ["attention_mask"],
                                        value=helper.make_tensor("one", TensorProto.INT64, [1], [1])))
    if "position_ids" in inputs:
        # past_length + [0, n): the shape depends on n only
        pre.append(helper.make_node("Squeeze", ["specrt/seq", "specrt/zero"], ["specrt/seq_s"]))
        pre.append(helper.make_node("Range", ["specrt/zero_scalar", "specrt/seq_s", "specrt/delta"], ["specrt/steps"]))
        pre.append(helper.make_node("Add", ["specrt/steps", PAST_LENGTH], ["specrt/positions"]))
        pre.append(helper.make_node("Unsqueeze", ["specrt/positions", "specrt/zero"], ["position_ids"]))
    # past_key_values.i.* = cache_*.i[:, :, :kept, :]
    for buf, past in zip(n["key_buffers"] + n["value_buffers"], past_k + past_v):
        pre.append(helper.make_node("Slice", [buf, "specrt/zero", kept, "specrt/axis2"], [past]))
    # new_*.i = present.*.i[:, :, kept:, :]
    post: list[onnx.NodeProto] = []
    present = [f"present.{i}.key" for i in range(num_layers)] + [f"present.{i}.value" for i in range(num_layers)]
    for new, pres in zip(n["new_keys"] + n["new_values"], present):
        post.append(helper.make_node("Slice", [pres, kept, "specrt/int64_max", "specrt/axis2"], [new]))

    for name in ["attention_mask", "position_ids", *past_k, *past_v]:
        if name in inputs:
            g.input.remove(inputs[name])
    ids = inputs[INPUT_IDS]
    ids.type.tensor_type.shape.dim[0].ClearField("dim_param")
    ids.type.tensor_type.shape.dim[0].dim_value = 1
    g.input.append(helper.make_tensor_value_info(PAST_LENGTH, TensorProto.INT64, [1]))
    if bucketed:
        g.input.append(helper.make_tensor_value_info(BUCKET_LENGTH, TensorProto.INT64, [1]))
    for buf in n["key_buffers"] + n["value_buffers"]:
        g.input.append(helper.make_tensor_value_info(buf, cache_dtype, [1, kv_heads, max_context, head_dim]))
    nodes = list(g.node)
    del g.node[:]
    g.node.extend(pre + nodes + post)
    outputs = {o.name: o for o in g.output}
    logits = outputs[LOGITS]
    for o in list(g.output):
        g.output.remove(o)
    g.output.append(logits)
    for new in n["new_keys"] + n["new_values"]:
        g.output.append(helper.make_tensor_value_info(new, cache_dtype, [1, kv_heads, "sequence_length", head_dim]))
    # Intermediate shape annotations from the export would now be stale.
    del g.value_info[:]
    return model
