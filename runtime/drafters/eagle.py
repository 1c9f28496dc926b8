"""``eagle``: a feature-level draft head that reads the target's own hidden states (EAGLE-3 style).

The head (``export/feature_head.py``) has one decoder layer with its own KV cache.  Slot i holds the
target's features at position i and the token at i + 1, and predicts the token at i + 2.  Bookkeeping,
with ``length`` the head's cache length:

    after begin / commit   slots 0 .. L - 2 hold real target features (L = the context length; the
                           first slots are the prompt's last ``PROMPT_WINDOW`` only, and every head
                           position is counted from there -- rotary attention sees distances alone); the
                           last slot's logits predict token L (the one after ``last``) -> proposal 1
    propose(k)             k - 1 more slots, each fed the head's own previous output (``use_target`` 0)
                           and the previous proposal: proposals 2 .. k
    commit(a, next, f)     keep the a + 1 committed tokens with the target's features of the verification
                           rows 0 .. a; the next propose first rolls back to L - 1 and runs one pass over
                           every commit kept since (``use_target`` 1)

So per target pass the head runs one pass of up to k + 1 rows and k - 1 passes of one row -- fewer where a
hybrid's context match drafts some steps: the head then catches up on several commits in one pass.  That pays
because a head pass costs little more for more rows, and the first after a target pass most: the target's
weights have pushed the head's out of the caches (int8-rows demo target, 2 cores of an AMD EPYC: 1.2 ms a head
pass between target passes against 0.4 ms back to back).

The head's logits cover a reduced draft vocabulary; ``vocab_map[j]`` is the target id of draft logit j.  For sampling, q
over the target vocabulary is q over the draft vocabulary placed at those ids (zero elsewhere: a token
the head cannot propose, which the acceptance rule handles like any other q).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from specrt.runtime.backend import PREFILL_CHUNK
from specrt.runtime.drafters.base import Drafter, KeepDrafting, Proposal, empty, tree_proposal
from specrt.runtime.drafters.model import BRANCHES, MIN_BRANCH_P, draft_sample
from specrt.runtime.sampling import SamplingParams, check_finite, softmax, top_prob

# The head follows only the prompt's last this-many slots (None: all of them).  Its pass over a prompt is its own
# compute (~90 ms for 800 tokens here, a tenth of the target's prefill); the target's features already carry the
# far context.  Measured on Spec-Bench's RAG, summarisation and QA turns (hybrid tree 32, two rounds): a window of
# 256 kept tokens per pass (RAG 2.68 either way) and cut the head's prefill share, +2.6% tok/s on RAG and
# summarisation; 64 cost RAG 0.03 tokens per pass.
PROMPT_WINDOW: int | None = 256


class EagleDrafter(Drafter):
    name = "eagle"
    needs_features = True

    def __init__(self, head, vocab_map: np.ndarray, target_vocab: int, max_k: int = 8, want_top: bool = False,
                 prompt_window: int | None = PROMPT_WINDOW):
        fh = head.spec.feature_head
        self.head = head
        self.max_context = head.max_context
        self.vocab_map = vocab_map  # [draft vocab] -> target ids
        self.target_vocab = target_vocab
        self.want_top = want_top
        self.prompt_window = prompt_window
        self._hidden_in, self._features_in = fh["hidden_input"], fh["features_input"]
        self._select, self._hidden_out = fh["select_input"], fh["hidden_output"]
        self._use_target, self._use_own = np.ones(1, np.int64), np.zeros(1, np.int64)
        rows = max(max_k + 1, PREFILL_CHUNK)
        self._no_hidden = np.zeros((1, rows, fh["hidden_size"]), np.float32)
        self._no_features = np.zeros((1, rows, fh["feature_size"]), np.float32)
        self._ids = np.zeros(max_k, dtype=np.int64)
        self._probs: np.ndarray | None = None  # [max_k, target vocab], on the first sampled proposal
        self._hidden = np.zeros((1, 1, fh["hidden_size"]), np.float32)  # the last slot's hidden_out
        self._logits: np.ndarray | None = None  # the last slot's logits [draft vocab]: proposal 1
        self.length = 0
        self._pending: list[tuple[np.ndarray, np.ndarray]] = []  # commits the head has not run yet: (ids, features)

    def _run_real(self, token_ids: np.ndarray, features: np.ndarray, pos: int) -> None:
        """Slots [pos, pos + n) with the target's features; keep the last slot's logits and hidden state."""
        for start in range(0, len(token_ids), PREFILL_CHUNK):
            ids = token_ids[start:start + PREFILL_CHUNK]
            n = len(ids)
            logits = self.head.forward(ids, pos + start, inputs={
                self._hidden_in: self._no_hidden[:, :n], self._features_in: features[None, start:start + n],
                self._select: self._use_target}, last_only=True)  # the next proposal reads the last row only
        check_finite(logits[-1], "draft head", pos)
        self._logits = logits[-1].copy()
        self._hidden[0, 0] = self.head.output(self._hidden_out)[-1]
        self.length = pos + len(token_ids)

    def begin(self, prompt_ids: np.ndarray, features: np.ndarray | None = None) -> None:
        """``features``: the target's, for the prompt's first L - 1 tokens [L - 1, F] (its prefill)."""
        self.head.set_length(0)
        self.length, self._logits, self._pending = 0, None, []
        if len(prompt_ids) > 1:
            assert features is not None and len(features) == len(prompt_ids) - 1, "the head needs the prompt's features"
            # the prompt's last slots only: rotary makes attention depend on distances alone, so the window's slots
            # at head positions 0.. score exactly as they would further along
            skip = 0 if self.prompt_window is None else max(0, len(features) - self.prompt_window)
            self._run_real(np.asarray(prompt_ids[1 + skip:], dtype=np.int64),
                           np.ascontiguousarray(features[skip:], np.float32), 0)

    def _choose(self, logits: np.ndarray, sampling: SamplingParams, rng: np.random.Generator, i: int,
                want_top: bool = False) -> tuple[int, float]:
        if sampling.greedy:
            j = int(logits.argmax())
            return int(self.vocab_map[j]), (top_prob(logits) if want_top else 1.0)
        q_draft = np.zeros(len(logits))
        j = draft_sample(logits, sampling, rng, q_draft)
        self._probs[i] = 0.0
        self._probs[i, self.vocab_map] = q_draft  # q over the target vocabulary: zero outside the draft's
        return int(self.vocab_map[j]), float(q_draft.max())

    def propose(self, k: int, sampling: SamplingParams, rng: np.random.Generator,
                keep_drafting: KeepDrafting | None = None) -> Proposal:
        k = min(k, len(self._ids))
        if k >= 1:
            self._catch_up()
        if k < 1 or self._logits is None:
            return empty()
        if not sampling.greedy and self._probs is None:
            self._probs = np.zeros((len(self._ids), self.target_vocab))
        tops: list[float] = []
        logits, hidden, pos = self._logits, self._hidden, self.length
        proposed = 0
        want_top = self.want_top or keep_drafting is not None  # the confidence policy reads the top probability
        while True:
            token, top = self._choose(logits, sampling, rng, proposed, want_top)
            self._ids[proposed] = token
            proposed += 1
            if self.want_top:
                tops.append(round(top, 4))
            if proposed >= k or (keep_drafting is not None and not keep_drafting(top)):
                break
            # the next slot: the head's own output in place of the target's features
            logits = self.head.forward(self._ids[proposed - 1:proposed], pos, inputs={
                self._hidden_in: hidden, self._features_in: self._no_features[:, :1], self._select: self._use_own})[-1]
            check_finite(logits, "draft head", pos)
            hidden = self.head.output(self._hidden_out)[None, -1:].copy()  # never an input aliasing an output
            pos += 1
        return Proposal(self._ids[:proposed], None if sampling.greedy else self._probs[:proposed],
                        tops if self.want_top else None)

    def propose_tree(self, k: int, nodes: int, sampling: SamplingParams, rng: np.random.Generator) -> Proposal:
        """The head's greedy chain, with its runners-up at every depth as leaves beside it, within ``nodes``.

        The runners-up come from the logits the chain computes anyway, so the tree costs the chain's head
        calls (k - 1, one row each) and no more: continuing each runner-up would cost a head call per
        branch and depth (the head's graph has no tree attention to score a depth's nodes at once), more
        than the tokens those branches add (measured on Spec-Bench: the hybrid tree's passes took 67 ms
        against the recycled tree's 49)."""
        k = min(k, len(self._ids))
        if k >= 1 and nodes >= 1:
            self._catch_up()
        if k < 1 or nodes < 1 or self._logits is None:
            return empty()
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        probs, hidden, pos, parent, score = softmax(self._logits), self._hidden, self.length, -1, 1.0
        for depth in range(k):
            ranked = np.argsort(-probs)[:BRANCHES]
            best = len(tokens)
            for b, j in enumerate(ranked):
                if len(tokens) >= nodes or (b and probs[j] < MIN_BRANCH_P):
                    break
                tokens.append(int(self.vocab_map[j]))
                parents.append(parent)
                scores.append(score * float(probs[j]))
            parent, score = best, scores[best]
            if len(tokens) >= nodes or depth + 1 >= k:
                break
            logits = self.head.forward(np.array([tokens[best]], dtype=np.int64), pos, inputs={
                self._hidden_in: hidden, self._features_in: self._no_features[:, :1], self._select: self._use_own})[-1]
            check_finite(logits, "draft head", pos)
            hidden = self.head.output(self._hidden_out)[None, -1:].copy()
            probs = softmax(logits)
            pos += 1
        return tree_proposal(tokens, parents, scores)

    def commit(self, accepted_ids: Sequence[int], next_id: int, features: np.ndarray | None = None,
               logits: np.ndarray | None = None) -> None:
        """``features``: the target's for the verification rows 0 .. len(accepted_ids) [a + 1, F]."""
        assert features is not None and len(features) == len(accepted_ids) + 1, "the head needs the committed features"
        # run on the next proposal, not now: a context match may draft the next steps (hybrid), and then one pass
        # takes several commits.  A copy: the target's feature buffer is rewritten by its next pass.
        self._pending.append((np.array([*accepted_ids, next_id], dtype=np.int64), np.array(features, np.float32)))

    def _catch_up(self) -> None:
        """One pass over the commits kept since the head last ran, from the slot after the last real one."""
        if not self._pending:
            return
        self.head.set_length(self.length)  # drop the slots the proposals ran
        pending, self._pending = self._pending, []
        ids = pending[0][0] if len(pending) == 1 else np.concatenate([p[0] for p in pending])
        features = pending[0][1] if len(pending) == 1 else np.concatenate([p[1] for p in pending])
        self._run_real(ids, features, self.length)

    def end(self) -> None:
        self._logits, self._pending = None, []
