"""runtime/drafters/ngram.py: prompt lookup, its incremental index against a brute-force scan."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from specrt.runtime.drafters import NgramDrafter
from specrt.runtime.errors import GenerationError
from specrt.runtime.sampling import SamplingParams

GREEDY, RNG = SamplingParams(), np.random.default_rng(0)


def propose(d: NgramDrafter, k: int) -> list[int]:
    return d.propose(k, GREEDY, RNG).token_ids.tolist()


@pytest.mark.parametrize("context, k, nmin, nmax, match, expected", [
    ([1, 2, 3, 9, 1, 2], 4, 1, 3, "latest", [3, 9, 1, 2]),          # the 2-gram (1, 2) matched, 4 tokens follow
    ([1, 2, 3, 9, 1, 2], 2, 1, 3, "latest", [3, 9]),                # k caps the proposal
    ([5, 1, 7, 2, 1, 8, 3, 1], 3, 1, 1, "latest", [8, 3, 1]),       # the latest 1 was followed by 8
    ([5, 1, 7, 2, 1, 8, 3, 1], 3, 1, 1, "earliest", [7, 2, 1]),     # the earliest by 7
    ([4, 5, 6, 1, 5, 6, 2, 4, 5, 6], 2, 1, 3, "latest", [1, 5]),    # the longest suffix (4, 5, 6) wins over (5, 6)
    ([1, 2, 3, 4], 3, 1, 4, "latest", []),                          # nothing repeats
    ([1, 2, 3, 4, 2], 3, 2, 4, "latest", []),                       # a 1-gram match is below ngram_min
    ([7, 7], 4, 1, 2, "latest", [7]),                               # the continuation may run into the present
    ([7], 4, 1, 2, "latest", []),                                   # the current suffix itself is no match
])
def test_lookup_table(context, k, nmin, nmax, match, expected):
    d = NgramDrafter(nmin, nmax, match, trim=False)
    d.begin(np.array(context))
    assert propose(d, k) == expected


def brute_force(tokens: list[int], k: int, nmin: int, nmax: int, match: str) -> list[int]:
    """Scan the whole context: the reference the incremental index must equal."""
    L = len(tokens)
    for n in range(min(nmax, L), nmin - 1, -1):
        suffix = tokens[L - n:]
        starts = [i for i in range(L - n) if tokens[i:i + n] == suffix]  # occurrences with a continuation
        if starts:
            s = starts[-1] if match == "latest" else starts[0]
            return tokens[s + n:s + n + k]
    return []


@settings(max_examples=300, deadline=None)
@given(tokens=st.lists(st.integers(0, 5), min_size=1, max_size=60), split=st.integers(1, 60),
       nmin=st.integers(1, 3), extra=st.integers(0, 3), k=st.integers(1, 8), match=st.sampled_from(["latest", "earliest"]))
def test_incremental_index_equals_a_full_scan(tokens, split, nmin, extra, k, match):
    split = min(split, len(tokens))
    d = NgramDrafter(nmin, nmin + extra, match, trim=False)
    d.begin(np.array(tokens[:split]))
    assert propose(d, k) == brute_force(tokens[:split], k, nmin, nmin + extra, match)
    i = split
    while i < len(tokens):  # commits of 1..3 tokens at a time, as steps do
        step = tokens[i:i + 1 + (i % 3)]
        d.commit(step[:-1], step[-1])
        i += len(step)
        assert propose(d, k) == brute_force(tokens[:i], k, nmin, nmin + extra, match)


def test_bad_options():
    with pytest.raises(GenerationError, match="ngram_min <= ngram_max"):
        NgramDrafter(3, 2)
    with pytest.raises(GenerationError, match="match must be one of"):
        NgramDrafter(1, 2, "random")


def test_k_zero_and_empty_proposals_are_deterministic():
    d = NgramDrafter(1, 2)
    d.begin(np.array([1, 1, 1]))
    p = d.propose(0, GREEDY, RNG)
    assert len(p) == 0 and p.probs is None
    assert d.propose(3, GREEDY, RNG).probs is None  # q is one-hot: a deterministic proposal


def test_proposals_are_as_deep_as_the_match_has_earned():
    """A short match proposes a short continuation and a long one up to k; rejections shorten them further,
    full acceptances lengthen them (the running per-match-length acceptance p(n))."""
    d = NgramDrafter(1, 8)
    text = list(range(100, 140))
    d.begin(np.array(text + [7] + text[:8]))  # the last 8 tokens repeat the prompt's start: an 8-gram match
    assert propose(d, 16) == text[8:18]  # p(8) = 0.8 prior: 0.8 ** 10 > 0.1 > 0.8 ** 11
    d.commit(text[8:18], text[18])  # all accepted
    assert d.p(8) > 0.8 and d.depth(8, 16) > 10
    assert propose(d, 4) == text[19:23]  # k caps it
    d.begin(np.arange(100))  # every target token below repeats one earlier token: 1-gram matches only
    d.commit([], 10)
    assert propose(d, 8) == [11, 12]  # p(1) = 0.45 prior: 0.45 ** 2 > 0.1 > 0.45 ** 3
    before = d.depth(1, 8)
    for t in range(20, 90, 10):  # ... and each is rejected at its first token
        d.commit([], t)
        assert propose(d, 8)[0] == t + 1
    d.commit([], 95)
    assert d.p(1) < 0.3 and d.depth(1, 8) < before
    assert NgramDrafter(1, 8, trim=False).depth(1, 8) == 8


def test_trees_and_chains_learn_from_what_the_target_emits():
    """p(n) learns from the longest match's continuation against the tokens the target then emits, whether
    the step verified a chain or a tree (its pruned depth does not matter: greedy, those are the tokens)."""
    for tree in (False, True):
        d = NgramDrafter(1, 8)
        d.begin(np.arange(100))
        before = d.p(1)
        for t in range(10, 90, 10):
            d.commit([], t)  # each target token repeats one earlier token: a 1-gram match ...
            if tree:
                d.propose_tree(8, 16, GREEDY, RNG)
            else:
                propose(d, 8)
        d.commit([], 95)  # ... and the target never continues it
        assert d.p(1) < before - 0.1, tree
