"""Weight-only quantization of an exported graph with ONNX Runtime's own tooling.

``int4`` / ``int8``: every MatMul with a constant weight (attention and MLP projections and the
LM head) becomes a ``MatMulNBits`` node (ONNX Runtime's blockwise weight-only quantizer), with the
block size and accuracy level exposed.  Embedding Gathers and the KV cache stay fp32.  The fp32
graph is verified against PyTorch *before* quantization; what quantization changes is then measured
(max |diff| and top-1 agreement with PyTorch) and written to the manifest, never hidden.

Accuracy level 1 (fp32 compute) is the target's default because it is *batch-invariant*: a token's
logits do not depend on the other tokens of the pass (measured on the demo int4 target: the same
position scored in a 1-token and in a 3-token pass differs by at most 6e-5 in any logit, like fp32's
2-3e-5).  Level 4 (int8 activations) is much faster on this CPU (demo target, in-place graph, context
200: 5.2 ms per 1-token step against 17.5 ms at level 1) but computes a multi-token pass differently
(the same comparison: logits differ by 0.3-0.5), so a (k+1)-token verification can pick another token
than 1-token decoding.  The manifest records ``batch_invariant`` and ``Engine.load`` warns on a target
that is not.  The draft defaults to level 4: its numerics change the acceptance, never the output.
"""
from __future__ import annotations

import logging
from pathlib import Path

import onnx

log = logging.getLogger(__name__)
QUANT_CHOICES = ("fp32", "int8", "int4")


def quantize_file(path: Path, quant: str, block_size: int = 32, accuracy_level: int = 1) -> dict | None:
    """Quantize ``path`` in place (weights to ``<file>.data``); return the manifest record or None for fp32."""
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
    q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=True,
                             accuracy_level=accuracy_level)
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
            "batch_invariant": accuracy_level <= 1}
