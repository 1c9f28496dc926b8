"""``recycle``: the target's own next-token predictions, kept and proposed again (Token Recycling).

Every verification pass computes the target's logits for each row, and a row's input token is known:
so each committed row says which tokens the target thought likeliest *after that token* (in that
context).  ``RecycleTable`` (one per engine, shared by its generations, like the suffix cache) keeps,
for every token id, the top ``WIDTH`` of the latest such prediction -- a [vocab, WIDTH] array, 1.5 MB
for a 49k vocabulary.  A proposal walks the table from the last token: a chain follows each token's
first candidate; a tree expands best-first by the product of per-rank acceptance rates (how often the
table's rank-r candidate turned out to be the target's next token, counted as the drafter runs, from
priors measured by ``benchmarks/recycle_replay.py``), up to ``nodes`` nodes and k deep.  Luo et al.,
"Turning Trash into Treasure: Accelerating Inference of Large Language Models with Token Recycling"
(arXiv 2408.08696), do the same with a static tree.

It needs nothing but the target: no draft model, no training.  The table is stale by design (a
prediction made in another context), which verification makes harmless: it only costs rows.  Costs
per step: a top-``WIDTH`` over the committed rows' logits (about 0.1 ms per row at a 49k vocabulary,
rows = accepted + 1, not the whole tree) and a few hundred Python operations for a tree of 32 -- nothing
proportional to the context.  Alone it is a weak drafter (the next token given only the previous
one); beside context matching (``ngram+recycle``) it fills the steps without a match.
"""
from __future__ import annotations

import heapq
import threading
from collections.abc import Sequence

import numpy as np
from specrt.runtime.drafters.base import Drafter, KeepDrafting, Proposal, empty, tree_proposal
from specrt.runtime.drafters.ngram import MIN_NODE_P
from specrt.runtime.errors import GenerationError
from specrt.runtime.sampling import SamplingParams

WIDTH = 8  # candidates kept per token id
# How often the rank-r candidate was the target's next token, before this table has seen any (measured by
# benchmarks/recycle_replay.py over the demo verifier's greedy Spec-Bench outputs), and what that prior weighs:
# 20 observations, washed out within the first generation.
PRIOR_RATES = (0.43, 0.09, 0.04, 0.025, 0.02, 0.02, 0.015, 0.013)
PRIOR_WEIGHT = 20.0
MIN_TREE_SCORE = 1e-3  # a tree node scored below this is not worth a row anywhere


class RecycleTable:
    """For every token id, the target's latest top-``width`` next tokens (-1: none yet), and per-rank hit rates.

    Thread-safe for updates; a proposal reads rows without the lock (a row torn by a concurrent update is
    only a worse proposal: verification decides what is emitted)."""

    def __init__(self, vocab_size: int, width: int | None = None):
        """``width``: candidates kept per token id (default ``WIDTH``, at most the vocabulary)."""
        if width is None and isinstance(vocab_size, int):
            width = max(1, min(WIDTH, vocab_size))
        if not (isinstance(vocab_size, int) and vocab_size >= 1 and isinstance(width, int) and
                1 <= width <= min(len(PRIOR_RATES), vocab_size)):
            raise GenerationError(f"a recycle table needs vocab_size >= 1 and 1 <= width <= min({len(PRIOR_RATES)}, "
                                  f"vocab_size), got {vocab_size!r}, {width!r}")
        self.vocab_size, self.width = vocab_size, width
        self._none = np.full(width, -1, dtype=np.int32)
        # [vocab, width], allocated when the first prediction is recorded (engines that never recycle never hold it)
        self.next_ids = np.full((0, width), -1, dtype=np.int32)
        self.lock = threading.Lock()
        self.clear()

    def clear(self) -> None:
        with self.lock:
            self.next_ids.fill(-1)
            self._hits = np.array(PRIOR_RATES[:self.width]) * PRIOR_WEIGHT
            self._tries = np.full(self.width, PRIOR_WEIGHT)

    def candidates(self, token: int) -> np.ndarray:
        """[width] the latest top next tokens after ``token`` (-1: none) -- a copy: a concurrent ``record`` or
        ``clear`` cannot change it under the caller."""
        table = self.next_ids
        return table[token].copy() if 0 <= token < len(table) else self._none

    def rates(self) -> np.ndarray:
        """[width]: the running rate at which the rank-r candidate was the target's next token."""
        return self._hits / self._tries

    def record(self, input_ids: Sequence[int], logits: np.ndarray) -> None:
        """The target's logits [rows, vocab] for rows whose input tokens were ``input_ids``: keep each row's top
        ``width`` as that token's candidates (a later row for the same token wins: it is the more recent)."""
        ids = np.asarray(input_ids, dtype=np.int64)
        # a shape that does not fit records nothing (the loop's logits are [rows, the manifest's vocab_size])
        if len(ids) == 0 or logits.ndim != 2 or logits.shape != (len(ids), self.vocab_size):
            return
        top = np.argpartition(logits, -self.width, axis=-1)[:, -self.width:] if self.width < self.vocab_size else \
            np.broadcast_to(np.arange(self.vocab_size), logits.shape)
        order = np.argsort(-np.take_along_axis(logits, top, axis=-1), axis=-1, kind="stable")
        top = np.take_along_axis(top, order, axis=-1).astype(np.int32)
        ok = (ids >= 0) & (ids < self.vocab_size)
        with self.lock:
            if len(self.next_ids) < self.vocab_size:
                self.next_ids = np.full((self.vocab_size, self.width), -1, dtype=np.int32)
            self.next_ids[ids[ok]] = top[ok]

    def score(self, previous_ids: Sequence[int], next_ids: Sequence[int]) -> None:
        """Count, for each (token, the token the target emitted after it), which rank of the table had it."""
        with self.lock:
            for prev, nxt in zip(previous_ids, next_ids):
                cand = self.candidates(prev)
                if cand[0] >= 0:
                    self._tries += cand >= 0
                    self._hits += cand == nxt


class RecycleDrafter(Drafter):
    name = "recycle"
    needs_logits = True

    def __init__(self, table: RecycleTable):
        self.table = table
        self.last = -1  # the context's last token: the root of every proposal

    def begin(self, prompt_ids: np.ndarray, features: np.ndarray | None = None) -> None:
        self.last = int(prompt_ids[-1]) if len(prompt_ids) else -1

    def propose(self, k: int, sampling: SamplingParams, rng: np.random.Generator,
                keep_drafting: KeepDrafting | None = None) -> Proposal:
        """Each token's first candidate, while the estimated acceptance rate0^depth stays >= MIN_NODE_P (at
        least one token when there is one, at most k)."""
        rate = float(self.table.rates()[0])
        ids: list[int] = []
        token, score = self.last, 1.0
        while len(ids) < k:
            cand = self.table.candidates(token)
            if cand[0] < 0:
                break
            score *= rate
            if ids and score < MIN_NODE_P:
                break
            token = int(cand[0])
            ids.append(token)
        return Proposal(np.array(ids, dtype=np.int64)) if ids else empty()

    def propose_tree(self, k: int, nodes: int, sampling: SamplingParams, rng: np.random.Generator) -> Proposal:
        """The ``nodes`` likeliest continuations through the table, best first (a node's score: the product
        of its path's rank rates -- never above its parent's, as pruning needs), at most k deep."""
        rates = self.table.rates()
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        # (-score, tie-break, parent node, token, depth): heapq pops the best-scored candidate first
        heap: list[tuple[float, int, int, int, int]] = []
        seq = 0

        def push(parent: int, token: int, base: float, depth: int) -> None:
            nonlocal seq
            for r, nxt in enumerate(self.table.candidates(token).tolist()):
                if nxt < 0 or base * rates[r] < MIN_TREE_SCORE:
                    break
                heapq.heappush(heap, (-base * rates[r], seq, parent, nxt, depth))
                seq += 1

        if k >= 1:
            push(-1, self.last, 1.0, 1)
        while heap and len(tokens) < nodes:
            neg, _, parent, token, depth = heapq.heappop(heap)
            tokens.append(token)
            parents.append(parent)
            scores.append(-neg)
            if depth < k:
                push(len(tokens) - 1, token, -neg, depth + 1)
        return tree_proposal(tokens, parents, scores)

    def commit(self, accepted_ids: Sequence[int], next_id: int, features: np.ndarray | None = None,
               logits: np.ndarray | None = None) -> None:
        """``logits``: the target's for the verification rows 0 .. len(accepted_ids) [a + 1, vocab] -- their
        input tokens are the old last token and the accepted ones."""
        inputs = [self.last, *(int(t) for t in accepted_ids)]
        self.table.score(inputs, [*(int(t) for t in accepted_ids), int(next_id)])  # the table as it proposed
        if logits is not None:
            self.table.record(inputs, logits)
        self.last = int(next_id)
