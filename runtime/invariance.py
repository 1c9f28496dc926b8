"""Is a position's logits independent of the pass it sits in?  The condition for lossless speculation.

Speculative output equals target-only output only if a (k+1)-token verification pass scores each row
exactly as 1-token decoding does.  fp32 kernels agree to rounding; ONNX Runtime's MatMulNBits with
int8 activations (accuracy level 4) does not: on the machines measured here its 1-token kernel
differs from its multi-token kernel by ~0.8 in the logits, while multi-token passes agree with each
other bit for bit.  Such a model is made row-invariant by never running a 1-token pass: the backend
pads 1-token steps to 2 rows.  Which case holds depends on the CPU's kernels, so it is measured --
at export (recorded in the manifest) and again when an engine with a quantized target is loaded.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from specrt.runtime.backend import ModelStep

TOLERANCE = 1e-3  # above fp32 rounding (~3e-5 measured), far below the int8-activation effect (~0.8)


@dataclass(frozen=True)
class RowInvariance:
    single_vs_multi: float  # max |logit| difference: n 1-token steps vs one n-token pass
    multi_vs_multi: float  # the same positions as other rows of other multi-token passes
    min_rows: int | None  # 1: passes agree; 2: pad 1-token steps; None: not row-invariant

    def as_dict(self) -> dict:
        return {"single_vs_multi": round(self.single_vs_multi, 8), "multi_vs_multi": round(self.multi_vs_multi, 8),
                "min_rows": self.min_rows}


def integer_activations(quantization: dict | None) -> bool:
    """Whether a quantized target multiplies int8 activations (int8-rows; MatMulNBits at accuracy level 4)."""
    if not quantization:
        return False
    return quantization.get("scheme") == "int8-rows" or quantization.get("accuracy_level") == 4


def measure(step: ModelStep, prompt_len: int = 24, n: int = 5, seed: int = 1,
            vocab_limit: int | None = None, trust_single: bool = True) -> RowInvariance:
    """Measure on this machine, with ``step``'s own session (its cache is reset; padding is off
    while measuring and left as it was).

    ``trust_single=False`` (integer-activation targets): 1-token passes are padded whatever this probe
    shows.  A probe can only prove a difference, never its absence, and MLAS's integer GEMM for one row
    is another kernel than for several: on random tokens the int8-rows demo target's 1-row pass agreed
    with multi-row passes (7.6e-6), on a real chat prompt it differed by 1.5 in the logits and changed
    greedy tokens.  Multi-row passes of the same kernel agree bit for bit on both."""
    rng = np.random.default_rng(seed)
    hi = min(vocab_limit or step.vocab_size, step.vocab_size)
    ids = rng.integers(0, hi, size=prompt_len + n, dtype=np.int64)
    p = prompt_len
    saved, step.min_rows = step.min_rows, 1
    try:
        step.prefill(ids[:p])
        multi = step.forward(ids[p:p + n], p).copy()
        step.set_length(p)
        single = np.stack([step.forward(ids[p + i:p + i + 1], p + i)[0].copy() for i in range(n)])
        step.set_length(p)
        step.forward(ids[p:p + 2], p)
        shifted = step.forward(ids[p + 2:p + n], p + 2).copy()
        step.set_length(p)
        padded = []
        for i in range(n):
            padded.append(step.forward(np.array([ids[p + i], ids[p + i]]), p + i)[0].copy())
            step.set_length(p + i + 1)
        step.set_length(0)
    finally:
        step.min_rows = saved
    single_vs_multi = float(np.abs(single - multi).max())
    multi_vs_multi = max(float(np.abs(shifted - multi[2:]).max()), float(np.abs(np.stack(padded) - multi).max()))
    min_rows = 1 if single_vs_multi <= TOLERANCE and trust_single else 2 if multi_vs_multi <= TOLERANCE else None
    return RowInvariance(single_vs_multi, multi_vs_multi, min_rows)
