"""Scripted fakes shared by the loop and drafter tests."""
from __future__ import annotations

import numpy as np
from specrt.runtime.backend import ModelStep

VOCAB = 11


class FakeStep(ModelStep):
    """A deterministic 'model': the next token is a function of the last 3 context tokens.

    It keeps the tokens it has been run on *by position*, exactly like a KV cache, and its logits
    depend on that stored context — so any bookkeeping mistake in the loop (a stale entry, a
    skipped catch-up, a wrong position) changes the output.
    """

    def __init__(self, salt: int, max_context: int = 64, agree_with: FakeStep | None = None, agree: float = 1.0):
        self.salt, self.max_context, self.vocab_size = salt, max_context, VOCAB
        self.cache = np.full(max_context, -1, dtype=np.int64)
        self.length = 0
        self.agree_with, self.agree = agree_with, agree
        self.calls = 0
        self.extends: list[tuple[int, int]] = []
        self.widths: list[tuple[int, int]] = []  # (n, pos) of every step() call

    def next_token(self, context: np.ndarray) -> int:
        if self.agree_with is not None:
            t = self.agree_with.next_token(context)
            h = (int(context[-3:].sum()) * 7 + len(context) * 13) % 100
            return t if h < 100 * self.agree else (t + 1) % VOCAB
        return int((context[-3:] * [3, 5, 7][-len(context[-3:]):]).sum() + self.salt) % VOCAB

    def forward(self, token_ids, pos, *, tree=None, inputs=None, last_only=False):
        assert tree is None, "a fake chain model"
        assert 0 <= pos <= self.length, (pos, self.length)
        n = len(token_ids)
        self.widths.append((n, pos))
        assert pos + n <= self.max_context
        self.cache[pos:pos + n] = token_ids
        self.length = pos + n
        self.calls += 1
        logits = np.zeros((n, VOCAB), dtype=np.float32)
        for i in range(n):
            logits[i, self.next_token(self.cache[: pos + i + 1])] = 1.0
        return logits

    def set_length(self, length):
        assert 0 <= length <= self.length
        self.length = length

    def prefill(self, token_ids):
        self.length = 0
        return self.extend(token_ids, 0)

    def extend(self, token_ids, pos):
        self.extends.append((len(token_ids), pos))
        widths = len(self.widths)
        out = self.forward(token_ids, pos)[-1]
        del self.widths[widths:]  # a prefill-stage run, not a step
        return out
