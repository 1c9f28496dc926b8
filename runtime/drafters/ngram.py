"""``ngram``: prompt lookup.  The longest suffix of the context that occurred earlier proposes what followed it.

For n from ``ngram_max`` down to ``ngram_min``, the last n tokens of the context are looked up among
the earlier n-grams of the prompt and the generated text; the first hit proposes the (up to k) tokens
that followed it.  Nothing found: an empty proposal, which costs a few dictionary lookups.

The index maps each n-gram to where its continuation starts, and is updated as tokens are committed
(n-grams ending at the token before each new one gain a continuation): no step rescans the context.
``match="latest"`` keeps the most recent occurrence of an n-gram, ``"earliest"`` the first one
(vLLM's choice); ``benchmarks/drafter_replay.py`` measured which one pays (README).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from specrt.runtime.drafters.base import Drafter, KeepDrafting, Proposal, empty
from specrt.runtime.errors import GenerationError
from specrt.runtime.sampling import SamplingParams
from specrt.runtime.tree import trie

MATCHES = ("latest", "earliest")
OCCURRENCES = 4  # earlier occurrences kept per n-gram: a tree's branches


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, ngram_min: int = 2, ngram_max: int = 4, match: str = "latest"):
        if not (isinstance(ngram_min, int) and isinstance(ngram_max, int) and 1 <= ngram_min <= ngram_max <= 16):
            raise GenerationError(f"n-gram sizes must satisfy 1 <= ngram_min <= ngram_max <= 16, got "
                                  f"{ngram_min!r}, {ngram_max!r}")
        if match not in MATCHES:
            raise GenerationError(f"match must be one of {', '.join(MATCHES)}, got {match!r}")
        self.ngram_min, self.ngram_max, self.match = ngram_min, ngram_max, match
        self.tokens: list[int] = []
        # n-gram -> starts of the tokens that followed it (the latest or earliest few; a tree takes several)
        self._index: dict[tuple[int, ...], list[int]] = {}
        self.alpha = 0.6  # running acceptance of its proposals: the score of a tree node is alpha ** depth

    def begin(self, prompt_ids: np.ndarray, features: np.ndarray | None = None) -> None:
        self.tokens = [int(t) for t in prompt_ids]
        self._index = {}
        for i in range(1, len(self.tokens)):
            self._register(i)

    def _register(self, i: int) -> None:
        """Token i exists now: every n-gram ending at token i - 1 has a continuation starting at i."""
        t = self.tokens
        for n in range(self.ngram_min, min(self.ngram_max, i) + 1):
            starts = self._index.setdefault(tuple(t[i - n:i]), [])
            if self.match == "latest":
                starts.append(i)
                if len(starts) > OCCURRENCES:
                    del starts[0]
            elif len(starts) < OCCURRENCES:
                starts.append(i)

    def lookup(self, k: int) -> tuple[int, list[int]]:
        """(matched n, up to k continuation tokens) for the longest matching suffix; (0, []) when none."""
        t = self.tokens
        for n in range(min(self.ngram_max, len(t)), self.ngram_min - 1, -1):
            starts = self._index.get(tuple(t[len(t) - n:]))
            if starts:
                start = starts[-1] if self.match == "latest" else starts[0]
                return n, t[start:start + k]
        return 0, []

    def propose_tree(self, k: int, nodes: int, sampling: SamplingParams, rng: np.random.Generator) -> Proposal:
        """Distinct continuations of several earlier matches (longest first, in match order) as branches."""
        t = self.tokens
        paths: list[list[int]] = []
        for n in range(min(self.ngram_max, len(t)), self.ngram_min - 1, -1):
            starts = self._index.get(tuple(t[len(t) - n:]), [])
            for start in (reversed(starts) if self.match == "latest" else starts):
                cont = t[start:start + k]
                if cont and cont not in paths:
                    paths.append(cont)
        if not paths:
            return empty()
        tree, rank = trie(paths, nodes)
        scores = self.alpha ** tree.depths * 0.5 ** rank  # a later match's own nodes are less likely
        return Proposal(tree.token_ids, None, None, tree.parents, scores)

    def propose(self, k: int, sampling: SamplingParams, rng: np.random.Generator,
                keep_drafting: KeepDrafting | None = None) -> Proposal:
        if k < 1:
            return empty()
        _, ids = self.lookup(k)
        return Proposal(np.array(ids, dtype=np.int64)) if ids else empty()

    def commit(self, accepted_ids: Sequence[int], next_id: int, features: np.ndarray | None = None) -> None:
        self.alpha = 0.9 * self.alpha + 0.1 * (len(accepted_ids) / (len(accepted_ids) + 1))
        for token in (*accepted_ids, next_id):
            self.tokens.append(int(token))
            self._register(len(self.tokens) - 1)

    def end(self) -> None:
        self.tokens, self._index = [], {}
