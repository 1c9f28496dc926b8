"""Prove an exported model equals its checkpoint: ONNX Runtime (through the
runtime's own step, KV cache and all) against transformers' PyTorch forward
with transformers' own KV cache, for a prefill, a 1-token decode step and a
(k+1)-token verification step."""
from __future__ import annotations

import numpy as np
import torch
from specrt.runtime.manifest import ModelSpec
from specrt.runtime.ort_backend import OrtModelStep


def compare(spec: ModelSpec, hf_model, k: int, prompt_len: int = 12, seed: int = 0,
            vocab_limit: int | None = None) -> dict[str, float]:
    """Max |ORT - PyTorch| logits difference per phase (prefill / decode / verify_k)."""
    rng = np.random.default_rng(seed)
    hi = min(vocab_limit or spec.vocab_size, spec.vocab_size)
    ids = rng.integers(0, hi, size=prompt_len + 1 + k + 1, dtype=np.int64)
    phases = [("prefill", 0, prompt_len), ("decode", prompt_len, prompt_len + 1),
              (f"verify_k{k}", prompt_len + 1, prompt_len + 2 + k)]
    step = OrtModelStep(spec, threads=None)
    diffs: dict[str, float] = {}
    past = None
    with torch.no_grad():
        for name, start, stop in phases:
            ort_logits = step.step(ids[start:stop], start).copy()  # [n, vocab]
            out = hf_model(torch.from_numpy(ids[None, start:stop]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            ref = out.logits[0].float().numpy()[:, : ort_logits.shape[1]]
            diffs[name] = float(np.abs(ort_logits - ref).max())
            diffs[f"{name}_argmax_equal"] = float((ort_logits.argmax(-1) == ref.argmax(-1)).all())
    return diffs
