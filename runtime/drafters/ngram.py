"""``ngram``: prompt lookup.  The longest suffix of the context that occurred earlier proposes what followed it.

For n from ``ngram_max`` down to ``ngram_min``, the last n tokens of the context are looked up among
the earlier n-grams of the prompt and the generated text; the first hit proposes the (up to k) tokens
that followed it.  Nothing found: an empty proposal, which costs a few dictionary lookups.

The index maps each n-gram to where its continuation starts, and is updated as tokens are committed
(n-grams ending at the token before each new one gain a continuation): no step rescans the context.
``match="latest"`` keeps the most recent occurrence of an n-gram, ``"earliest"`` the first one
(vLLM's choice); ``benchmarks/drafter_replay.py`` measured which one pays (docs/drafters.md).

How far to trust a match depends on its length: over the verifier's own Spec-Bench outputs a 1-gram
match's continuation was accepted for 0.8 tokens on average, a 3-gram's for 2.9, an 8-gram's for 6.5
(``drafter_replay.py``).  So the drafter keeps, per match length, a running per-token acceptance p(n)
(geometric: the longest match's continuation against the tokens the target then emits -- agreeing
tokens against first disagreements --, starting from those measured priors) and proposes a
continuation only as deep as p(n)^depth >= ``MIN_NODE_P`` (at least one token): a 1-gram match offers
about 2 tokens, a long match up to k.  Rows a pass would waste cost time where they are not free (long
contexts, quantized targets); the tokens they could have won come back from the long matches.
Tree nodes are scored with the same p(n).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from specrt.runtime.drafters.base import Drafter, KeepDrafting, Proposal, empty
from specrt.runtime.errors import GenerationError
from specrt.runtime.sampling import SamplingParams
from specrt.runtime.tree import cap_at_parents, trie

MATCHES = ("latest", "earliest")
OCCURRENCES = 4  # earlier occurrences kept per n-gram: a tree's branches
MIN_NODE_P = 0.1  # propose a token only while its estimated acceptance p(n)^depth stays above this
# Per-token acceptance of an n-token match's continuation before this generation has shown any (from the
# replay over Spec-Bench outputs, module docstring), and how many observations that prior weighs.
PRIOR_P = {1: 0.45, 2: 0.6, 3: 0.7}
PRIOR_P_LONG = 0.8
PRIOR_WEIGHT = 4.0


class NgramDrafter(Drafter):
    name = "ngram"

    def __init__(self, ngram_min: int = 1, ngram_max: int = 8, match: str = "latest", trim: bool = True):
        if not (isinstance(ngram_min, int) and isinstance(ngram_max, int) and 1 <= ngram_min <= ngram_max <= 16):
            raise GenerationError(f"n-gram sizes must satisfy 1 <= ngram_min <= ngram_max <= 16, got "
                                  f"{ngram_min!r}, {ngram_max!r}")
        if match not in MATCHES:
            raise GenerationError(f"match must be one of {', '.join(MATCHES)}, got {match!r}")
        self.ngram_min, self.ngram_max, self.match, self.trim = ngram_min, ngram_max, match, trim
        self.tokens: list[int] = []
        # n-gram -> starts of the tokens that followed it (the latest or earliest few; a tree takes several)
        self._index: dict[tuple[int, ...], list[int]] = {}
        self._counts: dict[int, list[float]] = {}  # match length -> [accepted tokens, first rejections]
        # (match length, its whole continuation, up to k) of the longest match at the pending proposal
        self._last: tuple[int, list[int]] | None = None

    def begin(self, prompt_ids: np.ndarray, features: np.ndarray | None = None) -> None:
        self.tokens = [int(t) for t in prompt_ids]
        self._index = {}
        self._counts, self._last = {}, None
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

    def p(self, n: int) -> float:
        """Estimated per-token acceptance of the continuation of an n-token match, in this generation."""
        acc, rej = self._counts.get(n) or (0.0, 0.0)
        prior = PRIOR_P.get(n, PRIOR_P_LONG)
        return (acc + PRIOR_WEIGHT * prior / (1 - prior)) / (acc + rej + PRIOR_WEIGHT / (1 - prior))

    def depth(self, n: int, k: int) -> int:
        """How many tokens of an n-token match's continuation to propose: while p(n)^depth >= MIN_NODE_P, at least
        one (a match is always worth one row) and at most k."""
        if not self.trim:
            return k
        p = min(self.p(n), 0.99)
        return max(1, min(k, int(np.log(MIN_NODE_P) / np.log(p))))

    def propose_tree(self, k: int, nodes: int, sampling: SamplingParams, rng: np.random.Generator) -> Proposal:
        """Distinct continuations of several earlier matches (longest first, in match order) as branches."""
        t = self.tokens
        paths: list[list[int]] = []
        path_p: list[float] = []
        path_n: list[int] = []
        for n in range(min(self.ngram_max, len(t)), self.ngram_min - 1, -1):
            starts = self._index.get(tuple(t[len(t) - n:]), [])
            for start in (reversed(starts) if self.match == "latest" else starts):
                cont = t[start:start + k]
                if cont and cont not in paths:
                    paths.append(cont)
                    path_p.append(self.p(n))
                    path_n.append(n)
        if not paths:
            return empty()
        self._last = (path_n[0], paths[0])  # the longest match learns from what the target emits (commit)
        tree, rank = trie(paths, nodes)
        # a node is as likely as its match's continuation reaches that deep; a later match's own nodes
        # (where it parts from the earlier ones) less so; never likelier than its parent (pruning keeps the
        # best nodes and must keep their ancestors)
        scores = cap_at_parents(tree, np.array(path_p)[rank] ** tree.depths * 0.5 ** rank)
        return Proposal(tree.token_ids, None, None, tree.parents, scores)

    def propose(self, k: int, sampling: SamplingParams, rng: np.random.Generator,
                keep_drafting: KeepDrafting | None = None) -> Proposal:
        self._last = None
        if k < 1:
            return empty()
        n, ids = self.lookup(k)
        if not ids:
            return empty()
        self._last = (n, ids)
        return Proposal(np.array(ids[:self.depth(n, k)], dtype=np.int64))

    def commit(self, accepted_ids: Sequence[int], next_id: int, features: np.ndarray | None = None,
               logits: np.ndarray | None = None) -> None:
        if self._last is not None:
            # The target's own tokens (accepted + next) against the whole continuation of the longest match --
            # also past what was proposed or kept after pruning: greedy, those are the tokens the target would
            # have accepted, so the estimate learns from every step, chain or tree.
            n, cont = self._last
            emitted = [*accepted_ids, next_id]
            agree = 0
            while agree < min(len(cont), len(emitted)) and int(cont[agree]) == int(emitted[agree]):
                agree += 1
            counts = self._counts.setdefault(n, [0.0, 0.0])
            counts[0] += agree
            counts[1] += agree < min(len(cont), len(emitted))  # a disagreement seen (else censored)
            self._last = None
        for token in (*accepted_ids, next_id):
            self.tokens.append(int(token))
            self._register(len(self.tokens) - 1)

    def end(self) -> None:
        self.tokens, self._index = [], {}
