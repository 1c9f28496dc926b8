"""``suffix``: drafting from continuation counts over this generation and the earlier ones on this engine.

``SuffixCache`` (one per engine, shared by its generations) counts, for every context of
``ngram_min``..``ngram_max`` tokens seen in the prompts and outputs it holds, which token followed it
and how often.  A proposal walks forward from the current context: at each position the longest
known context picks its most frequent continuation, with empirical probability count / total; the
walk stops when the product of those probabilities falls below ``min_confidence``, or when the
match is short and the walk long (at most ``1 + length_factor * n`` tokens after an n-token match).
So the number of tokens proposed follows the match length and how often the continuation was seen
(SuffixDecoding, arXiv 2411.04975, does the same with suffix trees).  It pays on repeated work --
the same template, the same code base, agent loops -- and also copies spans of the current prompt,
whose n-grams are usually seen once (probability 1).

The cache is bounded: ``budget_tokens`` tokens of whole sequences, the oldest evicted first (their
counts removed).  Updates cost O(ngram_max) per committed token; a proposal O(ngram_max) lookups per
drafted token -- nothing proportional to the context or the cache.

A ``Datastore`` (``datastore.py``: a frozen table built from the target's own answers) answers where the live
cache knows the context only by a shorter suffix, or not at all: a fresh engine then still drafts the phrases
its target habitually writes.  The walk is the same; each position takes the longer of the two matches, the
live cache on a tie (it holds this prompt and this engine's recent work).
"""
from __future__ import annotations

import threading
from collections import deque
from collections.abc import Sequence

import numpy as np
from specrt.runtime.drafters.base import Drafter, KeepDrafting, Proposal, empty, tree_proposal
from specrt.runtime.drafters.datastore import Datastore
from specrt.runtime.errors import GenerationError
from specrt.runtime.sampling import SamplingParams


class SuffixCache:
    """Continuation counts over a bounded set of token sequences (thread-safe)."""

    def __init__(self, budget_tokens: int = 200_000, ngram_min: int = 1, ngram_max: int = 6):
        if not 1 <= ngram_min <= ngram_max <= 16:
            raise GenerationError(f"suffix n-gram sizes must satisfy 1 <= min <= max <= 16, got {ngram_min}, "
                                  f"{ngram_max}")
        if budget_tokens < 1:
            raise GenerationError(f"the suffix cache budget must be >= 1 token, got {budget_tokens}")
        self.budget_tokens, self.ngram_min, self.ngram_max = budget_tokens, ngram_min, ngram_max
        # context -> {next token: count}, and context -> [total count, best token, its count]
        self._counts: dict[tuple[int, ...], dict[int, int]] = {}
        self._best: dict[tuple[int, ...], list[int]] = {}
        self._sequences: deque[list[int]] = deque()
        self.tokens = 0
        self.lock = threading.Lock()

    def count(self, seq: Sequence[int], i: int, delta: int) -> None:
        """Token seq[i] follows each context ending at seq[i - 1]: add (delta=+1) or remove (-1) that."""
        token = seq[i]
        for n in range(self.ngram_min, min(self.ngram_max, i) + 1):
            key = tuple(seq[i - n:i])
            conts = self._counts.get(key)
            if conts is None:
                if delta < 0:
                    continue
                conts = self._counts[key] = {}
                self._best[key] = [0, token, 0]
            c = conts.get(token, 0) + delta
            best = self._best[key]
            best[0] += delta
            if c > 0:
                conts[token] = c
            else:
                conts.pop(token, None)
            if not conts:
                del self._counts[key], self._best[key]
            elif delta > 0 and c > best[2]:
                best[1], best[2] = token, c
            elif delta < 0 and token == best[1]:  # the best one lost a count: look again among the few
                best[1], best[2] = max(conts.items(), key=lambda kv: kv[1])

    def top(self, key: tuple[int, ...], m: int) -> list[tuple[int, float]]:
        """The ``m`` most frequent continuations of a context with their empirical probabilities."""
        conts = self._counts.get(key)
        if not conts:
            return []
        total = self._best[key][0]
        return [(t, c / total) for t, c in sorted(conts.items(), key=lambda kv: -kv[1])[:m]]

    def best(self, key: tuple[int, ...]) -> tuple[int, int, int] | None:
        """(most frequent continuation, its count, total count) of a context, or None."""
        b = self._best.get(key)
        return (b[1], b[2], b[0]) if b else None

    def clear(self) -> None:
        with self.lock:
            self._counts, self._best, self._sequences, self.tokens = {}, {}, deque(), 0

    def keep(self, seq: list[int]) -> None:
        """Remember a finished sequence (its counts are already in); evict the oldest past the budget."""
        self._sequences.append(seq)
        self.tokens += len(seq)
        while self.tokens > self.budget_tokens and len(self._sequences) > 1:
            old = self._sequences.popleft()
            self.tokens -= len(old)
            for i in range(1, len(old)):
                self.count(old, i, -1)


class SuffixDrafter(Drafter):
    name = "suffix"

    def __init__(self, cache: SuffixCache, min_confidence: float = 0.1, length_factor: float = 2.0,
                 datastore: Datastore | None = None):
        if not 0.0 <= min_confidence <= 1.0:
            raise GenerationError(f"min_confidence must be in [0, 1], got {min_confidence!r}")
        self.cache, self.min_confidence, self.length_factor = cache, min_confidence, length_factor
        self.datastore = datastore
        self.tokens: list[int] = []

    def continuation(self, tail: list[int]) -> tuple[int, int, int, int] | None:
        """(token, count, total, n) for the longest context of n tokens ending ``tail`` that the live cache or
        the datastore knows; the live cache wins a tie.  Call with the cache's lock held."""
        cache, hit, n = self.cache, None, 0
        for n in range(min(cache.ngram_max, len(tail)), cache.ngram_min - 1, -1):
            hit = cache.best(tuple(tail[len(tail) - n:]))
            if hit is not None:
                break
        stored = self.stored(tail, n if hit is not None else 0)
        if stored is not None:
            return stored
        return (*hit, n) if hit is not None else None

    def stored(self, tail: list[int], longer_than: int) -> tuple[int, int, int, int] | None:
        """(token, count, total, n) of the datastore's longest context ending ``tail`` with n > ``longer_than``."""
        if self.datastore is None:
            return None
        for n in range(min(self.datastore.ngram_max, len(tail)), longer_than, -1):
            hit = self.datastore.best(tail[len(tail) - n:])
            if hit is not None:
                return (*hit, n)
        return None

    def begin(self, prompt_ids: np.ndarray, features: np.ndarray | None = None) -> None:
        if self.datastore is not None:
            self.datastore.arrays()  # read (and checked) now: a bad file fails the request before any token
        self.tokens = [int(t) for t in prompt_ids]
        with self.cache.lock:
            for i in range(1, len(self.tokens)):
                self.cache.count(self.tokens, i, +1)

    def propose(self, k: int, sampling: SamplingParams, rng: np.random.Generator,
                keep_drafting: KeepDrafting | None = None) -> Proposal:
        if k < 1:
            return empty()
        cache, ctx, out = self.cache, self.tokens, []
        confidence, limit = 1.0, k
        reach = max(cache.ngram_max, self.datastore.ngram_max if self.datastore is not None else 0)
        with cache.lock:
            while len(out) < limit:
                hit = self.continuation(ctx[-reach:] + out)
                if hit is None:
                    break
                token, count, total, n = hit
                confidence *= count / total
                if confidence < self.min_confidence:
                    break
                if not out:  # the first match sets how far this proposal may reach
                    limit = min(k, 1 + int(self.length_factor * n))
                out.append(token)
        return Proposal(np.array(out, dtype=np.int64)) if out else empty()

    def propose_tree(self, k: int, nodes: int, sampling: SamplingParams, rng: np.random.Generator) -> Proposal:
        """Best-first over continuation counts: the most probable unexpanded node grows its two most frequent
        continuations, until ``nodes`` nodes or nothing above ``min_confidence``."""
        import heapq

        cache = self.cache
        ctx = self.tokens[-max(cache.ngram_max, self.datastore.ngram_max if self.datastore is not None else 0):]
        tokens: list[int] = []
        parents: list[int] = []
        scores: list[float] = []
        paths: list[list[int]] = []  # each node's tokens from the root
        heap = [(-1.0, -1)]  # (-probability of the path, node); -1 = the root
        with cache.lock:
            while heap and len(tokens) < nodes:
                neg, node = heapq.heappop(heap)
                path = paths[node] if node >= 0 else []
                if len(path) >= k:
                    continue
                tail = ctx + path
                options, n = [], 0
                for n in range(min(cache.ngram_max, len(tail)), cache.ngram_min - 1, -1):
                    options = cache.top(tuple(tail[len(tail) - n:]), 2)
                    if options:
                        break
                stored = self.stored(tail, n if options else 0)  # a longer match: its one continuation
                if stored is not None:
                    options = [(stored[0], stored[1] / stored[2])]
                for token, p in options:
                    score = -neg * p
                    if score < self.min_confidence or len(tokens) >= nodes:
                        break
                    tokens.append(token)
                    parents.append(node)
                    scores.append(score)
                    paths.append(path + [token])
                    heapq.heappush(heap, (-score, len(tokens) - 1))
        return tree_proposal(tokens, parents, scores)

    def commit(self, accepted_ids: Sequence[int], next_id: int, features: np.ndarray | None = None,
               logits: np.ndarray | None = None) -> None:
        with self.cache.lock:
            for token in (*accepted_ids, next_id):
                self.tokens.append(int(token))
                self.cache.count(self.tokens, len(self.tokens) - 1, +1)

    def end(self) -> None:
        if self.tokens:
            with self.cache.lock:
                self.cache.keep(self.tokens)
        self.tokens = []
