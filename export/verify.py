"""Prove an exported model equals its checkpoint: ONNX Runtime (through the
runtime's own step, KV cache and all) against transformers' PyTorch forward
with transformers' own KV cache, for a prefill, a 1-token decode step and a
(k+1)-token verification step."""
from __future__ import annotations

import numpy as np
import torch
from specrt.runtime.manifest import ModelSpec
from specrt.runtime.ort_backend import OrtModel, OrtModelStep


def first_choice_agreement(logits: np.ndarray, ref: np.ndarray) -> float:
    """The share of rows [n, vocab] whose argmax agrees (1.0: every row; the CLI prints it as a percentage)."""
    return float((logits.argmax(-1) == ref.argmax(-1)).mean())


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
            ort_logits = step.forward(ids[start:stop], start).copy()  # [n, vocab]
            out = hf_model(torch.from_numpy(ids[None, start:stop]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            ref = out.logits[0].float().numpy()[:, : ort_logits.shape[1]]
            diffs[name] = float(np.abs(ort_logits - ref).max())
            diffs[f"{name}_argmax_equal"] = first_choice_agreement(ort_logits, ref)
    return diffs


def compare_prefill_graph(spec: ModelSpec, token_ids: list[int], decode: int = 8) -> dict[str, float]:
    """A target's prefill graph against the target graph itself, as the runtime uses it: the text but its last
    ``decode`` tokens prefilled (every row's logits compared), then those tokens decoded one at a time through the
    target graph over each cache.  Max |logits| difference and the share of argmaxes that agree, per phase."""
    ids = np.asarray(token_ids, dtype=np.int64)
    n = len(ids) - decode
    if n < 1:
        raise ValueError(f"compare_prefill_graph needs more than {decode} tokens, got {len(ids)}")
    target = OrtModel(spec, prefill_graph="off")  # one session of the target graph, for both caches
    ref, fast = OrtModelStep(target), OrtModelStep(spec.prefill_graph)
    after_fast = OrtModelStep(target, cache=fast.cache)  # the target graph, decoding over the prefill graph's cache
    a, b = ref.forward(ids[:n], 0).copy(), fast.forward(ids[:n], 0).copy()
    diffs = {"prefill": float(np.abs(a - b).max()), "prefill_argmax_equal": first_choice_agreement(a, b)}
    a = np.concatenate([ref.forward(ids[i:i + 1], i).copy() for i in range(n, len(ids))])
    b = np.concatenate([after_fast.forward(ids[i:i + 1], i).copy() for i in range(n, len(ids))])
    diffs.update({"decode": float(np.abs(a - b).max()), "decode_argmax_equal": first_choice_agreement(a, b)})
    return {k: round(v, 6) for k, v in diffs.items()}


# Held-out text for the drift of a quantized model: prose and code, not from any training set of ours.
HELD_OUT_TEXT = (
    "The lighthouse keeper climbed the spiral stairs every evening at dusk, counting the steps out of habit "
    "rather than need. From the top he could see the fishing boats returning, their lamps swaying like "
    "fireflies over the dark water, and he wrote their names in a worn ledger before the fog rolled in.\n\n"
    "def merge_sorted(a, b):\n"
    "    \"\"\"Merge two sorted lists into one sorted list.\"\"\"\n"
    "    out, i, j = [], 0, 0\n"
    "    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n"
    "            out.append(a[i]); i += 1\n"
    "        else:\n"
    "            out.append(b[j]); j += 1\n"
    "    return out + a[i:] + b[j:]\n\n"
    "Photosynthesis converts light energy into chemical energy: chlorophyll absorbs mostly red and blue "
    "light, water is split to release oxygen, and carbon dioxide is fixed into sugars in the Calvin cycle."
)


def text_drift(spec: ModelSpec, hf_model, token_ids: list[int]) -> dict[str, float]:
    """A (quantized) exported model against the fp32 checkpoint on real text: top-1 agreement of
    next-token predictions and both perplexities."""
    ids = np.asarray(token_ids, dtype=np.int64)
    step = OrtModelStep(spec, threads=None)
    ort_logits = np.concatenate([step.forward(ids[s:s + 64], s).copy() for s in range(0, len(ids), 64)])
    with torch.no_grad():
        ref = hf_model(torch.from_numpy(ids[None])).logits[0].float().numpy()[:, : ort_logits.shape[1]]

    def perplexity(logits: np.ndarray) -> float:
        z = logits[:-1] - logits[:-1].max(-1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
        return float(np.exp(-logp[np.arange(len(ids) - 1), ids[1:]].mean()))

    return {"tokens": len(ids), "top1_agreement": first_choice_agreement(ort_logits, ref),
            "perplexity_fp32": perplexity(ref), "perplexity_quantized": perplexity(ort_logits)}

