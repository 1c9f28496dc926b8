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

log = logging.getLogger(__name__)
QUANT_CHOICES = ("fp32", "int8", "int4")


def quantize_file(path: Path, quant: str, block_size: int = 32, accuracy_level: int = 4,
                  lm_head: bool = True) -> dict | None:
    """Quantize ``path`` in place (weights to ``<file>.data``); return the manifest record or None for fp32.
    ``lm_head=False`` leaves the output projection in fp32."""
    if quant == "fp32":
        return None
    if quant not in QUANT_CHOICES:
        raise ValueError(f"quant must be one of {QUANT_CHOICES}, got {quant!r}")
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
