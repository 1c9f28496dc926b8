"""``model``: a separate small draft model, run autoregressively with its own KV cache.

Cache bookkeeping: after ``commit`` the draft's cache holds the context up to ``length -
len(pending)``; ``pending`` (which ends with the last emitted token) has not been run by the draft.
``pending`` is one token after a rejection, two after an all-accepted step (the draft never ran its
last proposal), and grows by the committed tokens while the draft is not asked to propose (k = 0, or
another drafter proposed inside ``hybrid``).  Catching up runs through the draft's prefill stage when
pending is longer than 2, so every draft *step* is 1 or 2 tokens wide: the widths TensorRT plans
static profiles for (``runtime/tensorrt_plan.py``).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from specrt.runtime.acceptance import sample
from specrt.runtime.backend import ModelStep
from specrt.runtime.drafters.base import Drafter, KeepDrafting, Proposal, empty, tree_proposal
from specrt.runtime.sampling import SamplingParams, check_finite, softmax, top_prob, warp

STEP_WIDTHS = (1, 2)  # the draft's planned step widths; longer catch-ups go through extend()
BRANCHES = 3  # a tree's branches at the first position: the draft's top choices
MIN_BRANCH_P = 0.05  # a runner-up below this draft probability makes no branch


class ModelDrafter(Drafter):
    name = "model"

    def __init__(self, draft: ModelStep, max_k: int = 8, want_top: bool = False):
        self.draft = draft
        self.max_context = draft.max_context
        self.want_top = want_top  # record the draft's top probability per token (traces)
        self._ids = np.zeros(max_k, dtype=np.int64)  # [max_k]
        self._probs: np.ndarray | None = None  # [max_k, vocab_draft], allocated on the first sampled proposal
        self.length = 0  # context length
        self.pending: list[int] = []
        self._proposed = 0  # tokens of the last proposal (the draft ran all but the last one)
        self._tree = False  # the last proposal was a tree

    def begin(self, prompt_ids: np.ndarray, features: np.ndarray | None = None) -> None:
        if len(prompt_ids) > 1:
            self.draft.prefill(np.asarray(prompt_ids[:-1], dtype=np.int64))
        else:
            self.draft.set_length(0)
        self.length, self.pending, self._proposed = len(prompt_ids), [int(prompt_ids[-1])], 0

    def propose(self, k: int, sampling: SamplingParams, rng: np.random.Generator,
                keep_drafting: KeepDrafting | None = None) -> Proposal:
        self._proposed = 0
        k = min(k, len(self._ids))
        if k < 1:
            return empty()
        feed, pos = self.pending, self.length - len(self.pending)
        if len(feed) > STEP_WIDTHS[-1]:
            self.draft.extend(np.asarray(feed[:-1], dtype=np.int64), pos)
            feed, pos = feed[-1:], pos + len(feed) - 1
        greedy = sampling.greedy
        if not greedy and self._probs is None:
            self._probs = np.zeros((len(self._ids), self.draft.vocab_size))
        tops: list[float] = []
        want_top = self.want_top or keep_drafting is not None
        proposed = 0
        while proposed < k:
            logits = self.draft.forward(np.asarray(feed, dtype=np.int64), pos)[-1]  # [vocab_draft]
            check_finite(logits, "draft", pos)
            pos += len(feed)
            if greedy:
                token = int(logits.argmax())
                top = top_prob(logits) if want_top else 1.0
            else:
                token = draft_sample(logits, sampling, rng, self._probs[proposed])
                top = float(self._probs[proposed].max())
            self._ids[proposed] = token
            feed = [token]
            proposed += 1
            if self.want_top:
                tops.append(round(top, 4))
            if keep_drafting is not None and not keep_drafting(top):
                break
        self._proposed = proposed
        return Proposal(self._ids[:proposed], None if greedy else self._probs[:proposed],
                        tops if self.want_top else None)

    def propose_tree(self, k: int, nodes: int, sampling: SamplingParams, rng: np.random.Generator) -> Proposal:
        """The draft's greedy chain, then its runners-up at the first position, each continued greedily, as
        branches, within ``nodes`` nodes.  Every node is one 1-token draft step; between branches the draft's
        cache rolls back to the root by length.  Candidates are deterministic (verified with q one-hot)."""
        self._proposed = 0
        k = min(k, len(self._ids))
        if k < 1 or nodes < 1:
            return empty()
        feed, pos = self.pending, self.length - len(self.pending)
        if len(feed) > STEP_WIDTHS[-1]:
            self.draft.extend(np.asarray(feed[:-1], dtype=np.int64), pos)
            feed, pos = feed[-1:], pos + len(feed) - 1
        root = self.draft.forward(np.asarray(feed, dtype=np.int64), pos)[-1]
        check_finite(root, "draft", pos)
        root_probs = softmax(root)
        first = np.argsort(-root_probs)[:BRANCHES]
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        for b, token in enumerate(first):
            if len(tokens) >= nodes or (b and root_probs[token] < MIN_BRANCH_P):
                break
            self.draft.set_length(self.length)  # back to the root: the context, `last` included
            parent, score, t, depth = -1, float(root_probs[token]), int(token), 1
            while True:
                tokens.append(t)
                parents.append(parent)
                scores.append(score)
                parent = len(tokens) - 1
                if depth >= k or len(tokens) >= nodes:
                    break
                logits = self.draft.forward(np.array([t], dtype=np.int64), self.length + depth - 1)[-1]
                check_finite(logits, "draft", self.length + depth - 1)
                probs = softmax(logits)
                t = int(probs.argmax())
                score *= float(probs[t])
                depth += 1
        self._tree = True
        return tree_proposal(tokens, parents, scores)

    def commit(self, accepted_ids: Sequence[int], next_id: int, features: np.ndarray | None = None,
               logits: np.ndarray | None = None) -> None:
        accepted, proposed = len(accepted_ids), self._proposed
        if self._tree:  # after a tree the cache holds some branch: back to the root, the rest waits
            self._tree = False
            self.draft.set_length(self.length)
            self.pending = [*map(int, accepted_ids), int(next_id)]
            self.length += accepted + 1
            return
        if proposed == 0:
            # Not drafted this step (k = 0, or another drafter proposed): the committed tokens wait.
            self.pending.extend(map(int, accepted_ids))
            self.pending.append(int(next_id))
        elif accepted < proposed:
            self.draft.set_length(self.length + accepted)  # `last` + accepted proposals
            self.pending = [int(next_id)]
        else:
            # All accepted: the draft never ran its last proposal; it catches up with next_id.
            self.pending = [int(self._ids[proposed - 1]), int(next_id)]
        self.length += accepted + 1
        self._proposed = 0

    def end(self) -> None:
        self.pending, self._proposed = [], 0


def draft_sample(logits: np.ndarray, sampling: SamplingParams, rng: np.random.Generator, probs_out: np.ndarray) -> int:
    """Sample a draft token; ``probs_out`` receives q, the distribution it was *actually* drawn from
    (the acceptance rule is only lossless if these two agree)."""
    probs_out[:] = warp(logits, sampling)
    return sample(probs_out, rng)
