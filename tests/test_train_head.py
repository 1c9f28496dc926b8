"""``scripts/train_head.py``: what a training batch weighs."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import batch_gen
import train_head


def _shard(tokens: list[int]) -> dict:
    n = len(tokens)
    top_ids = np.zeros((n, 8), np.int32)
    top_ids[:-1, 0] = tokens[1:]  # the verifier's first choice at each row: the next token, sure of it
    top_logp = np.full((n, 8), -30, np.float16)
    top_logp[:, 0] = 0
    return {"features": np.zeros((n, 1, 4), np.float16), "layers_idx": [0], "tokens": np.asarray(tokens, np.int32),
            "top_ids": top_ids, "top_logp": top_logp, "roles": np.ones(n, np.uint8),
            "starts": np.array([0, n], np.int64)}


def test_repeat_weight_scales_the_slots_whose_token_repeats_an_earlier_16_gram():
    tokens = list(range(1, 41)) + list(range(1, 31))  # the second run repeats the first: its 16-grams recur
    shard = _shard(tokens)
    seqs = [(0, 0, len(tokens), "s", "f")]
    to_draft = np.arange(64)

    def weight(repeat_weight: float) -> np.ndarray:
        batch = train_head.Batches([shard], seqs, to_draft, T=128, B=1, seed=0, repeat_weight=repeat_weight)()
        return batch[4].numpy()[0]

    plain, down = weight(1.0), weight(0.25)
    t = len(tokens) - 1
    copied = batch_gen.repeated(tokens)[2:t + 2]  # slot s is trained on the token at s + 2
    copied = np.pad(copied, (0, t - len(copied)))
    assert copied.any() and (plain[:t][~copied] > 0).any()
    np.testing.assert_allclose(down[:t], plain[:t] * np.where(copied, 0.25, 1.0))
    np.testing.assert_array_equal(down[t:], 0)
