"""Weight-only quantization of an exported graph with ONNX Runtime's own tooling.

``int4`` / ``int8``: every MatMul with a constant weight (attention and MLP projections and the
LM head) becomes a ``MatMulNBits`` node (ONNX Runtime's blockwise weight-only quantizer), with the
block size and accuracy level exposed.  Embedding Gathers and the KV cache stay fp32.  The fp32
graph is verified against PyTorch *before* quantization; what quantization changes is then measured
(max |diff| and top-1 agreement with PyTorch) and written to the manifest, never hidden.

Accuracy level 4 (int8 activations) is the default: on this CPU it is about 3x faster than level 1
(fp32 compute) -- demo target, in-place graph, context 200: 5.2 ms per 1-token step against 17.5 ms
(``benchmarks/step_cost.py``).  It is not batch-invariant as such: its 1-token kernel scores a
position differently (logits off by ~0.8) from its multi-token kernel, while multi-token passes agree
with each other bit for bit.  ``runtime/invariance.py`` measures this at export and at load, and the
backend then runs 1-token target steps as 2-token passes, which keeps speculative output equal to
target-only output.  The manifest records the measurement (``batch_invariance``) and
``batch_invariant`` (False only where no padding helps; ``Engine.load`` then warns).
"""
from __future__ import annotations

import logging
from pathlib import Path

import onnx
from onnx.external_data_helper import load_external_data_for_tensor

log = logging.getLogger(__name__)
QUANT_CHOICES = ("fp32", "int8", "int4", "int8-rows")


def quantize_file(path: Path, quant: str, block_size: int = 32, accuracy_level: int = 4,
                  lm_head: bool = True) -> dict | None:
    """Quantize ``path`` in place (weights to ``<file>.data``); return the manifest record or None for fp32.
    ``lm_head=False`` leaves the output projection in fp32."""
    if quant == "fp32":
        return None
    if quant not in QUANT_CHOICES:
        raise ValueError(f"quant must be one of {QUANT_CHOICES}, got {quant!r}")
    if quant == "int8-rows":
        return quantize_rows(path, lm_head)
    try:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
    except ImportError as e:  # onnx_ir is an optional dependency of onnxruntime's quantizer
        raise RuntimeError(f"ONNX Runtime's quantizer is unavailable ({e}); pip install 'specrt[export]'") from None
    bits = 4 if quant == "int4" else 8
    model = onnx.load(str(path))
    exclude = [] if lm_head else [n.name for n in model.graph.node if "lm_head" in n.name]
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                             accuracy_level=accuracy_level, nodes_to_exclude=exclude)
    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)
    q.process()
    qmodel = q.model.model
    count = sum(1 for n in qmodel.graph.node if n.op_type == "MatMulNBits")
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(qmodel, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return {"method": "onnxruntime MatMulNBits (weight-only, blockwise, symmetric)", "bits": bits,
            "block_size": block_size, "accuracy_level": accuracy_level, "quantized_matmuls": count,
            "lm_head_quantized": lm_head,
            "batch_invariant": accuracy_level <= 1}  # until measured (export_pair replaces it)


# 7-bit weights: MLAS's u8s8 kernels without VNNI (and its 1-row path on this CPU) add pairs of u8 x s8
# products in int16 with saturation (vpmaddubsw); 255 * 63 * 2 = 32,130 never saturates, 255 * 127 * 2 can.
# A saturating kernel for one row count and an exact one for another would break row invariance.
WEIGHT_QMAX = 63.0


def quantize_rows(path: Path, lm_head: bool = True) -> dict:
    """7-bit weights (per output channel) and int8 activations quantized **per row**, multiplied by integer GEMM.

    Every MatMul with a constant weight W [K, N] becomes: s = max|x| / 127 per row of x; xq = round(x / s)
    (stored as uint8 around a zero point of 128, MLAS's fast path); y = (xq - 128) @ Wq * sw * s
    (Wq = round(W / sw), sw = max|W| / 63 per column: ``WEIGHT_QMAX``).  Integer products are exact,
    and each row's scale depends on that row alone, so a row scores the same whatever else is in a
    multi-row pass (MLAS's 1-row kernel may still differ: the runtime pads 1-token steps) -- unlike ONNX
    Runtime's dynamic quantization (one scale for the whole input: a row's result depends on the other rows) and unlike
    MatMulNBits with int8 activations (different kernels for one row and for several).  The integer GEMM
    (MLAS, VNNI on this CPU) makes extra rows nearly free; see docs/quantization.md.

    Eight nodes per MatMul: Abs, ReduceMax, Max (no zero scale), Div (the row scales), Reshape, QuantizeLinear
    (per row: divide, round half to even, add the zero point, saturate -- one node for five), MatMulIntegerToFloat
    (the integer GEMM and the column scales), Mul (the row scales).  Measured on the demo target (2 threads): a
    1,000-token prefill 1.13 s against 1.25 s for the thirteen-node form it replaces, and fewer nodes per pass
    (ONNX Runtime's dispatch costs ~3 us a node).

    In a batch graph (``input_ids`` [B, n]: several sequences per pass) QuantizeLinear's one axis cannot hold
    B x n rows, so each MatMul's input is viewed as [1, B * n, K] for the per-row part and its output reshaped back
    to [B, n, N] (two more nodes each, in that graph only).
    """
    import numpy as np
    from onnx import helper, numpy_helper

    model = onnx.load(str(path))
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    ids_input = next((i for i in g.input if i.name == "input_ids"), g.input[0])
    input_ids = ids_input.name  # [1, n] or [B, n]
    batched = bool(ids_input.type.tensor_type.shape.dim[0].dim_param)
    # every MatMul input has input_ids' n rows, but one behind a Slice (the LM head's rows from logits_from)
    sliced = {o for n in g.node if n.op_type == "Slice" for o in n.output}
    shapes: dict[str, str] = {}  # a batch graph's [1, -1, K] and [B, n, N] shape tensors, made once per size
    new_nodes, count = [], 0
    consts_added = False
    for node in g.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) == 2 else None
        if w is None or len(w.dims) != 2 or (not lm_head and "lm_head" in node.name):
            new_nodes.append(node)
            continue
        if not consts_added:
            g.initializer.extend([numpy_helper.from_array(np.array(127.0, np.float32), "q8.127"),
                                  numpy_helper.from_array(np.array(1.0, np.float32), "q8.one"),
                                  numpy_helper.from_array(np.array([128], np.uint8), "q8.zp1"),
                                  numpy_helper.from_array(np.array(128, np.uint8), "q8.zp"),
                                  numpy_helper.from_array(np.array([-1], np.int64), "q8.flat"),
                                  numpy_helper.from_array(np.array(1e-12, np.float32), "q8.eps")])
            # QuantizeLinear's per-row zero point has the rows' shape: made once per pass from input_ids' rows
            if batched:  # B x n rows
                new_nodes += [helper.make_node("Shape", [input_ids], ["q8.ids_shape"], name="q8.ids_shape"),
                              helper.make_node("ReduceProd", ["q8.ids_shape"], ["q8.rows"], name="q8.rows", keepdims=1)]
            else:
                new_nodes.append(helper.make_node("Shape", [input_ids], ["q8.rows"], name="q8.rows", start=1, end=2))
            new_nodes.append(helper.make_node("Expand", ["q8.zp1", "q8.rows"], ["q8.zp_rows"], name="q8.zp_rows"))
            consts_added = True
        W = numpy_helper.to_array(w).astype(np.float32)  # [K, N]
        sw = np.maximum(np.abs(W).max(axis=0), 1e-12) / WEIGHT_QMAX
        Wq = np.clip(np.round(W / sw), -WEIGHT_QMAX, WEIGHT_QMAX).astype(np.int8)
        p = f"{node.name}/q8"
        g.initializer.extend([numpy_helper.from_array(Wq, f"{w.name}_q8"),
                              numpy_helper.from_array(sw.astype(np.float32), f"{w.name}_q8scale")])
        x, y = node.input[0], node.output[0]
        own_rows = x in sliced or "lm_head" in node.name  # the pass's last rows (logits_from)
        if batched:  # the per-row part on a [1, B * n, K] view
            K, N = W.shape
            flat = shapes.get(f"flat{K}")
            if flat is None:
                flat = shapes[f"flat{K}"] = f"q8.flat_{K}"
                g.initializer.append(numpy_helper.from_array(np.array([1, -1, K], np.int64), flat))
            new_nodes.append(helper.make_node("Reshape", [x, flat], [f"{p}/x"], name=f"{p}/x"))
            x_in, y_out = x, y
            x, y = f"{p}/x", f"{p}/y_flat"
        zp = "q8.zp_rows"
        if own_rows:  # a zero point of their own
            zp = f"{p}/zp"
            new_nodes += [helper.make_node("Shape", [x], [f"{p}/rows"], name=f"{p}/rows", start=1, end=2),
                          helper.make_node("Expand", ["q8.zp1", f"{p}/rows"], [zp], name=zp)]
        new_nodes += [
            helper.make_node("Abs", [x], [f"{p}/abs"], name=f"{p}/abs"),
            helper.make_node("ReduceMax", [f"{p}/abs"], [f"{p}/amax"], name=f"{p}/amax", keepdims=1, axes=[-1]),
            helper.make_node("Max", [f"{p}/amax", "q8.eps"], [f"{p}/amax_eps"], name=f"{p}/amax_eps"),
            helper.make_node("Div", [f"{p}/amax_eps", "q8.127"], [f"{p}/scale"], name=f"{p}/scale"),  # [1, n, 1]
            helper.make_node("Reshape", [f"{p}/scale", "q8.flat"], [f"{p}/row_scale"], name=f"{p}/row_scale"),
            helper.make_node("QuantizeLinear", [x, f"{p}/row_scale", zp], [f"{p}/xq"], name=f"{p}/xq", axis=1),
            helper.make_node("MatMulIntegerToFloat", [f"{p}/xq", f"{w.name}_q8", "q8.one", f"{w.name}_q8scale",
                                                      "q8.zp"], [f"{p}/y_col"], name=f"{p}/mm", domain="com.microsoft"),
            helper.make_node("Mul", [f"{p}/y_col", f"{p}/scale"], [y], name=f"{p}/y"),
        ]
        if batched:  # back to [B, n, N] (the LM head: [B, rows, N])
            if own_rows:
                target = f"{p}/shape"
                new_nodes += [helper.make_node("Shape", [x_in], [f"{p}/lead"], name=f"{p}/lead", start=0, end=-1),
                              helper.make_node("Concat", [f"{p}/lead", f"q8.N_{N}"], [target], name=target, axis=0)]
            else:
                target = shapes.get(f"out{N}")
                if target is None:
                    target = shapes[f"out{N}"] = f"q8.out_{N}"
                    new_nodes.append(helper.make_node("Concat", ["q8.ids_shape", f"q8.N_{N}"], [target], name=target,
                                                      axis=0))
            if f"q8.N_{N}" not in shapes:
                shapes[f"q8.N_{N}"] = f"q8.N_{N}"
                g.initializer.append(numpy_helper.from_array(np.array([N], np.int64), f"q8.N_{N}"))
            new_nodes.append(helper.make_node("Reshape", [y, target], [y_out], name=f"{p}/y_out"))
        g.initializer.remove(w)
        del inits[w.name]
        count += 1
    del g.node[:]
    g.node.extend(new_nodes)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    data = path.with_name(path.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    return {"method": "int8 weights per channel, int8 activations per row, integer GEMM (MatMulIntegerToFloat)",
            "scheme": "int8-rows", "bits": 8, "block_size": 0, "accuracy_level": 0, "quantized_matmuls": count,
            "lm_head_quantized": lm_head, "batch_invariant": True}


PREFILL_ACCURACY_LEVEL = 1  # fp32 compute: on a CPU without VNNI it prefills fastest (docs/quantization.md)
# What an int4 target's prefill graph is (``specrt export --prefill-quant``): int8-rows (weights of its own, integer
# GEMM: ``write_rows_prefill_graph``) or level1 (the target's own int4 weights at fp32 compute: ``write_prefill_graph``).
# int8-rows is the default: MLAS runs MatMulNBits' int8 compute on VNNI at best but its integer GEMM on AMX too, and it
# prefilled 1,024 tokens in 0.83 s against 1.53 s for level1 (demo int4 target, 2 cores of a Xeon with AMX).
PREFILL_QUANTS = ("int8-rows", "level1")


def write_prefill_graph(path: Path, accuracy_level: int = PREFILL_ACCURACY_LEVEL) -> dict | None:
    """Beside a MatMulNBits graph ``path``, write ``<stem>.prefill.onnx``: the same graph whose MatMulNBits nodes
    compute at ``accuracy_level``, reading the very same weights file (only the graph proto is new, ~100 KB).
    Return its manifest record, or None where there is nothing to change (no MatMulNBits node, or every one
    already at that level).

    Why: accuracy level 4 (int8 activations) is the fastest 1-row and few-row pass on every CPU measured, but on a
    CPU without VNNI it prefills a long prompt slower than fp32 compute (1,024 tokens: 5.69 s against 4.48 s on the
    demo target, 2 AVX2 cores).  A runtime that prefills through this graph and decodes through ``path`` gets both;
    the KV cache is one and the same (``runtime/ort_backend.py``)."""
    model = onnx.load(str(path), load_external_data=False)
    changed = 0
    for node in model.graph.node:
        if node.op_type != "MatMulNBits":
            continue
        level = next((a for a in node.attribute if a.name == "accuracy_level"), None)
        if level is None:
            node.attribute.append(onnx.helper.make_attribute("accuracy_level", accuracy_level))
        elif level.i != accuracy_level:
            level.i = accuracy_level
        else:
            continue
        changed += 1
    if not changed:
        return None
    out = path.with_name(path.stem + ".prefill.onnx")
    onnx.save_model(model, str(out))  # its tensors stay where they are: <path>.data, by relative location
    return {"file": out.name, "external_data": path.name + ".data", "scheme": "matmulnbits",
            "accuracy_level": accuracy_level}


def write_rows_prefill_graph(path: Path) -> dict:
    """Beside the **fp32** graph ``path`` (before the target is quantized), write ``<stem>.prefill.onnx`` and its own
    weights file ``<stem>.prefill.onnx.data``: the same graph quantized int8-rows (``quantize_rows``).  Return its
    manifest record.

    Why: an int4 target decodes fastest through MatMulNBits (half the weight bytes of int8 per pass), but MatMulNBits
    has no kernel for the AMX units of recent Xeons, while ONNX Runtime's integer GEMM (MatMulIntegerToFloat) does:
    the int8-rows graph prefilled the demo target's 1,024-token prompt in 0.83 s against 1.53 s for the int4 graph at
    fp32 compute (``write_prefill_graph``), taking turns on 2 cores of a Xeon with AMX.  The cost is disk and memory:
    a second set of weights (the demo target: 135 MB beside the int4 graph's 198 MB; the fp32 embedding table is
    the target's, read from its file: ``share_tensors``).  Its cache entries are the int8-rows graph's numbers for
    the prompt, the int4 graph's for everything decoded after it: ``compare_prefill_graph`` measures the difference at export."""
    out = path.with_name(path.stem + ".prefill.onnx")
    data = out.with_name(out.name + ".data")
    onnx.save_model(onnx.load(str(path)), str(out), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)
    record = quantize_rows(out)
    return {"file": out.name, "external_data": data.name, "scheme": record["scheme"]}


def share_tensors(graph: Path, source: Path) -> int:
    """Point every external tensor of the ONNX file ``graph`` that ``source`` (in the same directory) also holds --
    same name, type, shape and bytes -- at ``source``'s weights file, and rewrite ``graph``'s own weights file without
    them.  Return the bytes no longer stored twice.

    Why: an int4 target's int8-rows prefill graph keeps the fp32 embedding table exactly as the target does (the
    demo target: 113 MB of its 249 MB); an ONNX tensor may read its bytes from any file by ``location`` and
    ``offset``, so the engine directory needs them once.  ONNX Runtime, and any other reader, loads each graph as
    before."""
    theirs = {}
    for t in onnx.load(str(source), load_external_data=False).graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        if "location" in ext:
            theirs[t.name] = (t.data_type, tuple(t.dims), ext)
    their_files = {hit[2]["location"] for hit in theirs.values()}
    model = onnx.load(str(graph), load_external_data=False)
    location = {t.name: {e.key: e.value for e in t.external_data}.get("location") for t in model.graph.initializer}
    own = set(location.values()) - their_files - {None}
    if len(own) > 1:
        raise ValueError(f"{graph.name}: expected one weights file of its own, found {sorted(own)}")
    if not own:
        return 0
    own_file = graph.parent / own.pop()
    shared = 0
    for t in model.graph.initializer:
        if location[t.name] != own_file.name:  # inline, or already read from ``source``'s file
            continue
        load_external_data_for_tensor(t, str(graph.parent))  # the bytes are rewritten below, shared or not
        t.data_location = onnx.TensorProto.DEFAULT
        del t.external_data[:]
        hit = theirs.get(t.name)
        if hit is None or hit[:2] != (t.data_type, tuple(t.dims)):
            continue
        ext = hit[2]
        offset, length = int(ext.get("offset", 0)), int(ext.get("length", -1))
        if length != len(t.raw_data):  # (a record without its optional length is left alone)
            continue
        with open(graph.parent / ext["location"], "rb") as f:
            f.seek(offset)
            if f.read(length) != t.raw_data:
                continue
        t.ClearField("raw_data")
        for key, value in (("location", ext["location"]), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=key, value=value)
        t.data_location = onnx.TensorProto.EXTERNAL
        shared += length
    if shared and not any(t.HasField("raw_data") and len(t.raw_data) >= 1024 for t in model.graph.initializer):
        return 0  # nothing would be left in its own weights file, which the manifest names: keep the copy
    if shared:
        own_file.unlink()  # rewritten below with the tensors that are its own alone
        onnx.save_model(model, str(graph), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=own_file.name, size_threshold=1024)
    return shared
